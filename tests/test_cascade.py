"""The cascade: SR stages depend on the low-res input and the augmentation level, noise augmentation touches only
the condition (stub network), crop-trained stages run at full size (exact tiling equivariance with circular
padding), and the pipeline runs every stage with per-stage guidance and thresholding."""
import pytest
import torch

from deepfusion_ref.cascade import (CascadePipeline, SRCondition, SRPrecond, augment_low_res, resize_images,
                                    sr_edm_loss)
from deepfusion_ref.schedules import EDMPrecond, edm_loss_weight
from deepfusion_ref.unet import EfficientUNet, UNet, random_text

TEXT_DIM = 16


def sr_net(seed=0, cls=EfficientUNet, **overrides):
    torch.manual_seed(seed)
    cfg = dict(in_channels=6, channels=(8, 16), self_attn_levels=(), cross_attn_levels=(1,), mid_attention=False,
               text_dim=TEXT_DIM, head_dim=8, aug_embed=True)
    cfg.update(overrides)
    cfg.setdefault("num_res_blocks", (1, 1) if cls is EfficientUNet else 1)
    net = cls(**cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


def test_sr_output_depends_on_low_res_and_aug_level():
    stage = SRPrecond(sr_net())
    x, sigma, text = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 1.0]), random_text(2, TEXT_DIM)
    lr = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        base = stage(x, sigma, SRCondition(text, lr, torch.tensor([0.2, 0.2])))
        other_lr = stage(x, sigma, SRCondition(text, lr + 0.5, torch.tensor([0.2, 0.2])))
        other_aug = stage(x, sigma, SRCondition(text, lr, torch.tensor([0.6, 0.6])))
    assert (base - other_lr).abs().max() > 1e-3
    assert (base - other_aug).abs().max() > 1e-3


class RecordingStage:
    "A stub denoiser that records what it is given and returns zeros."

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, cond):
        self.calls.append((x, sigma, cond))
        return torch.zeros_like(x)


@pytest.mark.parametrize("aug_kind,levels", [("edm", [0.0, 0.7]), ("edm", [2.0, 5.0]), ("vp", [0.3, 1.0])])
def test_augmentation_touches_only_the_condition(aug_kind, levels):
    g = torch.Generator().manual_seed(0)
    x_hr, x_lr = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    stub = RecordingStage()
    loss = sr_edm_loss(stub, x_hr, x_lr, None, aug_level=torch.tensor(levels), aug_kind=aug_kind,
                       generator=torch.Generator().manual_seed(1))
    (x_noisy, sigma, cond), = stub.calls
    # The stub returns 0, so the loss is lambda(sigma) * mean(target^2) per sample: the target is the clean x_hr.
    expected = (edm_loss_weight(sigma) * x_hr.square().flatten(1).mean(1)).mean()
    torch.testing.assert_close(loss, expected)
    # The noisy input is the clean x_hr plus Gaussian noise of the *training* sigma, independent of the aug level.
    noise = (x_noisy - x_hr) / sigma.view(-1, 1, 1, 1)
    assert abs(noise.std().item() - 1) < 0.2
    # The condition is the up-sampled low-res image, corrupted exactly at the given level.
    up = resize_images(x_lr, (16, 16))
    torch.testing.assert_close(cond.aug_level, torch.tensor(levels))
    if aug_kind == "edm":
        stds = (cond.low_res - up).flatten(1).std(1)
        assert torch.allclose(stds, torch.tensor(levels), atol=0.2 * max(levels) + 1e-6), stds
        if levels[0] == 0:
            torch.testing.assert_close(cond.low_res[0], up[0])
    else:
        assert cond.low_res[1].sub(up[1]).abs().mean() > 0.5  # level 1: pure noise


def test_augment_low_res_forms():
    x, n = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    lv = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(augment_low_res(x, lv, "edm", noise=n), x + lv.view(-1, 1, 1, 1) * n)
    vp = augment_low_res(x, lv, "vp", noise=n)
    torch.testing.assert_close(vp[0], x[0])
    torch.testing.assert_close(vp[2], n[2], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="aug_level"):
        augment_low_res(x, 1.5, "vp")
    with pytest.raises(ValueError, match="kind"):
        augment_low_res(x, 0.1, "ddpm")


def test_crop_trained_stage_runs_on_full_images():
    stage = SRPrecond(sr_net())
    # a few training steps on 16x16 crops of 32x32 pairs
    opt = torch.optim.SGD(stage.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x_hr = torch.randn(2, 3, 32, 32, generator=g)
        loss = sr_edm_loss(stage, x_hr, resize_images(x_hr, 16), crop_size=16, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = stage(torch.randn(1, 3, 64, 48), 1.0, SRCondition(None, torch.randn(1, 3, 64, 48), torch.tensor([0.2])))
    assert out.shape == (1, 3, 64, 48) and torch.isfinite(out).all()


@pytest.mark.parametrize("cls", [EfficientUNet, UNet])
def test_fully_convolutional_tiling_equivariance(cls):
    "With circular padding, the network on a 2x2 tiling of a crop equals the 2x2 tiling of its output on the crop."
    net = sr_net(cls=cls, padding_mode="circular")
    g = torch.Generator().manual_seed(0)
    crop = torch.randn(1, 6, 16, 16, generator=g)
    text = random_text(1, TEXT_DIM)
    with torch.no_grad():
        small = net(crop, torch.tensor([0.3]), text, aug_level=0.2)
        big = net(crop.repeat(1, 1, 2, 2), torch.tensor([0.3]), text, aug_level=0.2)
    torch.testing.assert_close(big, small.repeat(1, 1, 2, 2), atol=1e-5, rtol=1e-4)


def test_cascade_pipeline_runs_all_stages():
    torch.manual_seed(0)
    base = EDMPrecond(EfficientUNet(channels=(8, 16), num_res_blocks=(1, 1), self_attn_levels=(1,),
                                    cross_attn_levels=(1,), text_dim=TEXT_DIM, head_dim=8))
    sr = SRPrecond(sr_net())
    pipe = CascadePipeline([base, sr, sr], [8, 16, (32, 24)])
    cond, uncond = random_text(2, TEXT_DIM), random_text(2, TEXT_DIM, seed=5)
    kw = dict(num_inference_steps=[2, 2, 1], guidance_scale=[1.0, 3.0, 2.0],
              thresholding=["none", "static", "dynamic"], aug_level=[0.2, 0.1])
    out = pipe(cond, uncond, generator=torch.Generator().manual_seed(0), **kw)
    assert [tuple(i.shape) for i in out.images] == [(2, 3, 8, 8), (2, 3, 16, 16), (2, 3, 32, 24)]
    again = pipe(cond, uncond, generator=torch.Generator().manual_seed(0), **kw)
    for a, b in zip(out.images, again.images):
        torch.testing.assert_close(a, b)  # the generator makes the cascade reproducible
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(cond, uncond, guidance_scale=[1.0, 2.0])
    with pytest.raises(ValueError, match="batch_size"):
        pipe(None)
