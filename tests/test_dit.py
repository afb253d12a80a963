"""Attention and the deep-fusion DiT: RoPE against diffusers and the relative-position property, adaLN-Zero identity
at initialisation, padding invariance, layer routing (hooks), shapes and gradients on several grids with skips and
down-sampling, checkpointing, and the save/load round trip."""
import pytest
import torch

from deepfusion_ref.attention import (EXPLICIT_MAX_KEYS, JointAttention, apply_rope, attend, grid_ids, rope_cos_sin,
                                      text_ids)
from deepfusion_ref.dit import DeepFusionDiT
from deepfusion_ref.schedules import EDMPrecond, GuidedDenoiser
from deepfusion_ref.text import LayerStack

L, TEXT_DIM = 6, 24


def make_model(seed=0, randomize=True, **overrides):
    cfg = dict(in_channels=4, patch_size=2, hidden_size=32, depth=4, num_heads=2, text_dim=TEXT_DIM, num_llm_layers=L,
               rope_axes=(4, 6, 6))
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = DeepFusionDiT(**cfg)
    if randomize:  # move away from the zero initialisation so every path influences the output
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def make_stack(batch=2, length=5, lengths=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [length] * batch
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    hidden = torch.randn(L, batch, length, TEXT_DIM, generator=g) * mask[None, ..., None]
    return LayerStack(hidden, mask)


# --- RoPE ---------------------------------------------------------------------------------------------------------


def test_rope_frequencies_equal_diffusers_flux_pos_embed():
    pytest.importorskip("diffusers")
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = torch.cat([text_ids(9), grid_ids(7, 13)])
    for axes in [(16, 56, 56), (8, 12, 12), (4, 6, 6)]:
        cos, sin = rope_cos_sin(ids, axes, 10000.0)
        ref_cos, ref_sin = FluxPosEmbed(theta=10000, axes_dim=list(axes))(ids.float())
        torch.testing.assert_close(cos, ref_cos.float(), atol=1e-6, rtol=0)
        torch.testing.assert_close(sin, ref_sin.float(), atol=1e-6, rtol=0)


def test_rope_scores_depend_only_on_the_2d_offset():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 24), torch.randn(1, 1, 1, 24)

    def score(pq, pk):
        cos, sin = rope_cos_sin(torch.tensor([[0, *pq], [0, *pk]]), (0, 12, 12))
        return (apply_rope(q, cos[:1], sin[:1]) * apply_rope(k, cos[1:], sin[1:])).sum()

    for offset in [(0, 0), (1, -2), (-5, 3), (7, 7)]:
        values = torch.stack([score((a + offset[0], b + offset[1]), (a, b)) for a, b in [(0, 0), (3, 9), (20, 4)]])
        torch.testing.assert_close(values, values[:1].expand(3), atol=1e-4, rtol=0)
    assert not torch.allclose(score((1, 0), (0, 0)), score((0, 1), (0, 0)))  # rows and columns are distinct axes


# --- attention ----------------------------------------------------------------------------------------------------


def test_joint_attention_masks_padding_exactly():
    torch.manual_seed(0)
    attn = JointAttention(16, 2).eval()
    x, text = torch.randn(1, 6, 16), torch.randn(1, 4, 16)
    rope = rope_cos_sin(torch.cat([text_ids(4), grid_ids(2, 3)]), (2, 2, 4))
    mask = torch.tensor([[True, True, False, False]])
    out, weights = attn(x, text, mask, rope, return_weights=True)
    assert (weights[..., 2:4] == 0).all()
    garbage = text.clone()
    garbage[:, 2:] = 1e3  # what sits at padded positions must not matter
    torch.testing.assert_close(attn(x, garbage, mask, rope), out, atol=1e-6, rtol=1e-6)


# --- the DiT ------------------------------------------------------------------------------------------------------


def test_bfloat16_cpu_attention_takes_the_explicit_path_and_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 16, requires_grad=True) for n in (9, 13, 13))
    mask = torch.ones(2, 1, 1, 13, dtype=torch.bool)
    mask[1, ..., :4] = False  # a padded prompt: its first 4 keys are text padding
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # how the trainer runs it with bf16=True
        out, weights = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert weights is not None and weights.dtype == torch.bfloat16  # the explicit path, in the inputs' dtype
    assert (weights[1, ..., :4] == 0).all() and torch.allclose(weights.float().sum(-1), torch.ones(()), atol=1e-2)
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), ref, atol=2e-2)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        assert (g - r).norm() / r.norm() < 2e-2
    fused, none = attend(q, k, v, mask)  # float32: the fused kernel
    assert none is None and torch.allclose(fused, ref)
    long_keys = torch.randn(1, 1, EXPLICIT_MAX_KEYS + 1, 16, dtype=torch.bfloat16)
    assert attend(q[:1, :1].bfloat16().detach(), long_keys, long_keys)[1] is None  # long sequences: fused again


def test_adaln_zero_blocks_are_identity_at_init():
    model = make_model(randomize=False, downsample=False)
    stack = make_stack()
    tokens = torch.randn(2, 64, 32)
    emb = torch.randn(2, 32)
    rope = model._rope(5, 8, 8, "cpu")
    for block in model.blocks:
        torch.testing.assert_close(block(tokens, emb, stack.hidden[0], stack.mask, rope), tokens)
    out = model(torch.randn(2, 4, 16, 16), torch.zeros(2), stack)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("downsample, pooled_text", [(False, False), (True, False), (False, True)])
def test_padding_invariance(downsample, pooled_text):
    model = make_model(downsample=downsample, pooled_text=pooled_text)
    x = torch.randn(2, 4, 16, 16)
    padded = make_stack(batch=2, length=7, lengths=[3, 7])
    alone = LayerStack(padded.hidden[:, :1, :3], padded.mask[:1, :3])
    c_noise = torch.tensor([0.3, -0.2])
    torch.testing.assert_close(model(x[:1], c_noise[:1], alone), model(x, c_noise, padded)[:1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion, strategy, expected", [
    ("deep", "uniform", [0, 2, 3, 5]), ("deep", "offset", [2, 3, 4, 5]), ("last", "uniform", [5, 5, 5, 5])])
def test_layer_routing(fusion, strategy, expected):
    model = make_model(fusion=fusion, layer_strategy=strategy, layer_offset=2 if strategy == "offset" else 0)
    assert model.layer_indices == expected
    stack = make_stack()
    seen = {}
    for i, block in enumerate(model.blocks):
        block.text_proj.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
    model(torch.randn(2, 4, 16, 16), torch.zeros(2), stack)
    for i, layer in enumerate(expected):
        assert torch.equal(seen[i], stack.hidden[layer])


def test_stack_and_routed_fusion_feed_each_block_what_their_equations_say():
    import torch.nn.functional as F

    stack = make_stack()
    seen = {}

    def record(model):
        seen.clear()
        for i, block in enumerate(model.blocks):
            block.text_proj.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
        model(torch.randn(2, 4, 16, 16), torch.zeros(2), stack)

    stacked = make_model(fusion="stack", stack_layers=[1, 4])  # FLUX.2: chosen layers side by side, one projection
    record(stacked)
    by_hand = stacked.stack_proj(torch.cat([stack.hidden[1], stack.hidden[4]], -1))
    assert all(torch.equal(seen[i], by_hand) for i in range(4))
    routed = make_model(fusion="routed")
    with torch.no_grad():
        routed.router.logits.normal_()
    record(routed)
    mix = routed.router.logits.softmax(-1)
    for i in range(4):  # SemanticRouting: sum_l softmax(w_i)_l LN(h_l), by hand
        expected = sum(mix[i, l] * F.layer_norm(stack.hidden[l], (TEXT_DIM,)) for l in range(L))
        torch.testing.assert_close(seen[i], expected)
    torch.testing.assert_close(routed.layer_weights(), mix.detach())
    assert routed.router.no_weight_decay  # the train layer's param_groups leaves the logits undecayed


@pytest.mark.parametrize("fusion, options, read", [
    ("deep", {}, {0, 2, 3, 5}), ("last", {}, {5}), ("last", {"last_layer": -2}, {4}),
    ("stack", {"stack_layers": [1, 3]}, {1, 3}), ("routed", {}, set(range(L)))])
def test_perturbing_one_llm_layer_moves_the_output_only_if_the_model_reads_it(fusion, options, read):
    model = make_model(fusion=fusion, **options)
    stack, x = make_stack(), torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        base = model(x, torch.zeros(2), stack)
        for layer in range(L):
            hidden = stack.hidden.clone()
            hidden[layer] += torch.randn_like(hidden[layer]) * stack.mask[..., None]
            moved = (model(x, torch.zeros(2), LayerStack(hidden, stack.mask)) - base).abs().max() > 1e-6
            assert moved == (layer in read), (fusion, layer)
    weights = model.layer_weights()
    assert {int(j) for j in weights.sum(0).nonzero().flatten()} == read and torch.allclose(weights.sum(1),
                                                                                         torch.ones(4))


def test_new_fusion_modes_round_trip_and_bad_settings_are_named(tmp_path):
    model = make_model(fusion="stack")  # default layers: 1/4, 1/2, 3/4 of the LLM's depth, saved resolved
    assert model.config.stack_layers == [0, 2, 3]
    model.save_pretrained(tmp_path / "stack")
    again = DeepFusionDiT.from_pretrained(tmp_path / "stack")
    stack, x = make_stack(), torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(again.eval()(x, torch.zeros(2), stack), model(x, torch.zeros(2), stack))
    with pytest.raises(ValueError, match="stack_layers must be distinct layer indices in \\[0, 6\\)"):
        make_model(fusion="stack", stack_layers=[1, 6])
    with pytest.raises(ValueError, match="last_layer must be an int in \\[-6, 6\\)"):
        make_model(fusion="last", last_layer=-7)


@pytest.mark.parametrize("size", [(16, 16), (16, 32), (24, 12)])  # grids 8x8, 8x16, 12x6 at patch 2
@pytest.mark.parametrize("long_skips", [False, True])
@pytest.mark.parametrize("downsample", [False, True])
@pytest.mark.parametrize("ffn", ["mlp", "mix"])
def test_shapes_and_gradients(size, long_skips, downsample, ffn):
    model = make_model(long_skips=long_skips, downsample=downsample, depth=5, ffn=ffn).train()
    x = torch.randn(2, 4, *size, requires_grad=True)
    out = model(x, torch.tensor([0.1, 0.7]), make_stack())
    assert out.shape == x.shape
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def kv_stack(kv_dim, batch=2, length=5, seed=5):
    g = torch.Generator().manual_seed(seed)
    stack = make_stack(batch, length, seed=seed)
    stack.keys = torch.randn(L, batch, length, kv_dim, generator=g)
    stack.values = torch.randn(L, batch, length, kv_dim, generator=g)
    return stack


@pytest.mark.parametrize("kv_dim", [16, 32])  # projected (16 != width 32) or used as they are (32)
def test_kv_fusion_reads_each_layers_own_keys_and_values(kv_dim):
    model = make_model(fusion="kv", kv_dim=kv_dim).train()
    stack = kv_stack(kv_dim)
    seen = {}
    for i, block in enumerate(model.blocks):
        block.attn.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: seen.__setitem__(i, kwargs["text_kv"]), with_kwargs=True)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    model(x, torch.zeros(2), stack).square().mean().backward()
    for i, j in enumerate(model.layer_indices):
        k, v = seen[i]
        block = model.blocks[i]
        torch.testing.assert_close(k, block.text_k(stack.keys[j]))
        torch.testing.assert_close(v, block.text_v(stack.values[j]))
        if kv_dim == 32:
            assert torch.equal(k, stack.keys[j])
    assert all(p.grad is not None for p in model.parameters())


def test_kv_fusion_end_to_end_with_a_language_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from deepfusion_ref.text import LanguageModel, train_bpe_tokenizer

    tok = train_bpe_tokenizer(["a red circle", "a blue square above a star"] * 20, vocab_size=280)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=48,
                                   num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    lm = LanguageModel.from_pretrained(tmp_path / "lm", capture_kv=True)
    stack = lm.encode(["a red circle", "a blue square above a star"])
    kv_dim = cfg.num_key_value_heads * TEXT_DIM // cfg.num_attention_heads
    assert stack.keys.shape[-1] == kv_dim
    out = make_model(fusion="kv", kv_dim=kv_dim)(torch.randn(2, 4, 16, 16), torch.zeros(2), stack)
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()


def test_output_depends_on_the_text():
    model = make_model()
    x = torch.randn(2, 4, 16, 16)
    a, b = make_stack(seed=1), make_stack(seed=2)
    assert not torch.allclose(model(x, torch.zeros(2), a), model(x, torch.zeros(2), b))


@pytest.mark.parametrize("ffn", ["mlp", "mix"])
def test_gradient_checkpointing_gives_the_same_gradients(ffn):
    model = make_model(downsample=True, ffn=ffn).train()
    x = torch.randn(2, 4, 16, 16)
    stack = make_stack()

    def grads():
        model.zero_grad()
        model(x, torch.zeros(2), stack).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    for g1, g2 in zip(plain, grads()):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    model = make_model(downsample=True, fusion="deep", layer_strategy="offset", layer_offset=1, depth=5)
    model.save_pretrained(tmp_path / "dit")
    assert (tmp_path / "dit" / "diffusion_pytorch_model.safetensors").exists()
    loaded = DeepFusionDiT.from_pretrained(tmp_path / "dit").eval()
    x, stack = torch.randn(2, 4, 16, 32), make_stack()
    assert loaded.layer_indices == model.layer_indices
    assert torch.equal(loaded(x, torch.ones(2), stack), model(x, torch.ones(2), stack))


def test_pooled_text_shifts_the_adaln_embedding_by_the_masked_mean_of_the_last_layer(tmp_path):
    pooled = make_model(pooled_text=True)
    plain = DeepFusionDiT(**{**pooled.config, "pooled_text": False}).eval()
    missing, unexpected = plain.load_state_dict(pooled.state_dict(), strict=False)
    assert not missing and unexpected == ["pooled_proj.0.weight", "pooled_proj.0.bias", "pooled_proj.1.weight",
                                          "pooled_proj.1.bias"]
    x, c_noise, stack = torch.randn(2, 4, 8, 8), torch.tensor([0.3, -0.2]), make_stack(length=6, lengths=[2, 6])
    last = stack.hidden[-1]
    by_hand_mean = torch.stack([last[0, :2].mean(0), last[1].mean(0)])  # the real tokens only
    with torch.no_grad():
        shift = pooled.pooled_proj[1](pooled.pooled_proj[0](by_hand_mean))  # its LayerNorm and Linear
        handle = plain.time_embed.register_forward_hook(lambda module, inputs, out: out + shift)
        expected = plain(x, c_noise, stack)
        handle.remove()
        out = pooled(x, c_noise, stack)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        assert (out - plain(x, c_noise, stack)).abs().max() > 1e-3  # the path is not a no-op
        empty = LayerStack(stack.hidden, torch.zeros_like(stack.mask))  # no token: the same as no text
        torch.testing.assert_close(pooled(x, c_noise, empty), plain(x, c_noise, empty), atol=1e-6, rtol=1e-6)
    pooled.save_pretrained(tmp_path / "pooled")
    loaded = DeepFusionDiT.from_pretrained(tmp_path / "pooled").eval()
    assert loaded.config.pooled_text and torch.equal(loaded(x, c_noise, stack), out)
    old_config = {k: v for k, v in plain.config.items() if k != "pooled_text"}  # saved before the option existed
    assert DeepFusionDiT.from_config(old_config).pooled_proj is None


def test_guided_edm_denoiser_with_layer_stacks():
    # The DiT as EDM's F, guided with a LayerStack condition and the empty prompt's (different lengths):
    # one batched call, and w = 1 equals the conditional denoiser alone.
    denoiser = EDMPrecond(make_model())
    cond, uncond = make_stack(batch=1, length=5, seed=3), make_stack(batch=1, length=2, seed=4)
    x, sigma = torch.randn(1, 4, 16, 16), torch.tensor([2.0])
    torch.testing.assert_close(GuidedDenoiser(denoiser, cond, uncond, 1.0)(x, sigma), denoiser(x, sigma, cond))
    d_c, d_u = denoiser(x, sigma, cond), denoiser(x, sigma, uncond)
    torch.testing.assert_close(GuidedDenoiser(denoiser, cond, uncond, 4.0)(x, sigma), d_u + 4 * (d_c - d_u),
                               atol=1e-5, rtol=1e-5)


def test_bad_input_is_named():
    model = make_model(downsample=True)
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.randn(1, 4, 18, 16), torch.zeros(1), make_stack(batch=1))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 3, 16, 16), torch.zeros(1), make_stack(batch=1))
    with pytest.raises(ValueError, match="cond"):
        model(torch.randn(1, 4, 16, 16), torch.zeros(1), LayerStack(torch.randn(3, 1, 5, TEXT_DIM),
                                                                   torch.ones(1, 5, dtype=torch.bool)))
    with pytest.raises(ValueError, match="fusion"):
        DeepFusionDiT(fusion="mixed", hidden_size=32, num_heads=2, rope_axes=(4, 6, 6))
    with pytest.raises(ValueError, match="kv_dim"):
        DeepFusionDiT(fusion="kv", hidden_size=32, num_heads=2, rope_axes=(4, 6, 6))
    with pytest.raises(ValueError, match="capture_kv"):  # kv fusion given a stack without keys/values
        make_model(fusion="kv", kv_dim=16)(torch.randn(1, 4, 16, 16), torch.zeros(1), make_stack(batch=1))
    with pytest.raises(ValueError, match="rope_axes"):
        DeepFusionDiT(hidden_size=32, num_heads=2, rope_axes=(8, 12, 12))


def test_default_rope_axes_are_resolved_and_saved(tmp_path):
    from deepfusion_ref.dit import default_rope_axes

    # 3/8 of the head per image axis, rounded down to even; the rest (even) for the text position
    assert [default_rope_axes(d) for d in (16, 24, 32, 64)] == [(4, 6, 6), (8, 8, 8), (8, 12, 12), (16, 24, 24)]
    model = DeepFusionDiT(hidden_size=48, num_heads=2, text_dim=TEXT_DIM, num_llm_layers=L)
    assert tuple(model.config.rope_axes) == (8, 8, 8)
    model.save_pretrained(tmp_path)
    assert tuple(DeepFusionDiT.from_pretrained(tmp_path).config.rope_axes) == (8, 8, 8)
    with pytest.raises(ValueError, match="rope_axes"):
        DeepFusionDiT(hidden_size=8, num_heads=2)  # head dimension 4 has no even three-way split


def test_conv_glu_equals_a_hand_written_neighbourhood_sum():
    from deepfusion_ref.dit import ConvGLU

    torch.manual_seed(3)
    mix = ConvGLU(8, 12).double()
    height, width = 4, 6
    x = torch.randn(2, height * width, 8, dtype=torch.float64)
    h = mix.expand(x).view(2, height, width, 24)
    kernel, bias = mix.depthwise.weight[:, 0], mix.depthwise.bias  # [24, 3, 3]
    conv = bias.expand(2, height, width, 24).clone()
    for r in range(height):
        for c in range(width):
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    if 0 <= r + dr < height and 0 <= c + dc < width:  # zero padding at the border
                        conv[:, r, c] += h[:, r + dr, c + dc] * kernel[:, dr + 1, dc + 1]
    value, gate = conv.reshape(2, height * width, 24).chunk(2, dim=-1)
    expected = mix.project(value * gate * torch.sigmoid(gate))
    torch.testing.assert_close(mix(x, (height, width)), expected)
    with pytest.raises(ValueError, match="grid"):
        mix(x, (5, 5))


def test_mix_ffn_model_round_trip_and_bad_ffn(tmp_path):
    model = make_model(ffn="mix", downsample=True)
    x, stack = torch.randn(2, 4, 16, 24), make_stack()
    model.save_pretrained(tmp_path)
    loaded = DeepFusionDiT.from_pretrained(tmp_path).eval()
    assert loaded.config.ffn == "mix"
    torch.testing.assert_close(loaded(x, torch.zeros(2), stack), model(x, torch.zeros(2), stack))
    with pytest.raises(ValueError, match="ffn"):
        make_model(ffn="swiglu")


def test_conv_glu_is_sanas_glumbconv_without_its_first_silu():
    from diffusers.models.transformers.sana_transformer import GLUMBConv

    from deepfusion_ref.dit import ConvGLU

    torch.manual_seed(2)
    ours, sana = ConvGLU(8, 12).double(), GLUMBConv(8, 8, expand_ratio=1.5, residual_connection=False).double()
    with torch.no_grad():
        sana.conv_inverted.weight.copy_(ours.expand.weight[:, :, None, None])
        sana.conv_inverted.bias.copy_(ours.expand.bias)
        sana.conv_depth.load_state_dict(ours.depthwise.state_dict())
        sana.conv_point.weight.copy_(ours.project.weight[:, :, None, None])
        ours.project.bias.zero_()
    x = torch.randn(2, 3 * 5, 8, dtype=torch.float64)
    image = x.transpose(1, 2).reshape(2, 8, 3, 5)
    expected = sana(image).flatten(2).transpose(1, 2)
    assert not torch.allclose(ours(x, (3, 5)), expected)  # SANA's SiLU on the expansion differs
    ours.expand.register_forward_hook(lambda module, args, out: torch.nn.functional.silu(out))
    torch.testing.assert_close(ours(x, (3, 5)), expected)
