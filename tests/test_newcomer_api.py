"""What a hurried newcomer types into the Python API, each pinned (a probe of the embedded API
found them): a string where a list of documents goes, a field outside a document's fields,
threads adding the same document, a connection dropped without close(), a path that names a
folder of other files, and a few type slips."""

import gc
import os
import threading

import pytest

import m3db
from m3db.model.memory_model import MemoryModel
from m3db.testing import HashEmbedder


def tiny(path, **kw):
    return m3db.connect(path, model=MemoryModel.tiny(), embedder=HashEmbedder(), **kw)


@pytest.fixture
def db(tmp_path):
    with tiny(tmp_path / "kb.m3db") as db:
        yield db


def _texts(db):
    return sorted(r[0] for r in db.sql("SELECT text FROM memories"))


def test_a_string_or_a_dict_is_not_taken_for_a_list_of_documents(db):
    for documents in ("Hi there", b"Hi there", {"text": "Rome is in Italy.", "source": "wiki/Rome"}, None, 5):
        with pytest.raises(m3db.InvalidInputError, match="documents must be a list"):
            db.add_documents(documents, progress=False)
    assert len(db) == 0
    with pytest.raises(m3db.InvalidInputError, match="batch_size must be a positive integer"):
        db.add_documents(["a"], batch_size="2", progress=False)


def test_a_document_field_that_would_be_dropped_is_refused(db):
    with pytest.raises(m3db.InvalidInputError, match=r"document #1 has the field\(s\) 'lang'.*under 'metadata'"):
        db.add_documents([{"text": "Oslo."}, {"text": "Bern is in Switzerland.", "lang": "de"}], progress=False)
    for bad, problem in (
        ({"text": "x", "metadata": ["a"]}, "metadata must be a dict"),
        ({"text": "x", "source": 5}, "source must be a string or None"),
        ({"text": "x", "title": ["t"]}, "title must be a string or None"),
    ):
        with pytest.raises(m3db.InvalidInputError, match=problem):
            db.add_documents([bad], progress=False)
    assert _texts(db) == []  # a batch is checked whole before any of it is written


def test_an_error_names_the_document_by_its_place_in_the_whole_input(db):
    with pytest.raises(m3db.InvalidInputError, match="document #20:"):
        db.add_documents([f"Good doc {i}" for i in range(20)] + [None], batch_size=16, progress=False)


def test_add_takes_metadata_as_a_dict_too(db):
    db.add("Oslo is in Norway.", metadata={"lang": "en"}, source="oslo")
    assert [m.text for m in db.recall("Oslo", where={"lang": "en"})] == ["Oslo is in Norway."]
    with pytest.raises(m3db.InvalidInputError, match=r"\['lang'\] given both"):
        db.add("Bern.", metadata={"lang": "de"}, lang="fr")


def test_threads_adding_the_same_document_store_it_once(db):
    errors = []

    def add(i):
        try:
            db.add(f"Shared text number {i % 5}.", source=f"s{i % 5}")
            db.generate("hi", max_tokens=2)  # reads the catalog beside another thread's writes
        except Exception as e:  # noqa: BLE001 (collected for the assert)
            errors.append(e)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(15)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert list(db.sql("SELECT count(*) FROM documents")) == [(5,)]
    assert _texts(db) == sorted(f"Shared text number {i}." for i in range(5))


def test_a_connection_dropped_without_close_releases_the_database(tmp_path):
    path = tmp_path / "kb.m3db"
    tiny(path).close()
    assert len(tiny(path, read_only=True)) == 0  # the connection is dropped at once
    gc.collect()
    with tiny(path) as db:  # a writer may open it
        db.add("x")
    writer = tiny(path)
    with pytest.raises(m3db.LockedError, match="in a connection of this process that was not closed"):
        tiny(path, read_only=True)
    writer.close()


def test_close_is_idempotent_and_refused_inside_a_transaction(db):
    with pytest.raises(m3db.InvalidInputError, match="close\\(\\) inside db.transaction"):
        with db.transaction():
            db.add("Kept? No: the transaction rolls back.")
            db.close()
    assert len(db) == 0 and not db.closed
    db.close()
    db.close()
    for verb in (lambda: db.add("x"), lambda: db.add_documents(["x"], progress=False)):
        with pytest.raises(m3db.ClosedError, match="closed"):
            verb()


def test_a_new_database_is_not_made_among_other_files(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.md").write_text("mine")
    with pytest.raises(m3db.InvalidInputError, match="is a folder of other files \\(readme.md\\)"):
        tiny(folder)
    assert os.listdir(folder) == ["readme.md"]
    with tiny(tmp_path / "kb.m3db") as db:
        db.add("x")
    for inside in (tmp_path / "kb.m3db" / "segments", tmp_path / "kb.m3db" / "new"):
        with pytest.raises(m3db.InvalidInputError, match="inside the m3db database"):
            tiny(inside)
    assert not (tmp_path / "kb.m3db" / "new").exists()
    (tmp_path / "empty").mkdir()
    tiny(tmp_path / "empty").close()  # an empty folder is a fine place


def test_a_path_with_a_tilde_or_a_stray_space(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with tiny("~/kb.m3db") as db:
        db.add("x")
        assert db.path == str(tmp_path / "kb.m3db") and not (tmp_path / "~").exists()
        db.pack("~/kb.m3kb")
    assert (tmp_path / "kb.m3kb").is_file()
    with pytest.raises(m3db.InvalidInputError, match="ends with a space"):
        tiny("kb.m3db ")


def test_type_slips_are_named(db, tmp_path):
    with pytest.raises(m3db.InvalidInputError, match="model='smollm' is not a loaded MemoryModel"):
        m3db.connect(tmp_path / "other", model="smollm")
    with pytest.raises(
        m3db.InvalidInputError, match="embedder=.minilm. is not a loaded Embedder \\(it has no dim, fingerprint\\)"
    ):
        m3db.connect(tmp_path / "other", model=MemoryModel.tiny(), embedder="minilm")
    assert not (tmp_path / "other").exists()
    with pytest.raises(m3db.InvalidInputError, match="read_only must be True or False"):
        m3db.connect(tmp_path / "other", read_only="no")
    db.add("x")
    with pytest.raises(m3db.InvalidInputError, match="get_many takes a list of ids"):
        db.get_many(1)


def test_text_that_is_not_valid_unicode_is_named_wherever_it_enters(db):
    """A lone surrogate (bytes decoded with errors='surrogateescape') reached the tokenizer as a
    raw TypeError; each way in names it."""
    db.add("A fine document.")
    for verb, where in (
        (lambda: db.add("bad \udcff"), "document #0"),
        (lambda: db.recall("q \udcff"), "the recall query"),
        (lambda: db.generate("a \udcff", max_tokens=2), "the prompt"),
        (lambda: db.generate([{"role": "user", "content": "\udcff"}], max_tokens=2), "message #0's content"),
        (lambda: db.sql("SELECT * FROM recall(?)", ["\udcff"]), "the recall query"),
        # a source reached DuckDB as its raw InvalidInputException; a document string given to
        # add_memory was looked up in the catalog and reported as an unreadable catalog
        (lambda: db.add("fine text", source="bad \udcff"), "document #0: source"),
        (lambda: db.add("fine text", title="bad \udcff"), "document #0: title"),
    ):
        with pytest.raises(m3db.InvalidInputError, match=f"{where}: the text holds"):
            verb()


def test_a_path_that_is_not_utf8_is_named(tmp_path):
    """A file name that is not UTF-8 (a lone surrogate after the OS's decode) made DuckDB fail with
    a bare RuntimeError 'std::bad_cast'."""
    with pytest.raises(m3db.InvalidInputError, match="is not UTF-8 text .* rename the file or folder"):
        m3db.connect(tmp_path / "kb-\udcff")


def test_a_folder_named_like_a_package_is_not_made_a_database(tmp_path):
    (tmp_path / "kb.m3kb").mkdir()
    with pytest.raises(m3db.InvalidInputError, match="is a folder, and a package \\(.m3kb\\) is a file"):
        tiny(tmp_path / "kb.m3kb")
    assert os.listdir(tmp_path / "kb.m3kb") == []
