"Text2ImagePipeline: determinism, save/load round trips (pixel space, AutoencoderKL, U-Net), sizes, LLM calls."
import numpy as np
import pytest
import torch
from PIL import Image

from deepfusion_ref.dit import DeepFusionDiT
from deepfusion_ref.pipeline import Text2ImagePipeline, network_class, repeat_rows
from deepfusion_ref.text import LanguageModel, LayerStack, packaged_minilm_path
from deepfusion_ref.train import LearnedNull
from deepfusion_ref.unet import EfficientUNet, efficient_config

PROMPTS2 = ["a red circle on a cream background", "two blue squares"]


def tiny_dit(lm, in_channels=3, **kwargs):
    "A tiny DiT whose zero-initialised output layers are perturbed, so that its output depends on the prompt."
    torch.manual_seed(0)
    net = DeepFusionDiT(in_channels=in_channels, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                        text_dim=lm.hidden_size, num_llm_layers=lm.num_layers, rope_axes=(4, 6, 6), **kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


@pytest.fixture(scope="module")
def minilm():
    return LanguageModel.from_pretrained(packaged_minilm_path(), max_length=32)


@pytest.fixture(scope="module")
def pipe(minilm):
    torch.manual_seed(1)
    null = LearnedNull(minilm.num_layers, minilm.hidden_size)
    return Text2ImagePipeline(minilm, tiny_dit(minilm), "edm", null, sample_size=(16, 16))


def call(pipe, prompts=PROMPTS2, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 4, "output_type": "pt", "progress": False, **kwargs}
    return pipe(prompts, generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_fixed_generator_is_deterministic_and_seeds_differ(pipe):
    a, b, c = call(pipe), call(pipe), call(pipe, seed=1)
    assert a.shape == (2, 3, 16, 16) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_save_load_round_trip_gives_identical_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    assert sorted(p.name for p in (tmp_path / "pipe").iterdir()) == ["language_model", "manifest.json", "network",
                                                                     "null", "pipeline.json"]
    assert not list(tmp_path.glob(".tmp_*"))  # the temporary folder was renamed into place
    loaded = Text2ImagePipeline.from_pretrained(tmp_path / "pipe")
    assert torch.equal(call(pipe, guidance_scale=4.0), call(loaded, guidance_scale=4.0))
    pipe.save_pretrained(tmp_path / "pipe")  # overwriting a saved pipeline works too
    assert torch.equal(call(pipe), call(Text2ImagePipeline.from_pretrained(tmp_path / "pipe")))


def test_output_types(pipe):
    pil = call(pipe, output_type="pil", num_images_per_prompt=2)
    assert len(pil) == 4 and all(isinstance(im, Image.Image) and im.size == (16, 16) for im in pil)
    arrays = call(pipe, output_type="np", num_images_per_prompt=2)
    tensors = call(pipe, output_type="pt", num_images_per_prompt=2)
    assert arrays.shape == (4, 16, 16, 3) and np.allclose(arrays, tensors.permute(0, 2, 3, 1).numpy())
    assert np.abs(np.asarray(pil[3], dtype=np.float32) / 255 - arrays[3]).max() <= 0.5 / 255 + 1e-6
    latent = call(pipe, output_type="latent", num_images_per_prompt=2)  # undecoded: in pixel space, before clamping
    assert torch.allclose((latent.clamp(-1, 1) + 1) / 2, tensors)
    as_tuple = pipe(PROMPTS2, generator=torch.Generator().manual_seed(0), num_inference_steps=4, output_type="pt",
                    progress=False, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], call(pipe))  # diffusers' return_dict=False
    with pytest.raises(ValueError, match="output_type"):
        call(pipe, output_type="tensor")


def test_a_list_of_generators_gives_each_image_its_own_noise(pipe):
    # diffusers' convention: image i's noise comes from generator i, so it does not depend on the other images
    both = pipe(PROMPTS2, generator=[torch.Generator().manual_seed(s) for s in (5, 6)], num_inference_steps=4,
                output_type="pt", progress=False).images
    second_alone = call(pipe, prompts=PROMPTS2[1:], seed=6)
    torch.testing.assert_close(both[1:], second_alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="generator: a list needs one generator per image"):
        pipe(PROMPTS2, generator=[torch.Generator()], num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="latents: expected shape"):
        pipe(PROMPTS2, latents=torch.zeros(1, 3, 16, 16), num_inference_steps=2, progress=False)


def test_non_square_size_and_impossible_size_error(pipe):
    assert call(pipe, height=8, width=24).shape == (2, 3, 8, 24)
    with pytest.raises(ValueError, match=r"height/width: got 15x16.*multiples of 2 \(e\.g\. 2, 4, 6, 8"):
        call(pipe, height=15, width=16)


def test_long_prompt_warns(pipe):
    with pytest.warns(UserWarning, match="prompt truncated to max_length=32"):
        call(pipe, prompts=["a very long prompt " + "with a red circle " * 20])


def test_negative_prompt_replaces_the_null_and_must_match(pipe):
    assert not torch.allclose(call(pipe, guidance_scale=5.0), call(pipe, guidance_scale=5.0, negative_prompt="blue"))
    with pytest.raises(ValueError, match="negative_prompt: need one per prompt"):
        call(pipe, negative_prompt=["a", "b", "c"])


def test_guidance_one_is_the_conditional_model(pipe):
    "At guidance 1 the null condition has no effect: a pipeline without a learned null gives the same images."
    plain = Text2ImagePipeline(pipe.language_model, pipe.network, "edm", None, sample_size=(16, 16))
    assert torch.allclose(call(pipe, guidance_scale=1.0), call(plain, guidance_scale=1.0), atol=1e-6)


def test_language_model_runs_once_per_prompt(pipe, monkeypatch):
    lm = pipe.language_model
    lm.clear_cache()
    seen = []
    forward = lm._forward
    monkeypatch.setattr(lm, "_forward", lambda prompts, images=None: seen.append(list(prompts)) or forward(prompts, images))
    call(pipe, num_images_per_prompt=3)
    call(pipe, num_images_per_prompt=2)  # cached: no second run
    assert seen == [[p] for p in PROMPTS2]  # each prompt on its own (batch_invariant), once


def test_a_prompts_encoding_does_not_depend_on_its_batch(pipe):
    "A prompt met in a batch with a longer one (padding) gets the stack it has alone, so resumes are exact."
    lm = pipe.language_model
    lm.clear_cache()
    together = lm.encode(["a red star", "two large blue squares left of a small green hexagon"])
    lm.clear_cache()
    alone = lm.encode(["a red star"])
    n = int(alone.mask.sum())
    assert torch.equal(together.hidden[:, 0, :n], alone.hidden[:, 0, :n])
    lm.batch_invariant = False  # batched encoding: padding changes the float result slightly
    try:
        lm.clear_cache()
        batched = lm.encode(["a red star", "two large blue squares left of a small green hexagon"])
        torch.testing.assert_close(batched.hidden[:, 0, :n], alone.hidden[:, 0, :n], rtol=1e-4, atol=1e-4)
    finally:
        lm.batch_invariant = True
        lm.clear_cache()


def test_repeat_rows_matches_stacking_copies():
    torch.manual_seed(0)
    s = LayerStack(torch.randn(2, 3, 4, 5), torch.rand(3, 4) > 0.3, torch.randn(3, 5), torch.randn(2, 3, 4, 6),
                   torch.randn(2, 3, 4, 6), torch.tensor([True, False, True]))
    rows = [LayerStack(s.hidden[:, i:i + 1], s.mask[i:i + 1], s.pooled[i:i + 1], s.keys[:, i:i + 1],
                       s.values[:, i:i + 1], s.drop[i:i + 1]) for i in range(3)]
    expected = LayerStack.stack([r for r in rows for _ in range(2)])
    got = repeat_rows(s, 2)
    for field in ("hidden", "mask", "pooled", "keys", "values", "drop"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field


def test_autoencoder_codec_with_16_latent_channels(minilm, tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=16).eval()
    pipe = Text2ImagePipeline(minilm, tiny_dit(minilm, in_channels=16), "edm", codec=vae, sample_size=(16, 16))
    assert pipe.latent_shape(16, 24) == (16, 8, 12)
    with pytest.raises(ValueError, match="multiples of 4.*downsamples by 2"):
        pipe.latent_shape(16, 18)
    images = call(pipe, height=16, width=24)
    assert images.shape == (2, 3, 16, 24)
    # encode_image inverts decode's scaling: decode(encode(decode(z))) is decode's fixed point up to the codec.
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    z = pipe.encode_image(x)
    assert z.shape == (1, 16, 8, 8)
    raw = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    assert torch.allclose(pipe.decode(z), raw, atol=1e-5)
    pipe.save_pretrained(tmp_path / "vae_pipe")
    assert torch.equal(images, call(Text2ImagePipeline.from_pretrained(tmp_path / "vae_pipe"), height=16, width=24))


def test_unet_network_round_trip(minilm, tmp_path):
    torch.manual_seed(0)
    unet = EfficientUNet(**efficient_config(width=8, text_dim=minilm.hidden_size, self_attention=False)).eval()
    pipe = Text2ImagePipeline(minilm, unet, "edm", sample_size=(16, 16))
    with pytest.raises(ValueError, match="multiples of 16"):
        call(pipe, height=12, width=16)
    images = call(pipe)
    pipe.save_pretrained(tmp_path / "unet_pipe")
    assert torch.equal(images, call(Text2ImagePipeline.from_pretrained(tmp_path / "unet_pipe")))


@pytest.mark.parametrize("parameterization", ["flow", "vp"])
def test_other_parameterizations_round_trip(minilm, tmp_path, parameterization):
    pipe = Text2ImagePipeline(minilm, tiny_dit(minilm), parameterization, sample_size=(8, 8))
    images = call(pipe)
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
    pipe.save_pretrained(tmp_path / parameterization)
    assert torch.equal(images, call(Text2ImagePipeline.from_pretrained(tmp_path / parameterization)))


def test_bad_arguments_name_themselves(pipe, tmp_path):
    with pytest.raises(ValueError, match="objective must be one of"):
        Text2ImagePipeline(pipe.language_model, pipe.network, "ddpm")
    with pytest.raises(ValueError, match="sampler must be one of"):
        call(pipe, sampler="dpm")
    with pytest.raises(ValueError, match="thresholding must be None or one of"):
        call(pipe, thresholding="clip")
    with pytest.raises(FileNotFoundError, match="not a saved Text2ImagePipeline"):
        Text2ImagePipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a deepfusion_ref or diffusers model class"):
        network_class("os:system")


def test_qwen2_vl_reference_image_conditions_and_seed_varies(tiny_models):
    lm = LanguageModel.from_pretrained(tiny_models["qwen2_vl"], max_length=32)
    pipe = Text2ImagePipeline(lm, tiny_dit(lm), "edm", sample_size=(8, 8))
    rng = np.random.default_rng(0)
    red, noise = Image.new("RGB", (56, 56), (220, 30, 40)), Image.fromarray(rng.integers(0, 255, (56, 56, 3), np.uint8))
    prompt = ["a picture in this style"]
    seen = []
    forward = lm._forward
    lm._forward = lambda prompts, images=None: seen.append(len(prompts)) or forward(prompts, images)
    a = call(pipe, prompt, image=red, num_images_per_prompt=2, guidance_scale=1.0)
    assert seen == [1, 1]  # one run for the prompt with its image (two samples), one for the empty prompt
    b = call(pipe, prompt, image=noise, num_images_per_prompt=2, guidance_scale=1.0)
    assert seen == [1, 1, 1]  # the empty prompt's stack is cached; a new image is a new (prompt, image) key
    assert not torch.allclose(a, b)  # the reference image conditions generation ...
    assert not torch.allclose(a[0], a[1])  # ... while the seed varies the content
    assert torch.equal(a, call(pipe, prompt, image=red, num_images_per_prompt=2, guidance_scale=1.0))
    with pytest.raises(ValueError, match="images: only a Qwen2-VL model reads images"):
        LanguageModel.from_pretrained(tiny_models["llama"]).encode(prompt, images=[red])


def test_qwen2_vl_region_control_weights_the_visual_tokens(tiny_models):
    from deepfusion_ref.flux import region_weights

    lm = LanguageModel.from_pretrained(tiny_models["qwen2_vl"], max_length=32)
    pipe = Text2ImagePipeline(lm, tiny_dit(lm), "edm", sample_size=(8, 8))
    image = torch.rand(3, 56, 56, generator=torch.Generator().manual_seed(0))
    whole = call(pipe, "", image=image, guidance_scale=1.0)
    left = call(pipe, "", image=image, region_centre=(0.2, 0.5), region_radius=0.4, guidance_scale=1.0)
    as_grid = call(pipe, "", image=image, guidance_scale=1.0,
                   image_weights=lambda gh, gw: region_weights(gh, gw, (0.2, 0.5), 0.4))
    assert not torch.allclose(whole, left) and torch.equal(left, as_grid)  # the region is GridDot's grid
    everywhere = call(pipe, "", image=image, region_centre=(0.5, 0.5), region_radius=100.0, guidance_scale=1.0)
    torch.testing.assert_close(everywhere, whole, rtol=0, atol=0.02)  # weights ~1 over the grid: barely changed
    for kwargs, match in ((dict(region_centre=(0.5, 0.5)), "image="), (dict(image=image * 2 - 1), "image: float"),
                          (dict(image=image, region_centre=(0.5, 1.5)), "region_centre"),
                          (dict(image=image, region_centre=(0.5, 0.5), region_radius=-1), "region_radius"),
                          (dict(image=[image, image]), "image: need one"),
                          (dict(image=image, region_centre=(0.5, 0.5), image_weights=torch.ones(2, 2)), "not both")):
        with pytest.raises(ValueError, match=match):
            pipe("", progress=False, **kwargs)


def tiny_vae(latent_channels=16):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=16)


def test_autoencoder_trains_on_scenes():
    from deepfusion_ref.data import SceneDataset
    from deepfusion_ref.train import train_autoencoder

    l1 = train_autoencoder(tiny_vae(), SceneDataset(32, 16, 16, seed=3), steps=40, batch_size=8, lr=3e-3,
                           progress=False)
    assert sum(l1[-5:]) < 0.6 * sum(l1[:5])


def test_trainer_on_codec_latents_and_its_pipeline(minilm):
    "The trainer denoises the frozen codec's latents; its pipeline decodes them to pixels of the data's size."
    from deepfusion_ref.data import SceneDataset
    from deepfusion_ref.train import Trainer, codec_encode

    vae = tiny_vae()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    data = SceneDataset(8, 16, 16, seed=0)
    trainer = Trainer(tiny_dit(minilm, in_channels=16), minilm, data, steps=3, batch_size=4, lr=1e-3,
                      progress=False, codec=vae)
    seen = []
    loss = trainer.objective.loss
    trainer.objective.loss = lambda model, x0, *a, **k: seen.append(x0.shape) or loss(model, x0, *a, **k)
    trainer.fit()
    assert seen == [(4, 16, 8, 8)] * 3  # latents, not pixels
    assert all(torch.equal(v, before[k]) for k, v in vae.state_dict().items())  # the codec stays frozen
    assert trainer.sample(["a red circle"], steps=3).shape == (1, 3, 16, 16)
    pipe = Text2ImagePipeline.from_trainer(trainer)
    assert pipe.codec is vae and call(pipe).shape == (2, 3, 16, 16)
    x = torch.stack([data[i]["image"] for i in range(2)])
    assert torch.equal(pipe.encode_image(x), codec_encode(vae, x))
