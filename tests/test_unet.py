"""Efficient and standard U-Nets: shapes on square and non-square grids, size errors, the down-before/up-after
ordering (hooks), skip scaling, FiLM and text dependence, channels_last, gradient checkpointing, equal parameter
counts of the compared configs, and the save/load round trip."""
import pytest
import torch

from deepfusion_ref.schedules import EDMPrecond
from deepfusion_ref.text import LayerStack
from deepfusion_ref.measure import measure_train_step, saved_activation_bytes
from deepfusion_ref.unet import (EfficientUNet, UNet, count_parameters, efficient_config, matched_configs, random_text,
                                 standard_config)

TEXT_DIM = 16
SMALL = dict(channels=(8, 16, 16), self_attn_levels=(2,), cross_attn_levels=(1, 2), text_dim=TEXT_DIM, head_dim=8)


def randomize(model, seed=0, std=0.05):
    "Move away from the zero initialisation so every path influences the output."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def make(kind, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(SMALL, **overrides)
    if kind == "efficient":
        cfg.setdefault("num_res_blocks", (1, 1, 2))
        return randomize(EfficientUNet(**cfg), seed)
    cfg.setdefault("num_res_blocks", 1)
    return randomize(UNet(**cfg), seed)


def text(batch=2, seed=1):
    return random_text(batch, TEXT_DIM, length=5, seed=seed)


@pytest.mark.parametrize("kind", ["efficient", "standard"])
@pytest.mark.parametrize("hw", [(32, 32), (64, 64), (32, 64), (24, 8)])
def test_shapes(kind, hw):
    model = make(kind)
    with torch.no_grad():
        out = model(torch.randn(2, 3, *hw), torch.randn(2), text())
    assert out.shape == (2, 3, *hw) and torch.isfinite(out).all()


@pytest.mark.parametrize("kind,multiple", [("efficient", 8), ("standard", 4)])
def test_bad_sizes_name_valid_ones(kind, multiple):
    model = make(kind)
    assert model.size_multiple == multiple
    with pytest.raises(ValueError, match=f"multiples of {multiple}"):
        model(torch.randn(1, 3, 30, 32), torch.zeros(1), None)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 4, 32, 32), torch.zeros(1), None)
    with pytest.raises(ValueError, match="aug_level"):
        model(torch.randn(1, 3, 32, 32), torch.zeros(1), None, aug_level=0.1)


def test_down_before_up_after_ordering():
    shapes = {}

    def record(name):
        return lambda mod, inp, out: shapes.__setitem__(name, (tuple(inp[0].shape[-2:]), tuple(out.shape[-2:])))

    eff, std = make("efficient"), make("standard")
    hooks = [eff.down_blocks[0].resblocks[0].conv1.register_forward_hook(record("eff_d0")),
             eff.up_blocks[0].resblocks[-1].conv2.register_forward_hook(record("eff_u0")),
             eff.up_samplers[0].register_forward_hook(record("eff_up0")),
             std.down_blocks[0].resblocks[0].conv1.register_forward_hook(record("std_d0")),
             std.up_blocks[0].resblocks[-1].conv2.register_forward_hook(record("std_u0"))]
    with torch.no_grad():
        eff(torch.randn(1, 3, 32, 48), torch.zeros(1), None)
        std(torch.randn(1, 3, 32, 48), torch.zeros(1), None)
    for h in hooks:
        h.remove()
    assert shapes["eff_d0"] == ((16, 24), (16, 24))  # DBlock 0: strided conv first, blocks at half resolution
    assert shapes["eff_u0"] == ((16, 24), (16, 24))  # UBlock 0: blocks at half resolution ...
    assert shapes["eff_up0"] == ((16, 24), (32, 48))  # ... then up-sampled
    assert shapes["std_d0"] == ((32, 48), (32, 48))  # standard: level 0 runs at full resolution
    assert shapes["std_u0"] == ((32, 48), (32, 48))


def test_skip_scale_is_used():
    model = make("efficient")
    assert model.skip_scale == pytest.approx(2**-0.5) and UNet(**SMALL).skip_scale == 1.0
    x, c = torch.randn(1, 3, 32, 32), torch.randn(1)
    captured = {}
    hook = model.up_blocks[0].resblocks[0].register_forward_pre_hook(
        lambda mod, args: captured.__setitem__("input", args[0]))
    with torch.no_grad():
        a = model(x, c, None)
        skip_half = captured["input"][:, 8:]  # [h ; skip * scale]: level 0 has width 8
        model.skip_scale = 1.0
        b = model(x, c, None)
        skip_one = captured["input"][:, 8:]
    hook.remove()
    torch.testing.assert_close(skip_half, skip_one * 2**-0.5)
    assert not torch.allclose(a, b)


def test_text_film_and_null_prompt():
    model = make("efficient")
    x, c = torch.randn(2, 3, 16, 16), torch.randn(2)
    stack = text()
    with torch.no_grad():
        base = model(x, c, stack)
        other = model(x, c, text(seed=7))
        assert not torch.allclose(base, other)  # text matters
        assert not torch.allclose(base, model(x, c + 1, stack))  # noise level matters
        # padding tokens do not matter
        padded = LayerStack(torch.cat([stack.hidden, torch.randn(1, 2, 3, TEXT_DIM)], 2),
                            torch.cat([stack.mask, torch.zeros(2, 3, dtype=torch.bool)], 1))
        torch.testing.assert_close(model(x, c, padded), base, atol=1e-5, rtol=1e-5)
        empty = LayerStack(stack.hidden, torch.zeros_like(stack.mask))
        torch.testing.assert_close(model(x, c, empty), model(x, c, None), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="width"):
        model(x, c, random_text(2, TEXT_DIM + 1))


@pytest.mark.parametrize("kind", ["efficient", "standard"])
def test_channels_last_and_checkpointing(kind):
    model = make(kind)
    x, c, stack = torch.randn(2, 3, 16, 16), torch.randn(2), text()
    ref = model(x, c, stack)
    ref.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    out = model(x, c, stack)
    out.square().mean().backward()
    torch.testing.assert_close(out, ref)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)
    model.disable_gradient_checkpointing()
    cl = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out_cl = cl(x.contiguous(memory_format=torch.channels_last), c, stack)
    torch.testing.assert_close(out_cl, ref.detach(), atol=1e-5, rtol=1e-4)


def test_compared_configs_have_equal_parameter_counts():
    for width in (16, 32):
        eff, std = matched_configs(width)
        assert eff == efficient_config(width) and std["num_res_blocks"] == 2
        with torch.device("meta"):
            n_eff, n_std = count_parameters(EfficientUNet(**eff)), count_parameters(UNet(**std))
        assert abs(n_eff - n_std) <= 0.05 * n_std, (width, n_eff, n_std)
        assert std == standard_config(std["channels"][0])
        assert sum(eff["num_res_blocks"][2:]) > sum(eff["num_res_blocks"][:2])  # more blocks at low resolution


def test_efficient_saves_fewer_activations_at_equal_parameters():
    eff_cfg, std_cfg = matched_configs(8)
    eff, std = EfficientUNet(**eff_cfg), UNet(**std_cfg)
    args = (torch.zeros(1), random_text(1, 64))
    x = torch.randn(1, 3, 32, 32)
    a_eff, a_std = saved_activation_bytes(eff, x, *args), saved_activation_bytes(std, x, *args)
    assert 0 < a_eff < a_std / 2, (a_eff, a_std)
    row = measure_train_step(eff, 16, batch=1, steps=1)
    assert row["images_per_s"] > 0 and row["peak_bytes"] > 4 * 4 * count_parameters(eff) - 1


@pytest.mark.parametrize("kind", ["efficient", "standard"])
def test_save_load_round_trip(kind, tmp_path):
    model = make(kind, aug_embed=True, in_channels=6)
    model.save_pretrained(tmp_path)
    cls = EfficientUNet if kind == "efficient" else UNet
    again = cls.from_pretrained(tmp_path).eval()
    plain = lambda cfg: {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()  # noqa: E731
                         if not k.startswith("_")}  # JSON stores tuples as lists
    assert plain(again.config) == plain(model.config)
    x, c, stack = torch.randn(2, 6, 16, 16), torch.randn(2), text()
    with torch.no_grad():
        torch.testing.assert_close(again(x, c, stack, aug_level=torch.tensor([0.0, 0.5])),
                                   model(x, c, stack, aug_level=torch.tensor([0.0, 0.5])), rtol=0, atol=0)


def test_edm_precond_plugs_in():
    model = make("efficient")
    denoiser = EDMPrecond(model)
    with torch.no_grad():
        out = denoiser(torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0]), text())
    assert out.shape == (2, 3, 16, 16)
