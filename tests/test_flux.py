"FluxDenoiser: a diffusers FluxTransformer2DModel behind the package's network interface, trained and sampled as any network."
import math

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from deepfusion_ref.cond import LayerStack
from deepfusion_ref.flux import FluxDenoiser, image_ids, pack_latents, unpack_latents

TINY = dict(num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
            pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))


@pytest.fixture(scope="module")
def minilm():
    from transformers.utils import logging as hf_logging

    from deepfusion_ref.text import LanguageModel, packaged_minilm_path

    hf_logging.disable_progress_bar()
    return LanguageModel.from_pretrained(packaged_minilm_path(), max_length=32)


def randomised(model):
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()


@pytest.mark.parametrize("shape", [(1, 4, 2, 2), (3, 16, 8, 6)])
def test_packing_matches_diffusers(shape):
    b, c, h, w = shape
    x = torch.randn(shape)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, b, c, h, w))
    assert torch.equal(unpack_latents(packed, h, w), x)
    assert torch.equal(image_ids(h // 2, w // 2), FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu",
                                                                                          torch.float32))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 4, 3, 4))


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_forward_equals_the_transformer_called_by_hand(guidance_embeds):
    flux = randomised(FluxDenoiser(transformer_config={**TINY, "guidance_embeds": guidance_embeds}, text_dim=20,
                                   in_channels=4, guidance=4.0))
    x, t = torch.randn(2, 4, 6, 4), torch.tensor([0.1, 0.7])
    cond = LayerStack(torch.randn(3, 2, 5, 20), torch.ones(2, 5, dtype=torch.bool))
    with torch.no_grad():
        ours = flux(x, t, cond)
        hidden = cond.hidden[-1]
        out = flux.transformer(hidden_states=FluxPipeline._pack_latents(x, 2, 4, 6, 4),
                               encoder_hidden_states=flux.connector(hidden),
                               pooled_projections=flux.pooled_proj(hidden.mean(1)), timestep=t,
                               img_ids=FluxPipeline._prepare_latent_image_ids(2, 3, 2, "cpu", torch.float32),
                               txt_ids=torch.zeros(5, 3),
                               guidance=torch.full((2,), 4.0) if guidance_embeds else None, return_dict=False)[0]
    torch.testing.assert_close(ours, FluxPipeline._unpack_latents(out, 6, 4, vae_scale_factor=1))
    flux.register_to_config(text_layer=0)  # the conditioning layer is selectable
    with torch.no_grad():
        first = flux(x, t, cond)
    flux.register_to_config(text_layer=-1)
    with torch.no_grad():
        assert not torch.allclose(first, ours)
        torch.testing.assert_close(flux(x, t, LayerStack(cond.hidden.flip(0), cond.mask)), first)


def test_padding_is_masked_out():
    flux = randomised(FluxDenoiser(transformer_config=TINY, text_dim=20, in_channels=3))
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([0.5, 0.2])
    short = LayerStack(torch.randn(2, 2, 3, 20), torch.ones(2, 3, dtype=torch.bool))
    padded = LayerStack(torch.cat([short.hidden, 5 * torch.randn(2, 2, 4, 20)], 2),
                        torch.cat([short.mask, torch.zeros(2, 4, dtype=torch.bool)], 1))
    with torch.no_grad():
        torch.testing.assert_close(flux(x, t, padded), flux(x, t, short), atol=1e-5, rtol=1e-5)


def test_bad_configs_and_inputs_name_the_argument():
    with pytest.raises(ValueError, match="transformer_config: in_channels"):
        FluxDenoiser(transformer_config={**TINY, "in_channels": 8}, text_dim=20, in_channels=3)
    with pytest.raises(ValueError, match="out_channels"):
        FluxDenoiser(transformer_config={**TINY, "out_channels": 8}, text_dim=20, in_channels=3)
    flux = FluxDenoiser(transformer_config=TINY, text_dim=20, in_channels=3)
    cond = LayerStack(torch.randn(2, 1, 3, 20), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="x: expected 3 channels"):
        flux(torch.randn(1, 4, 4, 4), torch.zeros(1), cond)
    with pytest.raises(ValueError, match="cond: expected text width 20"):
        flux(torch.randn(1, 3, 4, 4), torch.zeros(1), LayerStack(torch.randn(2, 1, 3, 8), cond.mask))


def test_from_transformer_copies_config_and_weights():
    transformer = randomised(FluxTransformer2DModel(in_channels=12, **TINY))
    flux = FluxDenoiser.from_transformer(transformer, text_dim=20)
    assert flux.config.in_channels == 3 and flux.config.transformer_config["num_single_layers"] == 2
    assert all(torch.equal(a, b) for a, b in zip(flux.transformer.state_dict().values(),
                                                 transformer.state_dict().values()))


def test_trains_with_rectified_flow_and_the_saved_pipeline_samples_the_same(minilm, tmp_path):
    from deepfusion_ref.data import SceneDataset
    from deepfusion_ref.pipeline import Text2ImagePipeline
    from deepfusion_ref.schedules import image_seq_len
    from deepfusion_ref.train import Trainer

    torch.manual_seed(0)
    flux = FluxDenoiser(transformer_config=TINY, text_dim=minilm.hidden_size, in_channels=3)
    assert image_seq_len(flux, 16, 12) == 8 * 6  # 2x2 packing: what FLUX's resolution-dependent shift reads
    trainer = Trainer(flux, minilm, SceneDataset(8, 16, 16, seed=0), steps=4, batch_size=2, progress=False,
                      objective="flow", lr=1e-3)
    history = trainer.fit()
    assert len(history) == 4 and all(math.isfinite(m["loss"]) for m in history)
    pipe = Text2ImagePipeline.from_trainer(trainer)
    kwargs = dict(num_inference_steps=3, generator=torch.Generator().manual_seed(1), output_type="pt", progress=False)
    images = pipe(["a red circle", "a blue star"], **kwargs).images
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    pipe.save_pretrained(tmp_path / "pipe")
    again = Text2ImagePipeline.from_pretrained(tmp_path / "pipe")
    kwargs["generator"] = torch.Generator().manual_seed(1)
    assert type(again.network) is FluxDenoiser
    assert torch.equal(again(["a red circle", "a blue star"], **kwargs).images, images)


def test_block_patterns_follow_the_reports_global_indices():
    from deepfusion_ref.flux import flux_block_patterns

    assert flux_block_patterns([0, 18, 19, 56]) == [
        "net.transformer.transformer_blocks.0.*", "net.transformer.transformer_blocks.18.*",
        "net.transformer.single_transformer_blocks.0.*", "net.transformer.single_transformer_blocks.37.*"]
    assert flux_block_patterns([2], num_double=1, num_single=2, prefix="t") == ["t.single_transformer_blocks.1.*"]
    for bad in ([57], [-1], [1.0], [True]):
        with pytest.raises(ValueError, match="indices"):
            flux_block_patterns(bad)


def test_region_weights_by_hand():
    from deepfusion_ref.flux import region_weights

    w = region_weights(4, 8, centre=(0.5, 0.5), radius=0.5)  # centre cell (4, 2), radius 2 cells
    expected = torch.tensor([[max(0.0, 1 - math.hypot(x - 4, y - 2) / 2) for x in range(8)] for y in range(4)])
    torch.testing.assert_close(w, expected)
    assert region_weights(3, 3, radius=10).min() > 0.9  # a large radius keeps everything
    for bad, match in ((dict(centre=(0.5, -0.1)), "centre"), (dict(radius=-1), "radius")):
        with pytest.raises(ValueError, match=match):
            region_weights(4, 8, **bad)


def test_published_connector_loads_and_bad_files_name_themselves(tmp_path):
    from deepfusion_ref.flux import convert_to_safetensors, load_published_connector

    flux = FluxDenoiser(transformer_config=TINY, text_dim=20, in_channels=3)
    linear = torch.nn.Linear(20, 24)
    torch.save({f"module.linear.{k}": v for k, v in linear.state_dict().items()}, tmp_path / "connector.pt")
    load_published_connector(flux, tmp_path / "connector.pt")
    cond = LayerStack(torch.randn(1, 2, 3, 20), torch.ones(2, 3, dtype=torch.bool))
    with torch.no_grad():
        torch.testing.assert_close(flux.connector(cond.hidden[-1]), linear(cond.hidden[-1]))
    converted = convert_to_safetensors(tmp_path / "connector.pt", tmp_path / "c.safetensors")
    fresh = FluxDenoiser(transformer_config=TINY, text_dim=20, in_channels=3)
    load_published_connector(fresh, converted)
    assert torch.equal(fresh.connector.branches[0][-1].bias, linear.bias)
    torch.save({"linear.weight": torch.zeros(24, 16), "linear.bias": torch.zeros(24)}, tmp_path / "narrow.pt")
    with pytest.raises(ValueError, match=r"narrow\.pt: expected the tensors .*\(24, 20\)"):
        load_published_connector(flux, tmp_path / "narrow.pt")
    torch.save({"linear.weight": torch.zeros(24, 20)}, tmp_path / "half.pt")
    with pytest.raises(ValueError, match=r"half\.pt: expected"):
        load_published_connector(flux, tmp_path / "half.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_published_connector(flux, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="connector_kind='linear'"):
        load_published_connector(FluxDenoiser(transformer_config=TINY, text_dim=20, in_channels=3,
                                              connector_kind="mlp"), tmp_path / "connector.pt")


def test_gradient_checkpointing_reaches_the_transformer_and_keeps_the_gradients():
    flux = randomised(FluxDenoiser(transformer_config=TINY, text_dim=20, in_channels=3)).train()
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([0.4, 0.6])
    cond = LayerStack(torch.randn(1, 2, 3, 20), torch.ones(2, 3, dtype=torch.bool))

    def grads():
        flux.zero_grad()
        flux(x, t, cond).square().sum().backward()
        return [p.grad.clone() for p in flux.parameters()]

    plain = grads()
    flux.enable_gradient_checkpointing()
    assert flux.transformer.gradient_checkpointing
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)


def test_controlnet_fresh_is_a_no_op_and_trained_equals_diffusers_two_calls():
    from dataclasses import replace

    from diffusers import FluxControlNetModel

    flux = randomised(FluxDenoiser(transformer_config=TINY, text_dim=20, in_channels=3))
    x, t = torch.randn(2, 3, 6, 8), torch.tensor([0.2, 0.7])
    cond = LayerStack(torch.randn(1, 2, 4, 20), torch.ones(2, 4, dtype=torch.bool))
    control = torch.randn(2, 3, 6, 8)
    with torch.no_grad():
        before = flux(x, t, cond)
        net = flux.add_controlnet(num_layers=1, num_single_layers=1)
        assert isinstance(net, FluxControlNetModel) and net.config.num_single_layers == 1
        # the copy starts from the transformer's own first blocks
        assert torch.equal(net.transformer_blocks[0].attn.to_q.weight, flux.transformer.transformer_blocks[0].attn.to_q.weight)
        assert torch.equal(flux(x, t, replace(cond, control=control)), before)  # zero-initialised: bit for bit
        randomised(net)
        ours = flux(x, t, replace(cond, control=control, control_scale=0.5))
        text, pooled = flux.connector(cond.hidden[-1]), flux.pooled_proj(cond.hidden[-1].mean(1))
        common = dict(hidden_states=FluxPipeline._pack_latents(x, 2, 3, 6, 8), encoder_hidden_states=text,
                      pooled_projections=pooled, timestep=t, txt_ids=torch.zeros(4, 3), return_dict=False,
                      img_ids=FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))
        blocks, singles = net(controlnet_cond=FluxPipeline._pack_latents(control, 2, 3, 6, 8), conditioning_scale=0.5,
                              **common)
        direct = flux.transformer(controlnet_block_samples=blocks, controlnet_single_block_samples=singles, **common)[0]
        torch.testing.assert_close(ours, FluxPipeline._unpack_latents(direct, 6, 8, vae_scale_factor=1))
        assert (ours - before).abs().max() > 1e-3


def test_controlnet_that_does_not_fit_is_refused():
    from diffusers import FluxControlNetModel

    flux = FluxDenoiser(transformer_config=TINY, text_dim=20, in_channels=3)
    other = FluxControlNetModel(in_channels=12, num_layers=1, num_single_layers=0, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                                axes_dims_rope=(2, 2, 4))
    with pytest.raises(ValueError, match="joint_attention_dim 32 != 24"):
        flux.set_controlnet(other)
    with pytest.raises(TypeError, match="controlnet"):
        flux.set_controlnet(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="num_layers"):
        flux.add_controlnet(num_layers=2)  # the transformer has one double-stream block
    with pytest.raises(ValueError, match="no ControlNet"):
        from dataclasses import replace

        x = torch.randn(1, 3, 4, 4)
        flux(x, torch.tensor([0.5]), replace(LayerStack(torch.randn(1, 1, 2, 20), torch.ones(1, 2, dtype=torch.bool)),
                                             control=x))


def test_controlnet_trains_alone_and_the_pipeline_applies_it(minilm, tmp_path):
    from deepfusion_ref.data import ControlMaps, RenderedScenes, SceneDataset, control_map
    from deepfusion_ref.pipeline import Text2ImagePipeline
    from deepfusion_ref.train import Trainer

    torch.manual_seed(0)
    flux = FluxDenoiser(transformer_config=TINY, text_dim=minilm.hidden_size, in_channels=3)
    flux.add_controlnet(num_layers=1)
    data = ControlMaps(RenderedScenes(SceneDataset(8, 16, 16, seed=0, max_objects=1)), "mask")
    base = {k: v.clone() for k, v in flux.transformer.state_dict().items()}
    start = {k: v.clone() for k, v in flux.controlnet.state_dict().items()}
    trainer = Trainer(flux, minilm, data, steps=3, batch_size=2, progress=False, objective="flow", lr=1e-2,
                      stages=[(0, ["net.controlnet.*"])])
    trainer.fit()
    assert all(torch.equal(v, base[k]) for k, v in flux.transformer.state_dict().items())  # the generator is frozen
    moved = [k for k, v in flux.controlnet.state_dict().items() if not torch.equal(v, start[k])]
    assert "controlnet_x_embedder.weight" in moved and any(k.startswith("controlnet_blocks.") for k in moved)
    pipe = Text2ImagePipeline.from_trainer(trainer)
    scene = data.scenes.items[0]["scene"]
    from deepfusion_ref.data import Scene

    grey = torch.from_numpy(control_map(Scene.from_dict(scene)))[None].expand(3, -1, -1)
    kwargs = dict(num_inference_steps=3, output_type="pt", progress=False)
    run = lambda **extra: pipe(["a red circle"] * 2, generator=torch.Generator().manual_seed(1), **kwargs,  # noqa: E731
                               **extra).images
    free, controlled = run(), run(control_image=grey)
    assert (controlled - free).abs().max() > 0  # the trained ControlNet changes the samples
    assert torch.equal(run(control_image=grey, controlnet_conditioning_scale=0.0), free)  # scale 0: off
    assert torch.equal(run(control_image=[grey, grey]), controlled)  # one map per prompt, the same map
    pipe.save_pretrained(tmp_path / "pipe")
    again = Text2ImagePipeline.from_pretrained(tmp_path / "pipe")
    assert torch.equal(again(["a red circle"] * 2, generator=torch.Generator().manual_seed(1), control_image=grey,
                             **kwargs).images, controlled)
    with pytest.raises(ValueError, match="control_image: must have the output's size 16x16"):
        run(control_image=grey[:, :8])
    with pytest.raises(ValueError, match="controlnet_conditioning_scale"):
        run(control_image=grey, controlnet_conditioning_scale="1")


def test_control_maps_need_a_controlnet(minilm):
    from deepfusion_ref.data import ControlMaps, SceneDataset
    from deepfusion_ref.pipeline import Text2ImagePipeline
    from deepfusion_ref.train import Trainer

    flux = FluxDenoiser(transformer_config=TINY, text_dim=minilm.hidden_size, in_channels=3)
    with pytest.raises(ValueError, match="dataset: its items carry control maps"):
        Trainer(flux, minilm, ControlMaps(SceneDataset(4, 16, 16, seed=0)), steps=1, batch_size=2, objective="flow")
    pipe = Text2ImagePipeline(minilm, flux, "flow", sample_size=(16, 16))
    with pytest.raises(ValueError, match="control_image: the network .* has no ControlNet"):
        pipe("a red circle", control_image=torch.zeros(3, 16, 16), num_inference_steps=1, progress=False)
