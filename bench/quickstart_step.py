"""Time per training step of the quickstart's recipe (make demo's DiT, batch 32, 24x24), float32 vs bfloat16 autocast,
in one process on this CPU. Prints ms/step for each and their ratio, whether the CPU has native bf16, and how close the
float32 step runs to this CPU's own matmul rate (the step's FLOPs counted by torch.utils.flop_counter, against a
1024x1024 float32 matmul timed in the same process): how much faster a step could get without a weaker model.
  .venv/bin/python bench/quickstart_step.py [--steps 20]"""
import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers.utils import logging as hf_logging

from deepfusion_ref.cond import LayerStack
from deepfusion_ref.data import RenderedScenes, SceneDataset
from deepfusion_ref.dit import DeepFusionDiT
from deepfusion_ref.text import LanguageModel, packaged_minilm_path
from deepfusion_ref.train import Trainer, fast_bf16

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=20,
                    help="timed steps per variant (after 6 warm-up steps)")
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
    trainer = Trainer(net, lm, train_set, steps=args.steps + 9, batch_size=32, lr=2e-3, weight_decay=0.0,
                      ema_decay=0.99, bf16=bf16, progress=False, P_mean=-0.6)
    trainer.fit(until=5)
    trainer.fit(until=6)
    start = time.perf_counter()
    trainer.fit(until=6 + args.steps)
    times[bf16] = (time.perf_counter() - start) / args.steps * 1000
    if not bf16:  # how much of a float32 step its matrix products take: the floor an eager step cannot go below
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            trainer.fit()  # the last 3 steps
        matmul_ms = sum(e.self_cpu_time_total for e in prof.key_averages()
                        if e.key in ("aten::mm", "aten::addmm", "aten::bmm")) / 3 / 1000
    print(f"{'bfloat16' if bf16 else 'float32 '}: {times[bf16]:.0f} ms/step ({torch.get_num_threads()} threads)")
print(f"bf16 / fp32 time: {times[True] / times[False]:.2f}x; native bf16 on this CPU: {fast_bf16('cpu')}")
# FLOPs of a step: 3x the network's forward (the usual forward + backward estimate; FlopCounterMode's own count of the
# backward multiplies the depthwise convolution's by its group count, 682x here), on a batch of 12-token prompts.
prompts = LayerStack(torch.randn(lm.num_layers, 32, 12, lm.hidden_size), torch.ones(32, 12, dtype=torch.bool))
with torch.no_grad(), FlopCounterMode(display=False) as counter:
    trainer.denoiser(torch.randn(32, 3, 24, 24), torch.ones(32), prompts)
flops = 3 * counter.get_total_flops()
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
for _ in range(3):
    a @ b
start = time.perf_counter()
for _ in range(20):
    a @ b
peak = 2 * 1024**3 * 20 / (time.perf_counter() - start)
achieved = flops / (times[False] / 1000)
print(f"float32 step: {flops / 1e9:.1f} GFLOP, {achieved / 1e9:.0f} GFLOP/s = {achieved / peak:.0%} of this CPU's "
      f"1024^3 matmul rate ({peak / 1e9:.0f} GFLOP/s); at that rate 7,000 steps take at least "
      f"{7000 * flops / peak / 60:.0f} min")
print(f"matrix products: {matmul_ms:.0f} ms of a float32 step (profiler, 3 steps); 7,000 steps in 10 minutes need "
      f"{600_000 / 7000:.0f} ms per step")
