# The README's two commands: `make demo` (the main job) and `make test` (everything CI runs).
# `make demo SEED=1` trains another seed (its scores go to docs/results/quickstart_seed1.json); DEMO_ARGS passes more
# papermill parameters (e.g. DEMO_ARGS="-p threads 1").
# Both build .venv/ first (tools/install.sh); it is rebuilt when settings.ini, setup.py or csrc/ change.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deepfusion_ref-installed
SEED ?= 0
# Seed 0 writes to demo_output/, another seed to demo_output/seed<N>/: a run resumes from its own checkpoints only.
DEMO_DIR := $(if $(filter 0,$(SEED)),demo_output,demo_output/seed$(SEED))

.PHONY: install demo test bench export

$(STAMP): settings.ini setup.py pyproject.toml tools/install.sh $(shell find csrc -type f)
	bash tools/install.sh $(PYTHON) $(VENV)
	touch $@

install: $(STAMP)

demo: $(STAMP)
	mkdir -p $(DEMO_DIR)
	$(BIN)/papermill nbs/pipelines/quickstart.ipynb $(DEMO_DIR)/quickstart.ipynb \
		-p out_dir $(DEMO_DIR) -p image_size 24 -p patch_size 3 -p width 128 -p depth 4 -p num_heads 4 -p ffn mix \
		-p batch_size 32 -p lr 0.002 -p warmup_steps 100 -p steps 7000 -p decay_steps 2100 -p ema_decay 0.99 \
		-p train_scenes 4000 -p n_eval 64 -p sample_steps 18 -p guidance_scale 3.0 -p p_mean -0.6 -p pooled_text True \
		-p progress True -p results_json docs/results/quickstart_seed$(SEED).json -p seed $(SEED) $(DEMO_ARGS)
	@echo "demo: wrote $(DEMO_DIR)/samples.png, loss.png, metrics.json, pipeline/ and the executed notebook"

test: $(STAMP)
	VENV=$(VENV) bash tools/test.sh

bench: $(STAMP)
	$(BIN)/python bench/ops.py

# After editing notebooks: write the package and README, strip notebook noise.
export: $(STAMP)
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean && $(BIN)/python tools/readme.py
