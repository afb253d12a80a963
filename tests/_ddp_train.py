"""Worker for tests/test_train.py::test_torchrun_ddp_equals_one_process: trains a tiny DiT for a few steps, under
torchrun (gloo, CPU) or as one process, and writes the final parameters to the safetensors file argv[1]."""
import os
import sys

import torch
from safetensors.torch import save_file
from transformers.utils import logging as hf_logging

from deepfusion_ref.data import SceneDataset
from deepfusion_ref.dit import DeepFusionDiT
from deepfusion_ref.schedules import EDMPrecond
from deepfusion_ref.text import LanguageModel, packaged_minilm_path
from deepfusion_ref.train import Trainer

hf_logging.disable_progress_bar()
torch.set_num_threads(1)
if "WORLD_SIZE" in os.environ:
    torch.distributed.init_process_group("gloo")
lm = LanguageModel.from_pretrained(packaged_minilm_path(), max_length=96)
torch.manual_seed(0)
dit = DeepFusionDiT(in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2, text_dim=lm.hidden_size,
                    num_llm_layers=lm.num_layers, rope_axes=(4, 6, 6), long_skips=False)
trainer = Trainer(EDMPrecond(dit), lm, SceneDataset(8, 16, 16, seed=1), steps=4, batch_size=4, lr=1e-3,
                  progress=False)
trainer.fit()
if trainer.rank == 0:
    save_file({k: v.contiguous() for k, v in trainer.denoiser.state_dict().items()}, sys.argv[1])
if trainer.world > 1:
    torch.distributed.destroy_process_group()
