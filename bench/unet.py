"""Efficient U-Net vs the standard U-Net at equal parameter count, and vs diffusers' UNet2DConditionModel (Stable
Diffusion's U-Net, cross-attention to the text in its inner levels) at equal parameters: train-step throughput and
peak memory, timed in interleaved rounds (bench/timing.py).

    python bench/unet.py --device cpu --sizes 64 256 --batch 2 --steps 3 --rounds 3

Prints, per size, each model's img/s and memory as median [min-max] over rounds, and the ratios
Efficient / other per round (throughput > 1 and memory < 1 mean the Efficient U-Net is better). Memory:
torch.cuda.max_memory_allocated on a GPU; on the CPU parameters + gradients + AdamW state + the activations autograd
saves for backward (measure.measure_train_step), which does not vary between rounds.
"""
import argparse
import json
import sys
from types import SimpleNamespace

import torch
from torch import nn

from deepfusion_ref.measure import measure_train_step
from deepfusion_ref.unet import EfficientUNet, UNet, count_parameters, matched_configs
from timing import fmt, interleaved, paired_ratios, spread


class DiffusersUNet(nn.Module):
    "diffusers' UNet2DConditionModel behind measure_train_step's interface: (x, c_noise, LayerStack, aug) -> output."

    def __init__(self, width: int, text_dim: int, in_channels: int = 3):
        super().__init__()
        from diffusers import UNet2DConditionModel

        # SD's blocks at laboratory width: 4 levels (1, 2, 4, 4) x width, two res blocks each, attention (self and
        # cross) where ours has it, at the two lowest resolutions and the middle: SD's own placement, from the second
        # level down, would attend over 128x128 tokens at 256x256 pixels (SD runs on 64x64 latents). Groups of 8
        # channels, so that any multiple of 8 is a valid width.
        self.unet = UNet2DConditionModel(
            in_channels=in_channels, out_channels=3, block_out_channels=(width, 2 * width, 4 * width, 4 * width),
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            layers_per_block=2, cross_attention_dim=text_dim, attention_head_dim=8, norm_num_groups=8)
        self.config = SimpleNamespace(in_channels=in_channels, out_channels=3, text_dim=text_dim, aug_embed=False)

    def forward(self, x, c_noise, text, aug=None):
        return self.unet(x, c_noise, encoder_hidden_states=text.hidden[-1], encoder_attention_mask=text.mask,
                         return_dict=False)[0]


def diffusers_width(target: int, text_dim: int) -> int:
    "The width (a multiple of 8) whose UNet2DConditionModel parameter count is closest to target."
    with torch.device("meta"):
        return min(range(8, 257, 8), key=lambda w: abs(count_parameters(DiffusersUNet(w, text_dim)) - target))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model per round (the median is kept)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--width", type=int, default=32, help="Efficient U-Net base width (the others are matched)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-diffusers", action="store_true", help="leave out diffusers' UNet2DConditionModel")
    parser.add_argument("--json", help="also write the results (with this command) to this file")
    args = parser.parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # not the per-call "modules to keep in float32" notice of ModelMixin.to
    dtype = getattr(torch, args.dtype)
    eff_cfg, std_cfg = matched_configs(args.width)
    torch.manual_seed(0)
    models = {"efficient": EfficientUNet(**eff_cfg), "standard": UNet(**std_cfg)}
    if not args.no_diffusers:
        width = diffusers_width(count_parameters(models["efficient"]), eff_cfg["text_dim"])
        models["diffusers"] = DiffusersUNet(width, eff_cfg["text_dim"])
    for name, model in models.items():
        print(f"{name:>10}: {count_parameters(model) / 1e6:6.2f}M parameters")
    results = {"command": " ".join(["python", "bench/unet.py", *sys.argv[1:]]), "threads": torch.get_num_threads(),
               "parameters": {name: count_parameters(m) for name, m in models.items()}, "rows": []}
    for size in args.sizes:
        last = {}

        def measure(name, size=size):
            last[name] = measure_train_step(models[name], size, args.batch, args.steps, args.device, dtype,
                                            args.channels_last)
            return last[name]["images_per_s"]

        speed = interleaved({name: (lambda name=name: measure(name)) for name in models}, args.rounds)
        row = {"size": size, "images_per_s": {n: spread(v) for n, v in speed.items()},
               "peak_bytes": {n: last[n]["peak_bytes"] for n in models},
               "activation_bytes": {n: last[n]["activation_bytes"] for n in models}, "ratios": {}}
        for name in models:
            mib = lambda key: row[key][name] / 2**20  # noqa: E731
            print(f"{size:>5} {name:>10}: {fmt(row['images_per_s'][name])} img/s  peak {mib('peak_bytes'):9.1f} MiB  "
                  f"activations {mib('activation_bytes'):9.1f} MiB")
        for other in [n for n in models if n != "efficient"]:
            ratio = paired_ratios(speed, "efficient", other)
            over = lambda key: row[key]["efficient"] / row[key][other]  # noqa: E731
            r = row["ratios"][other] = {"throughput": ratio, "peak_memory": over("peak_bytes"),
                                        "activation_memory": over("activation_bytes")}
            print(f"{size:>5} efficient/{other}: throughput {fmt(ratio, unit='x')}, peak memory "
                  f"x{r['peak_memory']:.2f}, activation memory x{r['activation_memory']:.2f}")
        results["rows"].append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
