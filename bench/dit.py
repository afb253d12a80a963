"""DeepFusionDiT vs diffusers' FluxTransformer2DModel at equal width, depth, heads and token counts, in one process.

Prints, for a sampling step (forward, no grad) and a training step (forward + backward), the median time of each
model and the ratio diffusers / ours (> 1: ours is faster), eager and optionally torch.compile'd, plus parameter
counts and, on CUDA, the training MFU (FLOPs of linears and attention, x3 for forward + backward, over the dense
bf16 peak). Flux's depth is counted in double-stream blocks (no single-stream blocks), so both have `depth`
blocks of joint attention; a Flux block also updates the text stream, which ours re-reads from the LLM instead.

    python bench/dit.py                                   # a small CPU config
    python bench/dit.py --device cuda --dtype bfloat16 --width 2048 --depth 12 --heads 16 --tokens 1024 --compile
                                                          # about 1B parameters
"""
import argparse
import math

import torch
import torch.utils.benchmark as benchmark

from deepfusion_ref.attention import grid_ids, text_ids
from deepfusion_ref.dit import DeepFusionDiT
from deepfusion_ref.text import LayerStack

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
    p.add_argument("--min-time", type=float, default=1.0)
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
    from diffusers import FluxTransformer2DModel

    flux = FluxTransformer2DModel(patch_size=1, in_channels=c * 4, num_layers=args.depth, num_single_layers=0,
                                  attention_head_dim=head_dim, num_attention_heads=args.heads,
                                  joint_attention_dim=args.width, pooled_projection_dim=args.width,
                                  axes_dims_rope=axes).to(dev)
    if dtype != torch.float32:
        ours, flux = ours.to(dtype), flux.to(dtype)

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

    count = lambda m: sum(q.numel() for q in m.parameters())  # noqa: E731
    print(f"DiT benchmark on {dev} ({torch.get_num_threads()} threads), {args.dtype}: width {args.width}, depth "
          f"{args.depth}, heads {args.heads}, {args.tokens} image + {t} text tokens, batch {b}")
    print(f"parameters: ours {count(ours) / 1e6:.2f}M, diffusers Flux (double-stream) {count(flux) / 1e6:.2f}M")
    variants = [("eager", ours, flux)]
    if args.compile:
        variants.append(("compiled", torch.compile(ours), torch.compile(flux)))
    header = f"{'variant':>9} {'step':>9} {'ours ms':>9} {'diffusers ms':>13} {'diffusers/ours':>15}"
    print(header)
    print("-" * len(header))
    for name, m_ours, m_flux in variants:
        for train in (False, True):
            t_ours = median_ms(step(run_ours, m_ours, train), args.min_time)
            t_flux = median_ms(step(run_flux, m_flux, train), args.min_time)
            print(f"{name:>9} {'train' if train else 'sample':>9} {t_ours:>9.2f} {t_flux:>13.2f} {t_flux / t_ours:>14.2f}x")
            if train and dev.type == "cuda":
                rows = lambda layer: b * (t if "text_proj" in layer or "text_kv" in layer else args.tokens)  # noqa: E731
                attn = 4 * b * args.heads * args.tokens * (args.tokens + t) * head_dim * args.depth
                flops = 3 * (linear_flops(ours, rows) + attn)
                print(f"{'':>9} ours training MFU: {flops / (t_ours / 1e3) / H100_BF16_DENSE:.1%} of 989 TFLOP/s")


if __name__ == "__main__":
    main()
