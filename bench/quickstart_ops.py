"""The quickstart's DiT (make demo's: 24x24, patch 3, width 128, depth 4, MiniLM's 7 layer states, batch 32) end to
end, with the compiled ops, with every op's pure-PyTorch reference (DEEPFUSION_REF_FORCE_REFERENCE=1), and each under
torch.compile: a training step (forward, MSE, backward, AdamW) and a sampling step (forward, no grad), timed in
interleaved rounds (bench/timing.py) in one process.

    .venv/bin/python bench/quickstart_ops.py [--rounds 5] [--no-compile] [--json out.json]

Ratios are the other variant's time / the compiled ops' (eager) time: > 1 means the compiled ops are faster."""
import argparse
import json
import os
import sys
import time

import torch

from deepfusion_ref import ops
from deepfusion_ref.cond import LayerStack
from deepfusion_ref.dit import DeepFusionDiT
from timing import fmt, interleaved, paired_ratios, spread

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--rounds", type=int, default=5)
parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per round (their median is kept)")
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variants")
parser.add_argument("--json", help="also write the results (with this command) to this file")
args = parser.parse_args()

LM_LAYERS, LM_WIDTH, TOKENS = 7, 384, 12  # the packaged MiniLM: embeddings + 6 layers of width 384; 12-token prompts
torch.manual_seed(0)
net = DeepFusionDiT(in_channels=3, patch_size=3, hidden_size=128, depth=4, num_heads=4, text_dim=LM_WIDTH,
                    num_llm_layers=LM_LAYERS, ffn="mix", pooled_text=True)
opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
g = torch.Generator().manual_seed(0)
x = torch.randn(args.batch, 3, 24, 24, generator=g)
target = torch.randn(args.batch, 3, 24, 24, generator=g)
c_noise = torch.randn(args.batch, generator=g)
hidden = torch.randn(LM_LAYERS, args.batch, TOKENS, LM_WIDTH, generator=g)
stack = LayerStack(hidden, torch.ones(args.batch, TOKENS, dtype=torch.bool), pooled=hidden[-1].mean(1))


def with_ops(reference: bool, fn):
    "fn run with every op's kernel (reference=False) or every op's reference (DEEPFUSION_REF_FORCE_REFERENCE=1)."
    def run():
        before = os.environ.get(ops.FORCE_REFERENCE_ENV)
        os.environ[ops.FORCE_REFERENCE_ENV] = "1" if reference else "0"
        try:
            return fn()
        finally:
            if before is None:
                os.environ.pop(ops.FORCE_REFERENCE_ENV)
            else:
                os.environ[ops.FORCE_REFERENCE_ENV] = before
    return run


def train_step(model):
    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x, c_noise, stack), target).backward()
        opt.step()
    return step


def sample_step(model):
    def step():
        with torch.no_grad():
            model(x, c_noise, stack)
    return step


def median_ms(step, steps=args.steps):
    step()  # warm-up (and, for torch.compile, compilation)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def forward_with_kernels(*a):
    return net(*a)


def forward_with_references(*a):  # a second code object, so dynamo keeps a second graph (traced with the references)
    return net(*a)


variants = {"compiled ops": (False, net), "reference ops": (True, net)}
if not args.no_compile:
    variants |= {"torch.compile + compiled ops": (False, torch.compile(forward_with_kernels)),
                 "torch.compile + reference ops": (True, torch.compile(forward_with_references))}
print(f"quickstart DiT, batch {args.batch}, {torch.get_num_threads()} threads; CPU kernels: "
      f"{torch.ops.deepfusion_ref.cpu_isa() if ops.load_extension() else 'not built'}; {args.rounds} rounds")
results = {"command": " ".join(["python", "bench/quickstart_ops.py", *sys.argv[1:]]),
           "threads": torch.get_num_threads(), "batch": args.batch, "rows": []}
for kind, make in (("train", train_step), ("sample", sample_step)):
    measure = {name: (lambda ref=ref, model=model: median_ms(with_ops(ref, make(model))))
               for name, (ref, model) in variants.items()}
    times = interleaved(measure, args.rounds)
    for name in variants:
        ratio = paired_ratios(times, name, "compiled ops")
        print(f"{kind:>6} {name:>30}: {fmt(spread(times[name]))} ms  "
              f"{'' if name == 'compiled ops' else 'time / compiled ops: ' + fmt(ratio, unit='x')}")
        results["rows"].append({"step": kind, "variant": name, "ms": spread(times[name]),
                                "time_vs_compiled_ops": ratio})
if args.json:
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
