# The README's two commands: `make demo` (the main job) and `make test` (everything CI runs).
# Both build .venv/ first (tools/install.sh); it is rebuilt when settings.ini, setup.py or csrc/ change.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deepfusion_ref-installed

.PHONY: install demo test bench export

$(STAMP): settings.ini setup.py pyproject.toml tools/install.sh $(shell find csrc -type f)
	bash tools/install.sh $(PYTHON) $(VENV)
	touch $@

install: $(STAMP)

demo: $(STAMP)
	mkdir -p demo_output
	$(BIN)/papermill --progress-bar nbs/pipelines/thresholding_demo.ipynb demo_output/thresholding_demo.ipynb \
		-p out_dir demo_output
	@echo "demo: wrote demo_output/thresholding_demo.png, demo_output/metrics.json and the executed notebook"

test: $(STAMP)
	VENV=$(VENV) bash tools/test.sh

bench: $(STAMP)
	$(BIN)/python bench/ops.py

# After editing notebooks: write the package and README, strip notebook noise.
export: $(STAMP)
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean && $(BIN)/python tools/readme.py
