"""Worker for tests/test_train.py::test_torchrun_*: trains a tiny DiT for 4 steps, under torchrun (gloo, CPU) or
as one process, and writes the final parameters to the safetensors file argv[1].
  argv[2]: 'ddp' or 'fsdp' (the Trainer's `parallel`); argv[3] (optional): a checkpoint folder: train 2 steps,
  checkpoint, then continue with a fresh Trainer resumed from it (checkpoints under sharding).
  GRAD_ACCUM (environment, default 1): micro-batches per step; under DDP the file also holds `allreduce_calls`, the
  gradient exchanges DDP made (one per step when accumulation skips the all-reduce on all but the last)."""
import sys

import torch
from safetensors.torch import save_file
from transformers.utils import logging as hf_logging

from deepfusion_ref.data import SceneDataset
from deepfusion_ref.dit import DeepFusionDiT
from deepfusion_ref.text import LanguageModel, packaged_minilm_path
from deepfusion_ref.train import Trainer

hf_logging.disable_progress_bar()
torch.set_num_threads(1)
distributed = "WORLD_SIZE" in __import__("os").environ
if distributed:
    torch.distributed.init_process_group("gloo")
out, parallel = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ddp"
grad_accum = int(__import__("os").environ.get("GRAD_ACCUM", "1"))
checkpoint_dir = sys.argv[3] if len(sys.argv) > 3 else None
lm = LanguageModel.from_pretrained(packaged_minilm_path(), max_length=96)


def make_trainer():
    torch.manual_seed(0)
    dit = DeepFusionDiT(in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2, text_dim=lm.hidden_size,
                        num_llm_layers=lm.num_layers, rope_axes=(4, 6, 6), long_skips=False)
    return Trainer(dit, lm, SceneDataset(8, 16, 16, seed=1), steps=4, batch_size=4, lr=1e-3,
                   progress=False, parallel=parallel, cond_drop_prob=0.3, bf16=False, checkpoint_dir=checkpoint_dir,
                   checkpoint_every=2 if checkpoint_dir else 0, grad_accum=grad_accum)


trainer = make_trainer()
exchanges = []
if distributed and parallel == "ddp":  # count DDP's gradient exchanges (one call per bucket)
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    trainer.model.register_comm_hook(None, lambda state, bucket: exchanges.append(1) or allreduce_hook(state, bucket))
if checkpoint_dir:
    trainer.fit(until=2)  # writes the checkpoint of step 2
    trainer = make_trainer()
    assert trainer.resume() and trainer.step == 2
trainer.fit()
model, ema, _ = trainer._full_states()  # gathered from the shards under FSDP
if trainer.rank == 0:
    counts = {"allreduce_calls": torch.tensor(len(exchanges))} if exchanges else {}
    save_file({**{k: v.contiguous() for k, v in model.items()},
               **{f"ema.{k}": v.contiguous() for k, v in ema.items()}, **counts}, out)
if distributed:
    # Both ranks leave together: a rank tearing gloo down while rank 0 still writes once crashed at exit
    # ("terminate called without an active exception", CI under load).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
