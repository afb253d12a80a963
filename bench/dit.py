"""DeepFusionDiT vs diffusers' FluxTransformer2DModel at equal width, depth, heads and token counts, in one process.

Prints, for a sampling step (forward, no grad) and a training step (forward + backward), the median time of each
model and the ratio diffusers / ours (> 1: ours is faster), eager and optionally torch.compile'd, plus parameter
counts and, on CUDA, the training MFU (FLOPs of linears and attention, x3 for forward + backward, over the dense
bf16 peak). Flux's depth is counted in double-stream blocks (no single-stream blocks), so both have `depth`
blocks of joint attention; a Flux block also updates the text stream, which ours re-reads from the LLM instead.

Also diffusers' SanaTransformer2DModel (linear attention, Mix-FFN) at the same width and heads. Each diffusers model
is also built at the depth whose parameter count is closest to ours ("equal parameters"). Timings are interleaved
over --rounds rounds (bench/timing.py) and reported as median [min-max] of each round's ratio.

    python bench/dit.py                                   # a small CPU config
    python bench/dit.py --device cuda --dtype bfloat16 --width 2048 --depth 12 --heads 16 --tokens 1024 --compile
                                                          # about 1B parameters
"""
import argparse
import json
import math
import sys

import torch
import torch.utils.benchmark as benchmark

from deepfusion_ref.attention import grid_ids, text_ids
from deepfusion_ref.dit import DeepFusionDiT
from deepfusion_ref.text import LayerStack
from timing import fmt, interleaved, paired_ratios, spread

H100_BF16_DENSE = 989e12


def median_ms(fn, min_time: float) -> float:
    fn()
    fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_time).median * 1e3


def linear_flops(model: torch.nn.Module, rows_of) -> float:
    "2 * in * out * rows summed over the model's Linear layers; rows_of(name) gives each layer's row count."
    return sum(2 * m.in_features * m.out_features * rows_of(name)
               for name, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256, help="image tokens (a square grid)")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also compare torch.compile'd models")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per model per round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median and min-max are reported)")
    p.add_argument("--json", help="also write the results (with this command) to this file")
    args = p.parse_args()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    side = int(math.isqrt(args.tokens))
    if side * side != args.tokens:
        raise SystemExit(f"--tokens must be a square number, got {args.tokens}")
    head_dim = args.width // args.heads
    axes = (head_dim - 2 * (3 * head_dim // 8), 3 * head_dim // 8, 3 * head_dim // 8)
    b, t, c = args.batch, args.text_tokens, 16

    torch.manual_seed(0)
    ours = DeepFusionDiT(in_channels=c, patch_size=2, hidden_size=args.width, depth=args.depth, num_heads=args.heads,
                         text_dim=args.width, num_llm_layers=args.depth, rope_axes=axes, long_skips=False,
                         fusion="deep").to(dev)
    from diffusers import FluxTransformer2DModel, SanaTransformer2DModel

    def make_flux(depth):
        return FluxTransformer2DModel(patch_size=1, in_channels=c * 4, num_layers=depth, num_single_layers=0,
                                      attention_head_dim=head_dim, num_attention_heads=args.heads,
                                      joint_attention_dim=args.width, pooled_projection_dim=args.width,
                                      axes_dims_rope=axes)

    def make_sana(depth):
        return SanaTransformer2DModel(in_channels=c, out_channels=c, num_attention_heads=args.heads,
                                      attention_head_dim=head_dim, num_layers=depth,
                                      num_cross_attention_heads=args.heads, cross_attention_head_dim=head_dim,
                                      cross_attention_dim=args.width, caption_channels=args.width,
                                      sample_size=2 * side, patch_size=2)

    count = lambda m: sum(q.numel() for q in m.parameters())  # noqa: E731

    def equal_params_depth(make):
        "The depth whose parameter count is closest to ours (counted on the meta device)."
        with torch.device("meta"):
            return min(range(1, 4 * args.depth + 1), key=lambda d: abs(count(make(d)) - count(ours)))

    flux_depth, sana_depth = equal_params_depth(make_flux), equal_params_depth(make_sana)
    torch.manual_seed(0)
    flux, sana = make_flux(args.depth).to(dev), make_sana(args.depth).to(dev)
    flux_eq, sana_eq = make_flux(flux_depth).to(dev), make_sana(sana_depth).to(dev)
    if dtype != torch.float32:
        ours, flux, sana, flux_eq, sana_eq = (m.to(dtype) for m in (ours, flux, sana, flux_eq, sana_eq))

    latents = torch.randn(b, c, 2 * side, 2 * side, device=dev, dtype=dtype)
    stack = LayerStack(torch.randn(args.depth, b, t, args.width, device=dev, dtype=dtype),
                       torch.ones(b, t, dtype=torch.bool, device=dev))
    c_noise = torch.rand(b, device=dev)
    packed = torch.randn(b, args.tokens, c * 4, device=dev, dtype=dtype)
    text = torch.randn(b, t, args.width, device=dev, dtype=dtype)
    pooled = torch.randn(b, args.width, device=dev, dtype=dtype)
    img_ids, txt_ids = grid_ids(side, side, dev).float(), text_ids(t, False, dev).float()

    def run_ours(model):
        return model(latents, c_noise, stack)

    def run_flux(model):
        return model(hidden_states=packed, encoder_hidden_states=text, pooled_projections=pooled, timestep=c_noise,
                     img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]

    text_mask = torch.ones(b, t, dtype=torch.bool, device=dev)

    def run_sana(model):
        return model(hidden_states=latents, encoder_hidden_states=text, timestep=c_noise,
                     encoder_attention_mask=text_mask, return_dict=False)[0]

    def step(run, model, train):
        def fn():
            if train:
                run(model).float().square().mean().backward()
            else:
                with torch.no_grad():
                    run(model)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        return fn

    print(f"DiT benchmark on {dev} ({torch.get_num_threads()} threads), {args.dtype}: width {args.width}, depth "
          f"{args.depth}, heads {args.heads}, {args.tokens} image + {t} text tokens, batch {b}; {args.rounds} rounds")
    contenders = {"ours": (run_ours, ours), f"flux depth {args.depth}": (run_flux, flux),
                  f"sana depth {args.depth}": (run_sana, sana)}
    for kind, depth, run, model in (("flux", flux_depth, run_flux, flux_eq), ("sana", sana_depth, run_sana, sana_eq)):
        if depth != args.depth:  # else the equal-depth model is already the equal-parameter one
            contenders[f"{kind} depth {depth} (equal params)"] = (run, model)
    for name, (_, model) in contenders.items():
        print(f"parameters: {name}: {count(model) / 1e6:.2f}M")
    results = {"command": " ".join(["python", "bench/dit.py", *sys.argv[1:]]), "threads": torch.get_num_threads(),
               "parameters": {name: count(model) for name, (_, model) in contenders.items()}, "rows": []}
    variants = [("eager", {name: (run, model) for name, (run, model) in contenders.items()})]
    if args.compile:
        variants.append(("compiled", {name: (run, torch.compile(model)) for name, (run, model) in contenders.items()}))
    header = f"{'variant':>9} {'step':>7} {'contender':>30} {'ms median [min-max]':>24} {'contender/ours':>22}"
    print(header)
    print("-" * len(header))
    for variant, models in variants:
        for train in (False, True):
            fns = {name: step(run, model, train) for name, (run, model) in models.items()}
            times = interleaved({name: (lambda fn=fn: median_ms(fn, args.min_time)) for name, fn in fns.items()},
                                args.rounds)
            for name in fns:
                ratio = paired_ratios(times, name, "ours")
                print(f"{variant:>9} {'train' if train else 'sample':>7} {name:>30} {fmt(spread(times[name])):>24} "
                      f"{'' if name == 'ours' else fmt(ratio, unit='x'):>22}")
                results["rows"].append({"variant": variant, "step": "train" if train else "sample", "model": name,
                                        "ms": spread(times[name]), "time_vs_ours": ratio})
            if train and dev.type == "cuda":
                rows = lambda layer: b * (t if "text_proj" in layer or "text_kv" in layer else args.tokens)  # noqa: E731
                attn = 4 * b * args.heads * args.tokens * (args.tokens + t) * head_dim * args.depth
                flops = 3 * (linear_flops(ours, rows) + attn)
                t_ours = spread(times["ours"])["median"]
                print(f"{'':>9} ours training MFU: {flops / (t_ours / 1e3) / H100_BF16_DENSE:.1%} of 989 TFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
