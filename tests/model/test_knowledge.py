"""Knowledge-base verbs (add, add_documents, recall by text, generate) on the tiny random
decoder of the real architecture and a feature-hashing embedder: fast, real code paths."""

import re

import pytest

pytest.importorskip("torch")
import m3db  # noqa: E402
from m3db.knowledge.ingest import MAX_DOCUMENT_CHARS  # noqa: E402
from m3db.model.memory_model import MemoryModel  # noqa: E402
from m3db.testing import HashEmbedder  # noqa: E402

DOCS = [
    {
        "text": "Tokyo is the capital of Japan. It is very large.",
        "source": "wiki/Tokyo",
        "title": "Tokyo",
        "metadata": {"lang": "en"},
    },
    {"text": "Paris is the capital of France.", "source": "wiki/Paris", "title": "Paris", "metadata": {"lang": "en"}},
    {"text": "Berlin ist die Hauptstadt Deutschlands.", "source": "wiki/Berlin", "metadata": {"lang": "de"}},
]


def test_add_chunks_and_records_everything(kb, tiny):
    text = "Paris is the capital of France. " * 20
    ids = kb.add(text, source="paris.txt", title="Paris", lang="en")
    assert len(ids) > 1 and len(kb) == len(ids)
    rows = kb.sql(
        "SELECT m.ordinal, m.token_count, m.text, m.lang, d.source, d.title FROM memories m "
        "JOIN documents d ON d.id = m.document_id ORDER BY m.ordinal"
    )
    assert [r[0] for r in rows] == list(range(len(ids)))
    assert all(r[1] <= kb.spec.reference_length and r[1] == tiny.count_tokens(r[2]) for r in rows)
    assert all(r[2] in text and r[3] == "en" and r[4] == "paris.txt" and r[5] == "Paris" for r in rows)
    m = kb.get(ids[0])
    assert m.keys.shape[:2] == (len(kb.spec.memory_layers), kb.spec.kv_heads)
    assert kb.add(text, source="paris.txt") == []  # the same source again adds nothing


def test_add_documents_resumes_after_an_interruption(kb):
    def interrupted():
        yield from DOCS[:2]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        kb.add_documents(interrupted(), batch_size=1, progress=False)
    assert len(kb) == 2
    report = kb.add_documents(DOCS, batch_size=2, progress=False)
    assert (report.documents_added, report.documents_skipped) == (1, 2)
    assert sorted(r[0] for r in kb.sql("SELECT source FROM documents")) == ["wiki/Berlin", "wiki/Paris", "wiki/Tokyo"]
    assert len(kb) == 3 and kb.check().ok


def test_empty_unicode_and_bad_documents(kb):
    report = kb.add_documents(["", "   ", "東京は日本の首都です。" * 30, "Ελληνικά κείμενα."], progress=False)
    assert report.documents_empty == 2 and report.documents_added == 2
    with pytest.raises(m3db.InvalidInputError, match="decode bytes first"):
        kb.add_documents([{"text": b"\xff\xfe bytes"}], progress=False)
    with pytest.raises(m3db.InvalidInputError, match="dict with 'text'"):
        kb.add_documents([42], progress=False)
    with pytest.raises(m3db.InvalidInputError, match="limit"):
        kb.add("x" * (MAX_DOCUMENT_CHARS + 1))
    assert kb.add("") == []


def test_recall_by_text_with_filter(kb):
    kb.add_documents(DOCS, progress=False)
    got = kb.recall("Tokyo is the capital of Japan", k=1)
    assert got[0].text.startswith("Tokyo")
    got = kb.recall("capital", k=3, where={"lang": "de"})
    assert [m.text for m in got] == [DOCS[2]["text"]]
    with pytest.raises(m3db.InvalidInputError, match="non-empty"):
        kb.recall("   ")


def test_generate_modes_and_sources(kb):
    kb.add_documents(DOCS, progress=False)
    for memory, mode in ((True, "memory"), ("rag", "rag"), (False, "none")):
        a = kb.generate("Tokyo is the capital of Japan, it is large", max_tokens=8, memory=memory)
        assert a.mode == mode and isinstance(a.text, str) and a.finish_reason in ("stop", "length")
        if mode == "none":
            assert a.sources == [] and a.chunks == []
        else:
            assert a.sources[0].text.startswith("Tokyo") and a.sources[0].document == "wiki/Tokyo"
            assert a.chunks[0][0] == "prompt" and a.chunks[0][3][0] == a.sources[0].id
    a = kb.generate("capital?", max_tokens=4, k=1, where="lang = 'de'")
    assert [s.document for s in a.sources] == ["wiki/Berlin"]
    with pytest.raises(m3db.InvalidInputError, match="memory must be"):
        kb.generate("hi", memory="dense")
    with pytest.raises(m3db.InvalidInputError, match="empty"):
        kb.generate("  ")


def test_generation_is_deterministic_and_matches_the_model(kb, tiny):
    kb.add_documents(DOCS, progress=False)
    a = kb.generate("Tell me about Paris.", max_tokens=12)
    b = kb.generate("Tell me about Paris.", max_tokens=12)
    assert a.text == b.text
    plain = kb.generate("Tell me about Paris.", max_tokens=12, memory=False, raw=True)  # completion text
    assert plain.text == tiny.generate("Tell me about Paris.", mode="none", max_tokens=12).text
    chat = [{"role": "user", "content": "Tell me about Paris."}]  # a plain string is a user message
    assert (
        kb.generate("Tell me about Paris.", max_tokens=12, memory=False).text
        == tiny.generate(chat, mode="none", max_tokens=12).text
    )


def test_database_bound_to_another_model_is_refused(tiny, tmp_path):
    path = tmp_path / "kb"
    with m3db.connect(path, model=tiny, embedder=HashEmbedder()) as db:
        db.add("Some text.")
    other = MemoryModel.tiny(seed=1)
    with pytest.raises(m3db.SpecMismatchError, match="model_fingerprint: the database has"):
        m3db.connect(path, model=other, embedder=HashEmbedder())

    class OtherEmbedder(HashEmbedder):
        fingerprint = "something-else"

    with pytest.raises(m3db.SpecMismatchError, match="embedder_fingerprint"):
        m3db.connect(path, model=tiny, embedder=OtherEmbedder())
    with m3db.connect(path, read_only=True, model=tiny, embedder=HashEmbedder()) as db:
        assert db.recall("text", k=1)[0].text == "Some text."


def test_a_prompt_longer_than_the_context_is_a_clear_error(kb, tiny):
    kb.add_documents(DOCS, progress=False)
    context = tiny.decoder.cfg.max_seq_len
    long_prompt = "word " * context
    for memory in (True, False, "rag"):
        with pytest.raises(m3db.ContextLengthError, match=f"over the model's context of {context} tokens"):
            kb.generate(long_prompt, max_tokens=4, memory=memory)
    # fits without memories, but not with the positions that memories take
    just = "x" * (context - 8)
    assert kb.generate(just, max_tokens=4, memory=False, raw=True).text is not None
    with pytest.raises(m3db.ContextLengthError, match="positions for memories"):
        kb.generate(just, max_tokens=4, memory=True, raw=True)
    with pytest.raises(m3db.ContextLengthError, match="fewer references"):  # the references' text, known late
        kb.generate(just, max_tokens=4, memory="rag", raw=True)
    with pytest.raises(m3db.InvalidInputError, match="over the model's context"):
        kb.generate("hi", max_tokens=10**9)  # refused before any cache is allocated
    for bad in (0, -1, 2.5, True):
        with pytest.raises(m3db.InvalidInputError, match="max_tokens must be a positive integer"):
            kb.generate("hi", max_tokens=bad)


def test_the_same_source_twice(kb):
    first = kb.add("Paris is the capital of France.", source="notes")
    assert first and kb.add("Paris is the capital of France.", source="notes") == []  # same text: a resume
    with pytest.raises(m3db.InvalidInputError, match="source 'notes' is already in the database with other text"):
        kb.add("Rome is the capital of Italy.", source="notes")
    assert sorted(kb.locations.ids.tolist()) == first
    second = kb.add("Rome is the capital of Italy.", source="notes", replace=True)  # one commit: forget, then add
    assert second and not set(first) & set(second) and sorted(kb.locations.ids.tolist()) == second
    assert kb.recall("capital of Italy", k=1)[0].text == "Rome is the capital of Italy."
    assert kb.sql("SELECT count(*) FROM documents WHERE source = 'notes'")[0][0] == 1
    with pytest.raises(m3db.InvalidInputError, match="twice in this call"):
        kb.add_documents([{"text": "a b c.", "source": "x"}, {"text": "d e f.", "source": "x"}], progress=False)
    with pytest.raises(m3db.InvalidInputError, match="replace must be True or False"):
        kb.add("text", replace="yes")
    assert kb.check().ok


def test_a_plain_string_is_a_user_message_unless_raw(tiny, tmp_path):
    seen = []

    class Spy:  # the bundled model's protocol, recording the prompts it is handed
        def __getattr__(self, name):
            return getattr(tiny, name)

        def generate(self, prompt, **kw):
            seen.append(prompt)
            return tiny.generate(prompt, **kw)

    with m3db.connect(tmp_path / "kb", model=Spy(), embedder=HashEmbedder()) as db:
        db.add_documents(DOCS, progress=False)
        db.generate("What is the capital of Japan?", max_tokens=2)
        db.generate("The capital of Japan is", max_tokens=2, raw=True)
        db.sql("SELECT text FROM generate('What is the capital of France?', max_tokens => 2)")
        with pytest.raises(m3db.InvalidInputError, match="raw must be True or False"):
            db.generate("x", raw="yes")
    assert seen[0] == [{"role": "user", "content": "What is the capital of Japan?"}]
    assert seen[1] == "The capital of Japan is"
    assert seen[2] == [{"role": "user", "content": "What is the capital of France?"}]


def test_an_empty_answer_says_why(kb):
    kb.add_documents(DOCS, progress=False)
    for memory in (True, "rag", False):
        first = kb.generate("Where is Tokyo?", max_tokens=1, memory=memory)
        assert first.text and first.finish_reason == "length"
        # the token the model would write first now ends its turn: nothing was written
        (token,) = kb.models()[0].tokenizer.encode(first.text)
        empty = kb.generate("Where is Tokyo?", max_tokens=8, memory=memory, stop_tokens=[token])
        assert empty.text == "" and empty.finish_reason == "empty"


@pytest.mark.parametrize(
    "prompt, says",
    [
        (["first question?", "second question?"], "call generate once per question"),
        ([[{"role": "user", "content": "hi"}]], "message 0 is a list"),
        ([{"role": "user"}], "message 0 has no content"),
        ([{"content": "hi"}], "message 0 has role None"),
        ([{"role": "wizard", "content": "hi"}], "expected one of system, user, assistant"),
        ([{"role": "user", "content": 5}], "content of type int"),
        ([], "empty list of messages"),
        ({"role": "user", "content": "hi"}, "wrap it in a list"),
        (b"hi", "decode it to a string"),
        (None, "got NoneType"),
        (5, "got int"),
    ],
)
def test_a_malformed_prompt_names_the_problem(kb, prompt, says):
    """A prompt the chat template cannot take fails before decoding, saying what is wrong (it
    failed deep inside Jinja, or rendered a malformed conversation, before)."""
    with pytest.raises(m3db.InvalidInputError, match=re.escape(says)):
        kb.generate(prompt, max_tokens=2)
    assert kb.generate([{"role": "user", "content": "hi"}], max_tokens=2).finish_reason in ("stop", "length", "empty")
