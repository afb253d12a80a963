"""Time per training step of the quickstart's recipe (make demo's DiT, batch 32, 24x24), float32 vs bfloat16 autocast,
in one process on this CPU. Prints ms/step for each and their ratio, and whether the CPU has native bf16.
  .venv/bin/python bench/quickstart_step.py [--steps 20]"""
import argparse
import time

import torch
from transformers.utils import logging as hf_logging

from deepfusion_ref.data import RenderedScenes, SceneDataset
from deepfusion_ref.dit import DeepFusionDiT
from deepfusion_ref.text import LanguageModel, packaged_minilm_path
from deepfusion_ref.train import Trainer, fast_bf16

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (after 5 warm-up steps)")
args = parser.parse_args()
hf_logging.disable_progress_bar()
train_set = RenderedScenes(SceneDataset(500, seed=0, width=24, height=24, max_objects=1, exact_rgb_prob=0.0), [5])
lm = LanguageModel.from_pretrained(packaged_minilm_path(), max_length=96)
lm.encode(sorted(train_set.captions()))
times = {}
for bf16 in (False, True):
    torch.manual_seed(0)
    net = DeepFusionDiT(in_channels=3, patch_size=3, hidden_size=128, depth=4, num_heads=4, text_dim=lm.hidden_size,
                        num_llm_layers=lm.num_layers, ffn="mix", pooled_text=True)
    trainer = Trainer(net, lm, train_set, steps=args.steps + 5, batch_size=32, lr=2e-3, weight_decay=0.0,
                      ema_decay=0.99, bf16=bf16, progress=False, P_mean=-0.6)
    trainer.fit(until=5)
    start = time.perf_counter()
    trainer.fit()
    times[bf16] = (time.perf_counter() - start) / args.steps * 1000
    print(f"{'bfloat16' if bf16 else 'float32 '}: {times[bf16]:.0f} ms/step ({torch.get_num_threads()} threads)")
print(f"bf16 / fp32 time: {times[True] / times[False]:.2f}x; native bf16 on this CPU: {fast_bf16('cpu')}")
