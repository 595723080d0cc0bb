"""Quantized reading (model/quantize.py): layers against fp32 within stated errors, memory
reading still equal to prefilling at every precision, greedy agreement with fp32 held to the
measured floor, memories encoded the same at every precision, clear errors for what is not
supported."""

import pytest

torch = pytest.importorskip("torch")

import m3db  # noqa: E402
from m3db.model.memory_model import MemoryModel  # noqa: E402
from m3db.model.quantize import GROUP, Int4Linear, Int8Linear, PrecisionError, quantize_decoder  # noqa: E402
from m3db.testing import HashEmbedder  # noqa: E402


def relative_error(layer, weight, x):
    want = x @ weight.T
    return float((layer(x) - want).norm() / want.norm())


def q4_1_weights(rows, cols, generator):
    """Weights made the way a Q4_1 GGUF stores them: per block of 32, scale * q + minimum,
    with q spanning 0..15 (llama.cpp's rule puts the block's min and max on 0 and 15)."""
    q = torch.randint(0, 16, (rows, cols // GROUP, GROUP), generator=generator).float()
    q[..., 0], q[..., 1] = 0, 15
    scale = torch.rand(rows, cols // GROUP, 1, generator=generator) * 0.01 + 0.001
    low = -8 * scale + torch.randn(rows, cols // GROUP, 1, generator=generator) * 0.001
    return (q * scale + low).reshape(rows, cols)


def test_quantized_layers_against_fp32():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(192, 256, generator=g) * 0.02
    x = torch.randn(5, 256, generator=g)
    # int8 per channel: half a step of 1/127 of the row's largest weight, plus bf16 activations
    assert relative_error(Int8Linear(w), w, x) < 0.01
    # int4 of arbitrary weights: 16 levels per group of 32
    assert relative_error(Int4Linear(w), w, x) < 0.12
    # int4 of weights that are Q4_1 blocks: exact weights, only bf16 rounding is left
    w4 = q4_1_weights(192, 256, g)
    assert relative_error(Int4Linear(w4), w4, x) < 0.005
    # batched and 3-d inputs keep their shape
    assert Int8Linear(w)(torch.randn(2, 3, 256)).shape == (2, 3, 192)
    assert Int4Linear(w)(torch.randn(2, 3, 256)).shape == (2, 3, 192)


def test_int4_needs_whole_groups():
    with pytest.raises(PrecisionError, match="multiple of 32"):
        Int4Linear(torch.randn(8, 40))


def test_unknown_precision_is_a_clear_error(tmp_path):
    with pytest.raises(PrecisionError, match="fp32, int8, int4"):
        MemoryModel.tiny(precision="fp16")
    with pytest.raises(m3db.InvalidInputError, match="precision='int3'"):
        m3db.connect(str(tmp_path / "kb"), precision="int3")
    assert not (tmp_path / "kb").exists()


def test_precision_changes_reading_not_memories(tmp_path):
    """Memories are encoded by the fp32 decoder at every precision: a database records no
    precision, and one built at int4 holds byte-identical memories to one built at fp32."""
    fp32 = MemoryModel.tiny(std=0.1)
    texts = ["The Zorblax festival is held every March.", "Quimby lies on the river Flent."]
    for precision in ("int8", "int4"):
        model = fp32.at_precision(precision)
        assert model.precision == precision and model.reader is not model.decoder
        assert model.decoder is fp32.decoder  # the same fp32 weights, shared
        assert fp32.at_precision(precision).reader is model.reader  # quantized once
        for a, b in zip(fp32.encode(texts), model.encode(texts)):
            for key in ("positions", "keys", "values"):
                assert (a[key] == b[key]).all()
    embedder = HashEmbedder()
    with m3db.connect(str(tmp_path / "a"), model=fp32, embedder=embedder) as db:
        db.add_documents([{"text": t} for t in texts], progress=False)
        spec = db.spec.to_dict()
    with m3db.connect(str(tmp_path / "a"), model=fp32, embedder=embedder, precision="int4") as db:
        assert db.spec.to_dict() == spec  # nothing about precision is stored
        answer = db.generate("When is the Zorblax festival?", max_tokens=4)
        assert answer.sources and answer.finish_reason in ("stop", "length", "empty")
        assert db.models()[0].precision == "int4"


def test_quantized_decoder_leaves_the_original_untouched():
    m = MemoryModel.tiny()
    before = {k: v.clone() for k, v in m.decoder.state_dict().items()}
    q = quantize_decoder(m.decoder, "int8")
    assert isinstance(q.blocks[0].attn.qkv_proj, Int8Linear)  # q, k, v fused in one projection
    assert q.blocks[0].attn_norm is m.decoder.blocks[0].attn_norm  # shared, fp32
    assert m.decoder.head is None and isinstance(q.head, Int8Linear)
    for k, v in m.decoder.state_dict().items():
        assert torch.equal(v, before[k])
    ids = torch.tensor([m.tokenizer.encode("hello there")])
    with torch.no_grad():
        assert q(ids).shape == m.decoder(ids).shape


# -- the bundled weights ---------------------------------------------------------------------------

QUESTIONS = [
    "What is the capital of Australia?",
    "Who wrote Pride and Prejudice?",
    "How many legs does a spider have?",
    "What is the boiling point of water?",
    "Name three primary colors.",
    "What does DNA stand for?",
    "Who was the first person on the moon?",
    "What is the largest ocean?",
]
# greedy 20-token replies identical to fp32's, measured on QUESTIONS: int4 5/8, int8 5/8 (the
# floors leave one reply of room; bench/bench_precision.py measures it on 90 questions)
AGREEMENT_FLOOR = {"int4": 4, "int8": 4}
# memory read vs prefill through the same quantized reader: the largest KL divergence of the
# next-token distributions over the context's positions (nats)
READ_VS_PREFILL = {"fp32": 1e-6, "int8": 0.05, "int4": 0.05}


@pytest.fixture(scope="module")
def bundled():
    pytest.importorskip("gguf")
    try:
        return MemoryModel.load()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_greedy_replies_agree_with_fp32_at_the_measured_floor(bundled, precision):
    quantized = bundled.at_precision(precision)
    same = 0
    for q in QUESTIONS:
        chat = [{"role": "user", "content": q}]
        a = bundled.generate(chat, mode="none", max_tokens=20).text
        b = quantized.generate(chat, mode="none", max_tokens=20).text
        same += a == b
    print(f"{precision}: {same}/{len(QUESTIONS)} greedy replies identical to fp32")
    assert same >= AGREEMENT_FLOOR[precision]


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_memory_read_equals_prefill_at_every_precision(bundled, precision):
    """Every layer a memory layer, every token kept: reading the memory through the quantized
    reader equals prefilling its text through the same reader, within the precision's noise,
    and the greedy continuation is the same."""
    from m3db.model.cache import KVCache
    from m3db.model.generate import Sampling, run
    from m3db.model.memory import EncodedMemory, context_start, place
    from m3db.model.settings import MemorySettings

    s = MemorySettings(
        memory_layers=None,
        tokens_per_head=256,
        position_policy="sequential",
        memories_per_chunk=1,
        reference_length=256,
    )
    m = bundled.with_settings(s, adapter=None).at_precision(precision)
    s = m.settings
    ref = "The Zorblax festival is held every March in the town of Quimby, on the river Flent."
    ctx_ids = m.tokenizer.encode("\nQuestion: In which month is the Zorblax festival held?\nAnswer:")
    item = EncodedMemory.from_encoded(1, ref, m.encode([ref])[0])
    cfg = m.decoder.cfg
    keys, values, valid = place([[item]], m.sink_keys, m.sink_values, s, cfg.head_dim, cfg.rope_base)
    cache = KVCache(1, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, 64, s.memory_layers)
    cache.set_memory(keys, values, valid)
    start = context_start(s, len(m.prefix_ids))
    with torch.no_grad():
        got = m.reader(torch.tensor([ctx_ids]), positions=torch.arange(start, start + len(ctx_ids))[None], cache=cache)
        want = m.reader(torch.tensor([m.prefix_ids + m.tokenizer.encode(ref) + ctx_ids]))[:, -len(ctx_ids) :]
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True, reduction="none")
    worst = float(kl.sum(-1).max())
    print(f"{precision}: memory read vs prefill, largest KL {worst:.2e} nats")
    if precision == "fp32":  # the decoder's own equivalence, at fp32's tolerance
        assert float((got - want).abs().max()) < 2e-3
    assert worst < READ_VS_PREFILL[precision]
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    assert agree >= (1.0 if precision == "fp32" else 0.85)  # measured: int4 9/9 positions, int8 8/9
    sampling = Sampling(max_tokens=6, stop_tokens=())
    with_memory, steps = run(m, [ctx_ids], mode="memory", retriever=lambda q, k: [item], sampling=sampling)
    list(steps)
    with_text, steps = run(
        m, [m.prefix_ids + m.tokenizer.encode(ref) + ctx_ids], mode="none", retriever=None, sampling=sampling
    )
    list(steps)
    assert with_memory.results()[0].tokens == with_text.results()[0].tokens


def test_a_gguf_type_m3db_cannot_read_is_a_clear_error(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from m3db.model.gguf_loader import load_gguf

    path = tmp_path / "q8_1.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_head_count(1)
    w.add_embedding_length(32)
    w.add_feed_forward_length(32)
    w.add_context_length(64)
    w.add_token_list(["a", "b"])
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    raw = np.zeros((2, 32 // block * size), dtype=np.uint8)  # 2 rows of 32 values
    w.add_tensor("token_embd.weight", raw, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="'token_embd.weight' is stored as Q8_1, a type m3db cannot read"):
        load_gguf(path)


def test_the_bundled_decoder_reads_at_its_own_int4_by_default(bundled):
    """Issue 30: the weights' own precision is the default (int4: within 0.02 nats of fp32 and
    the same exact match, docs/decoder.md); fp32 is one argument away; memories stay fp32's."""
    from m3db.knowledge.bundled import DEFAULT_PRECISION
    from m3db.knowledge.bundled import bundled as load_bundled

    model, _ = load_bundled()
    assert DEFAULT_PRECISION == "int4" and model.precision == "int4" and model.reader is not model.decoder
    assert load_bundled(precision="fp32")[0].precision == "fp32"
    assert load_bundled("sparse")[0].precision == "int4"
    assert model.decoder is load_bundled(precision="fp32")[0].decoder  # memories: encoded by the same fp32 weights


def test_a_long_prefill_runs_on_the_fp32_weights_and_steps_on_the_quantized():
    """Many tokens at once are compute-bound (fp32's matmuls win); one token is bandwidth-bound
    (the quantized weights win): a prefill of FP32_PREFILL_FROM tokens or more runs on fp32."""
    from m3db.model.generate import FP32_PREFILL_FROM, GenerationLoop, Sampling

    fp32 = MemoryModel.tiny(std=0.1)
    int4 = fp32.at_precision("int4")
    loop = GenerationLoop(int4, [[1, 2, 3]], "none", None, Sampling(max_tokens=2))
    assert loop.forward_for(FP32_PREFILL_FROM)[0] is fp32.decoder
    assert loop.forward_for(1)[0] is int4.reader and int4.reader is not fp32.decoder
    long_prompt = "The Zorblax festival is held every March in Quimby, on the river Flent. " * 3
    assert len(fp32.tokenizer.encode(long_prompt)) >= FP32_PREFILL_FROM
    # the first token comes from the prefill alone: the same as fp32's, exactly
    a = fp32.generate(long_prompt, mode="none", max_tokens=1).tokens
    b = int4.generate(long_prompt, mode="none", max_tokens=1).tokens
    assert a == b
