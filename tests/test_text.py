"""LanguageModel against the transformers models it wraps: tiny Llama, Qwen2, T5, BERT and Qwen2-VL built from
configs, saved and loaded back; the stack must equal the model's own output_hidden_states, the masks the
tokenizer's; plus run-once caching, padding invariance, templates, truncation, and the packaged MiniLM."""
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.utils import logging as hf_logging  # noqa: E402
from conftest import CAPTIONS, PROMPTS  # noqa: E402

from deepfusion_ref.schedules import GuidedDenoiser, karras_sigmas, sample_euler  # noqa: E402
from deepfusion_ref.text import (LanguageModel, LayerStack, build_caption_lm, model_kind,  # noqa: E402
                                 packaged_minilm_path, train_bpe_tokenizer)

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

@pytest.mark.parametrize("name, kind", [("llama", "causal"), ("qwen2", "causal"), ("t5", "t5"), ("bert", "encoder"),
                                        ("qwen2_vl", "qwen2_vl")])
def test_stack_equals_models_own_hidden_states(tiny_models, name, kind):
    lm = LanguageModel.from_pretrained(tiny_models[name], max_length=64)
    assert lm.kind == kind and model_kind(lm.model.config) == kind
    alone = lm.encode(PROMPTS)  # batch_invariant (the default): each prompt runs on its own
    for j, prompt in enumerate(PROMPTS):
        single = lm.tokenizer([prompt], return_tensors="pt")
        with torch.no_grad():
            own = lm.model(**single, output_hidden_states=True).hidden_states
        n = single["input_ids"].shape[1]
        assert alone.mask[j].sum() == n and all(torch.equal(alone.hidden[i, j, :n], own[i + 1][0])
                                                for i in range(lm.num_layers))
    lm.batch_invariant = False  # one batched forward: equal to the model's own batched forward
    lm.clear_cache()
    stack = lm.encode(PROMPTS)
    enc = lm.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        own = lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                       output_hidden_states=True).hidden_states
    assert stack.hidden.shape == (lm.num_layers, len(PROMPTS), enc["input_ids"].shape[1], lm.hidden_size)
    assert torch.equal(stack.mask, enc["attention_mask"].bool())
    for i in range(lm.num_layers):  # exactly, at every real token; zeros at padding
        assert torch.equal(stack.hidden[i][stack.mask], own[i + 1][stack.mask])
        assert (stack.hidden[i][~stack.mask] == 0).all()
    pooled = (own[-1] * stack.mask[..., None]).sum(1) / stack.mask.sum(1, keepdim=True)
    torch.testing.assert_close(stack.pooled, pooled)


@pytest.mark.parametrize("name", ["llama", "qwen2", "t5", "bert"])
def test_captured_keys_and_values_are_the_layers_own(tiny_models, name):
    lm = LanguageModel.from_pretrained(tiny_models[name], capture_kv=True)
    stack = lm.encode(PROMPTS)
    assert stack.keys.shape[:3] == stack.hidden.shape[:3] == stack.values.shape[:3]
    if name in ("llama", "qwen2"):  # recompute layer i's k_proj/v_proj from its input, independently of the hooks
        enc = lm.tokenizer(PROMPTS, padding=True, return_tensors="pt")
        with torch.no_grad():
            states = lm.model(**enc, output_hidden_states=True).hidden_states
            for i, layer in enumerate(lm.model.model.layers):
                normed = layer.input_layernorm(states[i])
                torch.testing.assert_close(stack.keys[i][stack.mask], layer.self_attn.k_proj(normed)[stack.mask])
                torch.testing.assert_close(stack.values[i][stack.mask], layer.self_attn.v_proj(normed)[stack.mask])
    with pytest.raises(ValueError, match="capture_kv"):
        LanguageModel.from_pretrained(tiny_models[name], capture_kv=True, include_embeddings=True)


def test_include_embeddings_adds_the_embedding_output(tiny_models):
    lm = LanguageModel.from_pretrained(tiny_models["llama"], include_embeddings=True)
    stack = lm.encode("a star")
    enc = lm.tokenizer(["a star"], return_tensors="pt")
    with torch.no_grad():
        own = lm.model(**enc, output_hidden_states=True).hidden_states
    assert stack.num_layers == len(own) and torch.equal(stack.hidden[0, 0], own[0][0])


@pytest.mark.parametrize("name", ["llama", "qwen2", "t5", "bert"])
def test_padding_invariance(tiny_models, name):
    lm = LanguageModel.from_pretrained(tiny_models[name])
    alone = lm.encode("a star")
    lm.clear_cache()
    batch = lm.encode(["two blue squares left of a yellow triangle and a red star", "a star"])
    n = alone.mask.sum()
    torch.testing.assert_close(batch.hidden[:, 1, :n], alone.hidden[:, 0, :n], rtol=1e-5, atol=1e-5)
    assert batch.mask[1].sum() == n


def test_language_model_runs_once_per_prompt_during_guided_sampling(tiny_models):
    lm = LanguageModel.from_pretrained(tiny_models["llama"])
    calls = []
    lm.model.register_forward_hook(lambda *args: calls.append(1))
    seen = []

    def denoiser(x, sigma, cond: LayerStack):  # a stand-in network that reads the stack
        seen.append(cond.hidden.shape[1])
        return x * 0.9 + 0.0 * cond.pooled.mean(1, keepdim=True)

    def naive_guided(x, sigma):  # encodes the prompt and the empty prompt at *every* step
        return GuidedDenoiser(denoiser, lm.encode("a red circle above a purple disc"), lm.encode(""), 5.0)(x, sigma)

    sample_euler(naive_guided, torch.randn(1, 4), karras_sigmas(50), progress=False)
    assert len(calls) == 2  # once for the prompt, once for the empty prompt
    assert seen == [2] * 50  # cond and uncond stacks concatenated into one network call per step
    lm.encode("a new prompt")
    assert len(calls) == 3


def test_template_tokens_are_dropped(tiny_models):
    plain = LanguageModel.from_pretrained(tiny_models["llama"])
    templated = LanguageModel.from_pretrained(tiny_models["llama"],
                                              template="System: draw what the user asks.\nUser: {prompt}\nAssistant:")
    for prompt in PROMPTS:
        n_prompt = len(plain.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        stack = templated.encode(prompt)
        assert stack.mask.sum() == n_prompt
        # the kept positions saw the template: their states differ from the prompt encoded alone
        assert not torch.allclose(stack.hidden[-1, 0, :n_prompt], plain.encode(prompt).hidden[-1, 0, 1:n_prompt + 1])
    with pytest.raises(ValueError, match="template"):
        LanguageModel.from_pretrained(tiny_models["llama"], template="no placeholder")


def test_chat_template_tokens_are_dropped(tiny_models):
    lm = LanguageModel.from_pretrained(tiny_models["llama"], template="chat")
    lm.tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                                  "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    prompt = "a red circle above a purple disc"
    rendered, start = lm._render(prompt)
    assert rendered.startswith("<s>user: ") and rendered[start:start + len(prompt)] == prompt
    n_prompt = len(lm.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert lm.encode(prompt).mask.sum() == n_prompt


def test_truncation_warns_with_the_number_dropped(tiny_models):
    lm = LanguageModel.from_pretrained(tiny_models["llama"], max_length=8)
    prompt = "a red circle above a purple disc and a green star left of a cream triangle"
    total = len(lm.tokenizer(prompt)["input_ids"])
    with pytest.warns(UserWarning, match=f"{total - 8} tokens dropped"):
        stack = lm.encode(prompt)
    assert stack.hidden.shape[2] == 8


def test_t5_in_float16_warns(tiny_models):
    with pytest.warns(RuntimeWarning, match="float16"):
        LanguageModel.from_pretrained(tiny_models["t5"], dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        LanguageModel.from_pretrained(tiny_models["t5"], dtype=torch.bfloat16)


def test_qwen2_vl_image_adds_visual_tokens(tiny_models):
    from PIL import Image

    lm = LanguageModel.from_pretrained(tiny_models["qwen2_vl"])
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    text_only = lm.encode(["a star", "a red circle"])
    with_image = lm.encode(["a star", "a red circle"], images=images)
    grid = lm.image_processor(images=images[:1], return_tensors="pt")["image_grid_thw"]
    n_visual = int(grid.prod()) // lm.image_processor.merge_size**2
    assert (with_image.mask.sum(1) == text_only.mask.sum(1) + n_visual + 2).all()  # + vision start/end tokens
    other = lm.encode(["a star", "a red circle"], images=images[::-1])
    assert not torch.allclose(with_image.hidden[-1, 0], other.hidden[-1, 0])  # the image matters
    with pytest.raises(ValueError, match="images"):
        lm.encode(["a star"], images=images)


def test_missing_folders_and_processor_give_clear_errors(tiny_models, tmp_path):
    with pytest.raises(FileNotFoundError, match="path_or_id"):
        LanguageModel.from_pretrained(tmp_path / "nowhere")
    broken = tmp_path / "vl_without_processor"
    broken.mkdir()
    for f in tiny_models["qwen2_vl"].iterdir():
        if f.name != "preprocessor_config.json":
            (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FileNotFoundError, match="image processor"):
        LanguageModel.from_pretrained(broken)
    text_lm = LanguageModel.from_pretrained(tiny_models["llama"])
    with pytest.raises(ValueError, match="images"):
        text_lm.encode(["a star"], images=[None])
    with pytest.raises(ValueError, match="prompts"):
        text_lm.encode([])


def test_layer_stack_helpers():
    a = LayerStack(torch.ones(3, 1, 2, 4), torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 4))
    b = LayerStack(torch.ones(3, 1, 5, 4) * 2, torch.ones(1, 5, dtype=torch.bool), torch.ones(1, 4))
    both = LayerStack.stack([a, b])
    assert both.hidden.shape == (3, 2, 5, 4) and both.mask.sum(1).tolist() == [2, 5]
    assert both.layers([2, 0]).shape == (2, 2, 5, 4)
    with pytest.raises(ValueError, match="indices"):
        both.layers([3])


def test_packaged_minilm_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    path = packaged_minilm_path()
    lm = LanguageModel.from_pretrained(path, max_length=128)
    sentences = ["A red circle above a small blue square.", "Two green triangles on a cream background, far apart."]
    ours = torch.nn.functional.normalize(lm.encode(sentences).pooled, dim=-1)
    reference = st.SentenceTransformer(str(path), device="cpu").encode(sentences, convert_to_tensor=True)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_build_caption_lm_learns_and_loads(tmp_path):
    path = build_caption_lm(CAPTIONS, tmp_path / "lm", vocab_size=300, layers=2, dim=32, steps=40, progress=False)
    losses = [float(v) for v in (path / "train_losses.txt").read_text().split()]
    assert losses[-1] < 0.6 * losses[0]
    lm = LanguageModel.from_pretrained(path)
    assert lm.kind == "causal" and lm.num_layers == 2 and lm.encode(CAPTIONS[:4]).hidden.shape[:2] == (2, 4)


def test_qwen2_vl_image_weights_scale_the_visual_grid(tiny_models):
    from deepfusion_ref.text import image_tensor

    lm = LanguageModel.from_pretrained(tiny_models["qwen2_vl"])
    image = torch.rand(3, 56, 56, generator=torch.Generator().manual_seed(0))
    grid = lm.image_processor(images=[image], do_rescale=False, return_tensors="pt")["image_grid_thw"][0]
    gh, gw = (int(n) // lm.image_processor.merge_size for n in grid[1:])
    plain = lm.encode(["a star"], images=[image])
    ones = lm.encode(["a star"], images=[image], image_weights=torch.ones(gh, gw))
    torch.testing.assert_close(ones.hidden, plain.hidden, rtol=0, atol=0)
    silent = lm.encode(["a star"], images=[image], image_weights=torch.zeros(gh, gw))
    visual = silent.hidden[:, 0].abs().sum((0, 2)) == 0  # exactly the visual tokens are silenced
    assert int(visual.sum()) == gh * gw
    weights = torch.rand(gh, gw, generator=torch.Generator().manual_seed(1))
    scaled = lm.encode(["a star"], images=[image], image_weights=lambda h, w: weights)
    torch.testing.assert_close(scaled.hidden[:, 0, visual],  # row-major over the merged grid, every layer
                               plain.hidden[:, 0, visual] * weights.reshape(1, -1, 1))
    torch.testing.assert_close(scaled.hidden[:, 0, ~visual], plain.hidden[:, 0, ~visual], rtol=0, atol=0)
    with pytest.raises(ValueError, match="image_weights"):
        lm.encode(["a star"], images=[image], image_weights=torch.ones(gh + 1, gw))
    with pytest.raises(ValueError, match="image_weights"):
        lm.encode(["a star"], image_weights=torch.ones(gh, gw))
    # the processor sees the float pixels themselves: a uint8 image equals its float / 255
    as_uint8 = (image * 255).round().to(torch.uint8)
    torch.testing.assert_close(lm.encode(["a star"], images=[as_uint8]).hidden,
                               lm.encode(["a star"], images=[as_uint8.float() / 255]).hidden)
    assert torch.equal(image_tensor(as_uint8), image_tensor(as_uint8.permute(1, 2, 0).numpy()))


@pytest.mark.parametrize("bad, error", [(lambda im: im * 2 - 1, "x \\+ 1"), (lambda im: im[:, :8, :8], "pixels"),
                                        (lambda im: "image.png", "PIL"), (lambda im: im[0], r"\[3, H, W\]"),
                                        (lambda im: im.to(torch.int32), "uint8")])
def test_qwen2_vl_bad_images_are_named(tiny_models, bad, error):
    lm = LanguageModel.from_pretrained(tiny_models["qwen2_vl"])
    image = torch.rand(3, 56, 56)
    with pytest.raises((TypeError, ValueError), match=f"images\\[1\\].*{error}"):
        lm.encode(["a star", "a circle"], images=[image, bad(image)])


def test_qwen2_vl_cache_is_keyed_by_prompt_and_image(tiny_models):
    lm = LanguageModel.from_pretrained(tiny_models["qwen2_vl"])
    a, b = torch.rand(3, 56, 56), torch.rand(3, 56, 56)
    calls = []
    hook = lm.model.register_forward_hook(lambda *args: calls.append(1))
    first = lm.encode(["a star", "a star"], images=[a, b])
    again = lm.encode(["a star", "a star"], images=[a, b])
    n_first = len(calls)  # one pass, or one per distinct pair where padding could change the states
    lm.encode(["a star"], images=[a.clone()])  # equal pixels: the same key
    assert len(calls) == n_first and torch.equal(first.hidden, again.hidden)
    lm.encode(["a star"], images=[a.flip(-1)])  # other pixels: a new pass
    hook.remove()
    assert len(calls) == n_first + 1
    assert not torch.allclose(first.hidden[-1, 0], first.hidden[-1, 1])  # two images, two encodings


@pytest.mark.parametrize("name, last", [("llama", "model.layers.2."), ("qwen2", "model.layers.2."),
                                        ("t5", "encoder.block.1."), ("bert", "encoder.layer.1."),
                                        ("qwen2_vl", "layers.2.")])
def test_tail_modules_are_the_last_layers_and_only_they_learn(tiny_models, name, last):
    lm = LanguageModel.from_pretrained(tiny_models[name], max_length=64)
    tail = lm.tail_modules(1)
    tail.requires_grad_(True)
    stack = lm.encode(PROMPTS[:2], grad=True)
    assert torch.allclose(stack.hidden, lm.encode(PROMPTS[:2]).hidden, atol=1e-5)  # the same values, with autograd
    stack.hidden[-1].sum().backward()
    grads = {n for n, p in lm.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = {n for n, p in lm.model.named_parameters() if any(p is q for q in tail.parameters())}
    assert grads == expected and any(last in n for n in grads)
    has_norm = name in ("llama", "qwen2", "qwen2_vl", "t5")  # decoders and T5 norm the last layer's output
    assert any("norm" in n for n in grads) == has_norm
    with pytest.raises(ValueError, match="k must be an int in 1.."):
        lm.tail_modules(9)
