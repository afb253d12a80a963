import pytest
import torch

from deepfusion_ref.text import packaged_minilm_path, train_bpe_tokenizer


def pytest_collection_modifyitems(config, items):
    "Tests marked `cuda` are skipped on machines without a GPU."
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def threads():
    "Set torch's intra-op thread count for one test (the CPU kernel picks its parallel strategy from it)."
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


CAPTIONS = [f"a {c} {s} {r} a {c2} {s2}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "star")
            for r in ("left of", "above") for c2 in ("cream", "purple") for s2 in ("triangle", "disc")]
PROMPTS = ["a red circle above a purple disc", "a star", "two blue squares left of a yellow triangle"]


def _save(model, tokenizer, path, image_processor=None):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if image_processor is not None:
        image_processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    "Folders of tiny real transformers models, built from configs and saved with save_pretrained."
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    tok = train_bpe_tokenizer(CAPTIONS, vocab_size=300)
    small = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    folders = {
        "llama": _save(transformers.LlamaForCausalLM(transformers.LlamaConfig(**small)), tok, root / "llama"),
        "qwen2": _save(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**small)), tok, root / "qwen2"),
    }
    t5_tok = train_bpe_tokenizer(CAPTIONS, vocab_size=300, add_bos=False, add_eos=True)  # T5 appends </s>
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64,
                                                           num_layers=2, num_heads=4, pad_token_id=t5_tok.pad_token_id))
    folders["t5"] = _save(t5, t5_tok, root / "t5")
    bert_tok = transformers.AutoTokenizer.from_pretrained(packaged_minilm_path(), local_files_only=True)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=bert_tok.vocab_size, hidden_size=32,
                                                          num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=64), add_pooling_layer=False)
    folders["bert"] = _save(bert, bert_tok, root / "bert")

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                     "<|vision_end|>")}
    vl_config = transformers.Qwen2VLConfig(
        text_config=dict(small, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    folders["qwen2_vl"] = _save(transformers.Qwen2VLForConditionalGeneration(vl_config), tok, root / "qwen2_vl",
                                Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112))
    return folders
