"""`attention.attend` vs PyTorch's fused `scaled_dot_product_attention`, forward + backward, in one process.

On a CPU in bfloat16, for up to `EXPLICIT_MAX_KEYS` keys, `attend` takes the explicit softmax instead of the fused
(flash) kernel. This prints the fused and the explicit path's times and the ratio fused / explicit (> 1: the explicit
path is faster) at the quickstart's sizes (batch 32, 4 heads of 32 channels, 64 image queries over 12 text + 64 image
keys) and at longer sequences, where the fused kernel wins back: the crossover behind `EXPLICIT_MAX_KEYS`. The last
column is the path `attend` picks by default.

    python bench/attention.py
    python bench/attention.py --dtype float32     # float32: attend always picks the fused kernel
"""
import argparse

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark

from deepfusion_ref.attention import EXPLICIT_MAX_KEYS, attend


def median_ms(fn, min_time: float) -> float:
    fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_time).median * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--text-tokens", type=int, default=12)
    p.add_argument("--queries", default="64,128,192,256,512", help="image tokens (queries; keys = text + image)")
    p.add_argument("--min-time", type=float, default=1.0)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"{args.dtype}, batch {args.batch}, {args.heads} heads x {args.head_dim}, {torch.get_num_threads()} threads")
    print("queries  keys   fused ms  explicit ms  fused / explicit  attend picks")
    for n in (int(x) for x in args.queries.split(",")):
        m = n + args.text_tokens
        torch.manual_seed(0)
        q = torch.randn(args.batch, args.heads, n, args.head_dim, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(args.batch, args.heads, m, args.head_dim, dtype=dtype, requires_grad=True)
                for _ in range(2))
        mask = torch.ones(args.batch, 1, 1, m, dtype=torch.bool)
        mask[1::2, ..., args.text_tokens // 2:args.text_tokens] = False  # every other prompt is padded

        def fused():
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask).float().square().mean().backward()

        def explicit():
            attend(q, k, v, mask, explicit=True)[0].float().square().mean().backward()

        t_fused, t_explicit = median_ms(fused, args.min_time), median_ms(explicit, args.min_time)
        picks = "explicit" if attend(q, k, v, mask)[1] is not None else "fused"
        print(f"{n:7d} {m:5d} {t_fused:10.2f} {t_explicit:12.2f} {t_fused / t_explicit:17.2f}  {picks}")


if __name__ == "__main__":
    main()
