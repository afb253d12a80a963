"""Efficient U-Net vs the standard U-Net at equal parameter count: train-step throughput and peak memory.

    python bench/unet.py --device cpu --sizes 64 256 --batch 2 --steps 3

Prints, per size, each model's img/s and memory and the ratios Efficient / standard (throughput > 1 and memory < 1
mean the Efficient U-Net is better). Memory: torch.cuda.max_memory_allocated on a GPU; on the CPU parameters +
gradients + AdamW state + the activations autograd saves for backward (measure.measure_train_step).
"""
import argparse
import json

import torch

from deepfusion_ref.measure import measure_train_step
from deepfusion_ref.unet import EfficientUNet, UNet, count_parameters, matched_configs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--width", type=int, default=32, help="Efficient U-Net base width (the standard is matched)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    eff_cfg, std_cfg = matched_configs(args.width)
    rows = []
    for size in args.sizes:
        result = {}
        for name, cls, cfg in [("efficient", EfficientUNet, eff_cfg), ("standard", UNet, std_cfg)]:
            torch.manual_seed(0)
            model = cls(**cfg)
            result[name] = measure_train_step(model, size, args.batch, args.steps, args.device, dtype,
                                              args.channels_last)
            print(f"{size:>5} {name:>9}: {count_parameters(model) / 1e6:6.2f}M params  "
                  f"{result[name]['images_per_s']:8.2f} img/s  peak {result[name]['peak_bytes'] / 2**20:9.1f} MiB  "
                  f"activations {result[name]['activation_bytes'] / 2**20:9.1f} MiB", flush=True)
            del model
        e, s = result["efficient"], result["standard"]
        ratios = dict(throughput=e["images_per_s"] / s["images_per_s"], peak_memory=e["peak_bytes"] / s["peak_bytes"],
                      activation_memory=e["activation_bytes"] / s["activation_bytes"])
        print(f"{size:>5} efficient/standard: throughput x{ratios['throughput']:.2f}, peak memory "
              f"x{ratios['peak_memory']:.2f}, activation memory x{ratios['activation_memory']:.2f}")
        rows.append(dict(size=size, ratios=ratios, **result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
