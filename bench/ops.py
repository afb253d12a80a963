"""Benchmark of the compiled ops against PyTorch, in one process: dynamic thresholding, then the DiT's
adaln_norm and rope, and the U-Net's group_norm_silu (forward, and forward+backward, vs the eager and
torch.compile'd references).

For each op and size it prints the median time of the compiled kernel and, as ratios (baseline time / kernel
time, so > 1 means the kernel is faster):
  - quantile: the torch.quantile path that imagen-pytorch and diffusers use for dynamic thresholding;
  - reference: the package's pure-PyTorch reference (eager);
  - compiled: torch.compile (inductor) of that reference;
  - copy: a tensor copy (one read + one write, i.e. reading the tensor twice at copy bandwidth); the GPU goal
    is kernel <= 2x copy, i.e. this ratio >= 0.5.

    python bench/ops.py                      # CPU sizes
    python bench/ops.py --device cuda        # GPU sizes
    python bench/ops.py --sizes 16x3x256x256 --min-time 1
"""
import argparse
import json
import os
import platform
import sys

import torch
import torch.utils.benchmark as benchmark

from deepfusion_ref import ops

DEFAULT_SIZES = {
    "cpu": ["16x3x64x64", "16x3x256x256", "1x3x1024x1024", "4x3x1024x1024"],
    "cuda": ["16x3x256x256", "4x3x1024x1024", "1x3x2048x2048", "1x16x2048x2048"],
}
QUANTILE_LIMIT = 2**24  # torch.quantile refuses more elements than this


def quantile_path(x: torch.Tensor, percentile: float = 0.995) -> torch.Tensor:
    "Dynamic thresholding as imagen-pytorch writes it: torch.quantile, clamp, divide."
    # torch.quantile takes float32/float64 only: half-precision inputs are upcast, as such code has to
    s = torch.quantile(x.abs().reshape(x.shape[0], -1).float(), percentile, dim=-1)
    s = s.clamp(min=1.0).view(-1, *([1] * (x.dim() - 1)))
    return (x.clamp(-s, s) / s).to(x.dtype)


def median_ms(fn, x, min_time: float) -> float:
    fn(x)  # warm-up (and compilation for torch.compile)
    # Timer runs on one thread unless told otherwise; measure with torch's current thread count.
    timer = benchmark.Timer(stmt="fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_time).median * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--sizes", nargs="*", help="shapes like 16x3x256x256 (default: per device)")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per measurement")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--crossover", action="store_true",
                        help="group_norm_silu at small sizes too, around the crossover where impl='auto' switches")
    parser.add_argument("--only", choices=["group_norm", "dit"],
                        help="run only the group_norm_silu or the DiT ops' rows")
    args = parser.parse_args()
    if not ops.kernel_available("dynamic_threshold", args.device):
        raise SystemExit(f"no compiled dynamic_threshold kernel for {args.device}: build the extension first")

    dtype = getattr(torch, args.dtype)
    if args.device == "cpu":  # both sides pick their instruction set at run time; ATEN_CPU_CAPABILITY caps both
        print(f"CPU kernels: {torch.ops.deepfusion_ref.cpu_isa()}; torch: {torch.backends.cpu.get_cpu_capability()}; "
              f"{torch.get_num_threads()} threads\n")
    if args.only:
        rows = {"group_norm": bench_group_norm, "dit": bench_dit_ops}[args.only](args, dtype)
        write_json(args, rows)
        return
    kernel = lambda x: ops.dynamic_threshold(x, 0.995, None, impl="extension")[0]  # noqa: E731
    reference = lambda x: ops.dynamic_threshold_reference(x, 0.995, None)[0]  # noqa: E731
    compiled = None if args.no_compile else torch.compile(reference)
    copy = lambda x: x.clone()  # noqa: E731

    print(f"dynamic_threshold on {args.device} ({torch.get_num_threads()} threads), {args.dtype}, "
          f"torch {torch.__version__}; ratio = baseline time / kernel time")
    header = f"{'size':>16} {'kernel ms':>10} {'vs quantile':>12} {'vs reference':>13} {'vs compiled':>12} {'vs copy':>8}"
    print(header)
    print("-" * len(header))
    rows = []
    for size in args.sizes or DEFAULT_SIZES[args.device]:
        shape = tuple(int(d) for d in size.split("x"))
        x = (torch.randn(shape, device=args.device) * 3).to(dtype)
        row = {"op": "dynamic_threshold", "size": size, "device": args.device, "dtype": args.dtype}
        row["kernel_ms"] = median_ms(kernel, x, args.min_time)
        if x[0].numel() <= QUANTILE_LIMIT:
            row["quantile_ms"] = median_ms(quantile_path, x, args.min_time)
        row["reference_ms"] = median_ms(reference, x, args.min_time)
        if compiled is not None:
            row["compiled_ms"] = median_ms(compiled, x, args.min_time)
        row["copy_ms"] = median_ms(copy, x, args.min_time)
        rows.append(row)

        def ratio(key):
            return f"{row[key] / row['kernel_ms']:.2f}x" if key in row else "n/a"

        print(f"{size:>16} {row['kernel_ms']:>10.3f} {ratio('quantile_ms'):>12} {ratio('reference_ms'):>13} "
              f"{ratio('compiled_ms'):>12} {ratio('copy_ms'):>8}")
    rows += bench_dit_ops(args, dtype)
    rows += bench_group_norm(args, dtype)
    write_json(args, rows)


def write_json(args, rows):
    "The rows and what they were measured with (command, instruction sets, threads, versions)."
    if not args.json:
        return
    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    command = " ".join([f"ATEN_CPU_CAPABILITY={cap}"] * bool(cap) + ["python", "bench/ops.py", *sys.argv[1:]])
    config = {"command": command, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "device": args.device, "dtype": args.dtype,
              "min_time_s": args.min_time, "processor": platform.processor() or platform.machine()}
    if args.device == "cpu":
        config |= {"kernel_isa": torch.ops.deepfusion_ref.cpu_isa(),
                   "torch_isa": torch.backends.cpu.get_cpu_capability(),
                   "group_norm_cpu_min_elements": ops.GROUP_NORM_CPU_MIN_ELEMENTS}
    with open(args.json, "w") as f:
        json.dump({"config": config, "rows": rows}, f, indent=1)


DIT_SIZES = {"cpu": [(4, 256, 384, 6), (2, 1024, 768, 12)], "cuda": [(4, 1024, 1536, 24), (2, 4096, 3072, 24)]}


def bench_dit_ops(args, dtype):
    "adaln_norm and rope, forward and forward+backward, vs the eager and compiled references."
    device = args.device
    print(f"\nDiT ops on {device}, {args.dtype}: batch x tokens x width (heads); ratio = baseline / kernel")
    header = f"{'op':>12} {'size':>18} {'pass':>8} {'kernel ms':>10} {'vs reference':>13} {'vs compiled':>12}"
    print(header)
    print("-" * len(header))
    rows = []
    for b, n, d, heads in DIT_SIZES[device]:
        x = torch.randn(b, n, d, device=device, dtype=dtype, requires_grad=True)
        shift = torch.randn(b, d, device=device, dtype=dtype, requires_grad=True)
        scale = torch.randn(b, d, device=device, dtype=dtype, requires_grad=True)
        q = torch.randn(b, heads, n, d // heads, device=device, dtype=dtype, requires_grad=True)
        angles = torch.rand(n, d // heads // 2, device=device) * 10
        cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
        cases = {
            "adaln_norm": (lambda impl: (lambda t: ops.adaln_norm(t, shift, scale, impl=impl)), x,
                           lambda t: ops.adaln_norm_reference(t, shift, scale)),
            "rope": (lambda impl: (lambda t: ops.rope(t, cos, sin, impl=impl)), q,
                     lambda t: ops.rope_reference(t, cos, sin)),
        }
        for name, (make, inp, reference) in cases.items():
            compiled = None if args.no_compile else torch.compile(reference)
            for pass_ in ("fwd", "fwd+bwd"):
                def timed(fn):
                    if pass_ == "fwd":
                        return lambda t: fn(t.detach())
                    return lambda t: fn(t).sum().backward()
                row = {"op": name, "size": f"{b}x{n}x{d}", "pass": pass_, "device": device, "dtype": args.dtype}
                row["kernel_ms"] = median_ms(timed(make("extension")), inp, args.min_time)
                row["reference_ms"] = median_ms(timed(reference), inp, args.min_time)
                if compiled is not None:
                    row["compiled_ms"] = median_ms(timed(compiled), inp, args.min_time)
                rows.append(row)
                ratio = lambda k: f"{row[k] / row['kernel_ms']:.2f}x" if k in row else "n/a"  # noqa: E731
                print(f"{name:>12} {row['size']:>18} {pass_:>8} {row['kernel_ms']:>10.3f} {ratio('reference_ms'):>13} "
                      f"{ratio('compiled_ms'):>12}")
    return rows


# The U-Nets' sizes: the quickstart's and imagen-pytorch's 64x64 stages (8x128x32x32, 4x256x16x16, 4x64x64x64) and a
# 256-channel 64x64 block.
GROUP_NORM_SIZES = {"cpu": [(8, 128, 32, 32), (4, 256, 16, 16), (4, 64, 64, 64), (4, 256, 64, 64)],
                    "cuda": [(8, 128, 32, 32), (4, 256, 64, 64), (16, 512, 64, 64)]}


# Below and around ops.GROUP_NORM_CPU_MIN_ELEMENTS (2^19): where impl="auto" switches from reference to kernel.
GROUP_NORM_CROSSOVER_SIZES = [(2, 64, 8, 8), (4, 128, 8, 8), (2, 32, 32, 32), (4, 128, 16, 16), (8, 64, 16, 16),
                              (1, 64, 64, 64), (2, 128, 32, 32), (2, 64, 64, 64), (4, 128, 32, 32)]


def bench_group_norm(args, dtype, groups=32):
    "group_norm_silu with weight, bias and FiLM scale/shift vs F.silu(F.group_norm(x) * (1 + s) + t), both layouts."
    device = args.device
    sizes = GROUP_NORM_SIZES[device]
    if getattr(args, "crossover", False):
        sizes = GROUP_NORM_CROSSOVER_SIZES + sizes
    print(f"\ngroup_norm_silu on {device}, {args.dtype}, {groups} groups, with FiLM; ratio = baseline / kernel; "
          f"auto: the path impl='auto' takes")
    header = (f"{'layout':>14} {'size':>16} {'pass':>8} {'kernel ms':>10} {'vs eager':>9} {'vs compiled':>12} "
              f"{'auto':>10}")
    print(header)
    print("-" * len(header))
    rows = []
    F = torch.nn.functional

    def eager(x, w, b, s, t):
        return F.silu(F.group_norm(x, groups, w, b) * (1 + s[:, :, None, None]) + t[:, :, None, None])

    for size in sizes:
        # dynamo's cache starts empty per size: shared, it would hit its recompile limit and run eager
        torch._dynamo.reset()
        compiled = None if args.no_compile else torch.compile(eager)
        n, c = size[:2]
        w, b = (torch.randn(c, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        s, t = (torch.randn(n, c, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        for layout in ("contiguous", "channels_last"):
            x = torch.randn(size, device=device, dtype=dtype)
            x = x.to(memory_format=getattr(torch, layout + "_format" if layout == "contiguous" else layout))
            x.requires_grad_()
            for pass_ in ("fwd", "fwd+bwd"):
                def timed(fn):
                    if pass_ == "fwd":
                        return lambda u: fn(u.detach(), w, b, s, t)
                    return lambda u: fn(u, w, b, s, t).sum().backward()
                kernel = lambda u, *p: ops.group_norm_silu(u, p[0], p[1], groups, p[2], p[3], impl="extension")  # noqa: E731
                row = {"op": "group_norm_silu", "size": "x".join(map(str, size)), "layout": layout, "pass": pass_,
                       "device": device, "dtype": args.dtype,
                       "auto": "kernel" if ops.group_norm_silu_uses_kernel(x) else "reference"}
                row["kernel_ms"] = median_ms(timed(kernel), x, args.min_time)
                row["eager_ms"] = median_ms(timed(eager), x, args.min_time)
                if compiled is not None:
                    row["compiled_ms"] = median_ms(timed(compiled), x, args.min_time)
                rows.append(row)
                ratio = lambda k: f"{row[k] / row['kernel_ms']:.2f}x" if k in row else "n/a"  # noqa: E731
                print(f"{layout:>14} {row['size']:>16} {pass_:>8} {row['kernel_ms']:>10.3f} {ratio('eager_ms'):>9} "
                      f"{ratio('compiled_ms'):>12} {row['auto']:>10}")
    return rows


if __name__ == "__main__":
    main()
