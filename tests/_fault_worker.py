"""Worker for tests/test_faults.py, run as a subprocess that the test may SIGKILL at any instant.
  train OUT STEPS RESULT: train a tiny DiT to STEPS (checkpoint every step, resuming from OUT/checkpoints), then
                          write the final model weights to the safetensors file RESULT.
  save OUT:               save a checkpoint and a pipeline into OUT over and over (the same step again and again,
                          so every save replaces a complete folder), printing "saved" after each round."""
import sys

import torch
from safetensors.torch import save_file
from transformers.utils import logging as hf_logging

from deepfusion_ref.data import SceneDataset
from deepfusion_ref.dit import DeepFusionDiT
from deepfusion_ref.pipeline import Text2ImagePipeline
from deepfusion_ref.text import LanguageModel, packaged_minilm_path
from deepfusion_ref.train import Trainer

hf_logging.disable_progress_bar()
torch.set_num_threads(1)
mode, out = sys.argv[1], sys.argv[2]
lm = LanguageModel.from_pretrained(packaged_minilm_path(), max_length=48)
torch.manual_seed(0)
dit = DeepFusionDiT(in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2, text_dim=lm.hidden_size,
                    num_llm_layers=lm.num_layers, rope_axes=(4, 6, 6), long_skips=False)
steps = int(sys.argv[3]) if mode == "train" else 2
trainer = Trainer(dit, lm, SceneDataset(16, 16, 16, seed=1), steps=steps, batch_size=4, lr=1e-3, progress=False,
                  cond_drop_prob=0.3, checkpoint_dir=f"{out}/checkpoints", checkpoint_every=1, keep=2,
                  metrics_file=f"{out}/metrics.jsonl")
if mode == "train":
    trainer.resume()
    trainer.fit()
    state = {**trainer.conditioned.state_dict(), **{f"ema.{k}": v for k, v in trainer.ema.state_dict().items()}}
    save_file({k: v.contiguous() for k, v in state.items()}, sys.argv[4])
else:
    trainer.fit()
    pipe = Text2ImagePipeline.from_trainer(trainer)
    while True:
        trainer.save()
        pipe.save_pretrained(f"{out}/pipeline")
        print("saved", flush=True)
