"""What a hurried user passes to generate() and add(), each finding pinned: stop strings where
token ids belong, sampling options out of range, a filter's error reworded, a closed database,
and metadata keys that differ only in case (DuckDB column names ignore case)."""

import threading

import numpy as np
import pytest

pytest.importorskip("torch")
import m3db  # noqa: E402
from m3db.model.memory_model import MemoryModel  # noqa: E402
from m3db.testing import HashEmbedder  # noqa: E402

DOCS = [
    {"text": "Tokyo is the capital of Japan.", "source": "wiki/Tokyo", "title": "Tokyo"},
    {"text": "Paris is the capital of France.", "source": "wiki/Paris", "title": "Paris"},
]


def test_stop_tokens_are_token_ids_within_the_vocabulary(kb, tiny):
    # a string (OpenAI's `stop`) once replaced the stop set with one that never matched
    for strings in (["\n"], "\n", ("</s>",), [2, "x"]):
        with pytest.raises(m3db.InvalidInputError, match=r"token ids, not strings.*model\.tokenizer\.encode"):
            kb.generate("hi", stop_tokens=strings, max_tokens=2)
    for wrong in (5, {2}, [1.5], [True]):
        with pytest.raises(
            m3db.InvalidInputError, match=r"stop_tokens must be a list of token ids.*None \(the default"
        ):
            kb.generate("hi", stop_tokens=wrong, max_tokens=2)
    vocab = tiny.decoder.cfg.vocab_size
    for outside in ([vocab], [-1], [0, 10**9]):
        with pytest.raises(
            m3db.InvalidInputError, match=rf"not token ids of this model \(ids are \[0, {vocab - 1}\]\)"
        ):
            kb.generate("hi", stop_tokens=outside, max_tokens=2)
    assert kb.generate("hi", stop_tokens=[], max_tokens=3, memory=False).finish_reason == "length"  # [] documented
    assert kb.generate("hi", stop_tokens=(np.int64(vocab - 1),), max_tokens=2, memory=False).text is not None
    # the model's own stop ids, passed explicitly, end the answer as the default does
    default = kb.generate("hi", max_tokens=40, memory=False)
    explicit = kb.generate("hi", stop_tokens=list(tiny.default_stop_tokens), max_tokens=40, memory=False)
    assert (explicit.text, explicit.finish_reason) == (default.text, default.finish_reason)


def test_stop_tokens_of_a_transformers_model_are_checked_against_its_logits(tmp_path):
    pytest.importorskip("transformers")
    from hf_tiny import tiny_model, tiny_tokenizer

    from m3db.bindings.transformers import HFMemoryModel

    # 300 logits over a 259-token tokenizer: an id the model can emit is a valid stop id
    model = HFMemoryModel(tiny_model("llama", vocab_size=300), tiny_tokenizer())
    with m3db.connect(tmp_path / "hf", model=model, embedder=HashEmbedder()) as db:
        assert db.generate("hi", stop_tokens=[299], max_tokens=1, memory=False).finish_reason in ("length", "stop")
        with pytest.raises(m3db.InvalidInputError, match=r"ids are \[0, 299\]"):
            db.generate("hi", stop_tokens=[300], max_tokens=1, memory=False)
        with pytest.raises(m3db.InvalidInputError, match="not strings"):
            db.generate("hi", stop_tokens=["\n"], max_tokens=1, memory=False)


def test_sampling_options_are_checked_alike_in_python_and_sql(kb):
    bad = [
        ("temperature", float("nan"), r"temperature must be a number in \[0, 100\]"),
        ("temperature", "0.5", r"temperature must be a number in \[0, 100\].*'0\.5'"),
        ("temperature", -1, r"temperature must be a number in \[0, 100\].*-1"),
        ("temperature", float("inf"), "temperature must be a number"),
        ("top_p", 2, r"top_p must be a number in \(0, 1\]"),
        ("top_p", -1, r"top_p must be a number in \(0, 1\]"),
        ("top_p", 0, r"top_p must be a number in \(0, 1\]"),
        ("seed", None, r"seed must be an integer in \[0, 9223372036854775807\], got None"),
        ("seed", "x", r"seed must be an integer in \[0, "),
        ("seed", -1, r"seed must be an integer in \[0, "),
        ("seed", 1.0, r"seed must be an integer"),
        ("k", "3", r"k must be None \(the model's default, 5\) or an integer >= 1.*'3'"),
        ("k", -1, r"k must be None .* or an integer >= 1"),
        ("k", 0, r"k must be None .* or an integer >= 1"),
        ("max_tokens", 0, "max_tokens must be a positive integer"),
    ]
    for name, value, message in bad:
        with pytest.raises(m3db.InvalidInputError, match=message):
            kb.generate("hi", **{"max_tokens": 2, name: value})
    # SQL's generate() reaches the same check, with the same words
    for sql in (
        "SELECT * FROM generate('hi', temperature => -1, max_tokens => 2)",
        "SELECT * FROM generate('hi', temperature => 'nan'::DOUBLE, max_tokens => 2)",
        "SELECT * FROM generate('hi', temperature => 'x', max_tokens => 2)",
    ):
        with pytest.raises(m3db.InvalidInputError, match=r"temperature must be a number in \[0, 100\]"):
            kb.sql(sql)
    with pytest.raises(m3db.InvalidInputError, match=r"seed must be an integer in \[0, "):
        kb.sql("SELECT * FROM generate('hi', seed => -1, max_tokens => 2)")
    with pytest.raises(m3db.InvalidInputError, match=r"top_p must be a number in \(0, 1\]"):
        kb.sql("SELECT * FROM generate('hi', top_p => 1.5, max_tokens => 2)")
    # what both accepted before still works, numpy numbers included
    kb.add_documents(DOCS, progress=False)
    kw = dict(max_tokens=3, temperature=0.5, top_p=0.9, seed=7, k=1)
    a = kb.generate("Where is Tokyo?", **kw)
    assert kb.generate("Where is Tokyo?", **dict(kw, temperature=np.float32(0.5), seed=np.int64(7))).text == a.text
    rows = kb.sql(
        "SELECT text FROM generate('Where is Tokyo?', max_tokens => 3, temperature => 0.5, top_p => 0.9, "
        "seed => 7, k => 1)"
    )
    assert rows[0][0] == a.text
    assert kb.generate("hi", max_tokens=2, temperature=1, top_p=1, seed=0, memory=False).finish_reason


def test_a_bad_filter_stays_a_query_error(kb):
    kb.add_documents(DOCS, progress=False)
    with pytest.raises(m3db.QueryError, match="nope") as caught:
        kb.generate("hi", where="nope = 1", max_tokens=2)
    assert not isinstance(caught.value, m3db.InvalidInputError)
    with pytest.raises(m3db.QueryError, match="unknown column 'nope'"):
        kb.generate("hi", where={"nope": 1}, max_tokens=2)


def test_generate_refuses_a_closed_database_before_decoding_and_reads_the_catalog_under_the_mutex(tiny, tmp_path):
    calls = []

    class Spy:  # the bundled model, counting the answers it is asked to decode
        def __getattr__(self, name):
            return getattr(tiny, name)

        def generate(self, prompt, **kw):
            calls.append(prompt)
            return tiny.generate(prompt, **kw)

    db = m3db.connect(tmp_path / "kb", model=Spy(), embedder=HashEmbedder())
    db.add_documents(DOCS, progress=False)
    # the catalog's one DuckDB connection serves one call at a time: the sources' read holds the lock
    held = []
    read = db.catalog.document_names

    def document_names(ids):
        free = []
        probe = threading.Thread(target=lambda: free.append(db.mutex.acquire(blocking=False)))
        probe.start()
        probe.join()
        if free[0]:
            db.mutex.release()
        held.append(not free[0])
        return read(ids)

    db.catalog.document_names = document_names
    answer = db.generate("Where is Tokyo?", max_tokens=2, k=1)
    assert held == [True] and answer.sources and answer.sources[0].document in ("wiki/Tokyo", "wiki/Paris")
    db.close()
    assert calls  # the spy is on the path generate() takes: its silence below means something
    calls.clear()
    for memory in (False, True, "rag"):
        with pytest.raises(m3db.ClosedError, match="is closed; connect"):
            db.generate("Where is Tokyo?", max_tokens=2, memory=memory)
    assert calls == []  # refused before the model decoded anything


def test_metadata_keys_that_differ_only_in_case(kb):
    first = kb.add("Tokyo is the capital of Japan.", Lang="x")
    n, seq = len(kb), kb.commit_seq
    with pytest.raises(
        m3db.InvalidInputError,
        match=r"metadata key 'lang' clashes with the existing column 'Lang'.*"
        r"ignore case; use 'Lang'",
    ):
        kb.add("Paris is the capital of France.", lang="fr")
    with pytest.raises(m3db.InvalidInputError, match=r"metadata key 'foo' clashes with 'Foo'.*use 'Foo'"):
        kb.add("Berlin is in Germany.", Foo=1, foo=2)
    with pytest.raises(m3db.InvalidInputError, match=r"'bar' clashes with 'Bar'"):
        with kb.transaction():  # a key given earlier in the same transaction counts too
            kb.add("Rome is in Italy.", Bar=1)
            kb.add("Madrid is in Spain.", bar=2)
    assert (len(kb), kb.commit_seq) == (n, seq)  # refused before anything was written
    kb.add("Paris is the capital of France.", Lang="fr")  # the column's own spelling works
    # a dict filter finds a column whatever the case, as the SQL text filter does
    for where in ({"lang": "x"}, {"LANG": "x"}, {"Lang": "x"}, "lang = 'x'"):
        assert kb.recall("capital", k=5, where=where).ids == first
    with pytest.raises(m3db.QueryError, match="unknown column 'langue'"):
        kb.recall("capital", where={"langue": "x"})
    assert kb.check().ok


def test_explain_of_a_generate_checks_its_options_without_decoding(tmp_path):
    with m3db.connect(tmp_path / "kb.m3db", model=MemoryModel.tiny(), embedder=HashEmbedder()) as db:
        with pytest.raises(m3db.InvalidInputError, match="temperature must be a number in"):
            db.sql("EXPLAIN SELECT * FROM generate('hi', temperature => -1)")
        assert "does not run the decoder" in str(list(db.sql("EXPLAIN SELECT * FROM generate('hi')")))


def test_k_past_what_the_model_reads_per_chunk_is_refused(kb):
    kb.add_documents(DOCS, progress=False)
    per_chunk = kb.models()[0].settings.memories_per_chunk
    assert len(kb.generate("Where is Tokyo?", k=per_chunk, max_tokens=2).chunks) >= 1
    with pytest.raises(m3db.InvalidInputError, match=f"reads at most {per_chunk} memories per chunk"):
        kb.generate("Where is Tokyo?", k=per_chunk + 1, max_tokens=2)


def test_a_torch_module_for_a_model_is_named_by_its_type(tmp_path):
    import torch

    with pytest.raises(m3db.InvalidInputError, match=r"model=<torch.nn.modules.linear.Linear> is not a loaded") as e:
        m3db.connect(tmp_path / "kb", model=torch.nn.Linear(2, 2))
    assert "in_features" not in str(e.value)  # not the module's printout


def test_a_memory_mode_given_as_generate_s_memory_says_where_it_belongs(kb):
    with pytest.raises(
        m3db.InvalidInputError, match=r"'sparse' is a memory mode, chosen when the knowledge base is built"
    ):
        kb.generate("hello?", memory="sparse")
