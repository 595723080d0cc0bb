"""The documents people have (m3db/knowledge/documents.py, sources.files, `m3db build --from`),
read from real files each test writes with the libraries (fpdf2, python-docx): a PDF is a document
per page, Markdown and DOCX one per section, HTML its main text under its title; a file that cannot
be read (encrypted, no text layer, damaged, not UTF-8) is listed with its reason and the rest is
read; a build cites pages and sections; `import m3db` loads none of the libraries."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("pypdf")
pytest.importorskip("trafilatura")
pytest.importorskip("markdown_it")
docx = pytest.importorskip("docx")
fpdf = pytest.importorskip("fpdf")

import m3db  # noqa: E402
from m3db.cli import main  # noqa: E402
from m3db.knowledge import documents, sources  # noqa: E402

PAGES = [
    "Page one is about the river Rhine. " * 6,
    "Page two tells how the Zurich museum opened in 1898, and what it holds today. " * 5,
    "Page three lists the opening hours.",
]
MARKDOWN = """Notes before any heading.

# Guide
The guide starts here.

## Install
Run the installer.

```sh
# not a heading: a comment in code
```

## Install
The same heading again.

## Install (2)
A heading that looks like a duplicate's name.
"""
HTML = """<!doctype html><html><head><title>Paris travel guide</title></head><body>
<header><nav><a href="/">Home</a> <a href="/about">About us</a></nav></header>
<main><article><h1>Paris travel guide</h1>
<p>Paris is the capital of France and its largest city, on the river Seine.</p>
<p>The Louvre is the most visited museum in the world, with the Mona Lisa among its works.</p>
<p>The Eiffel Tower was built for the 1889 World's Fair and is 330 metres tall.</p>
</article></main><footer>Copyright 2024 Example Travel Ltd. All rights reserved.</footer></body></html>"""


def write_pdf(path, pages, *, user_password=None, owner_password=None, text=True):
    pdf = fpdf.FPDF()
    if owner_password or user_password:
        pdf.set_encryption(owner_password=owner_password or "owner", user_password=user_password)
    pdf.set_font("helvetica", size=11)
    for page in pages:
        pdf.add_page()
        if text:
            pdf.multi_cell(0, 6, page)
        else:  # a drawing and no text: what a scanned page is to a text extractor
            pdf.rect(20, 20, 80, 60, style="F")
    pdf.output(str(path))


def write_docx(path):
    d = docx.Document()
    d.add_heading("Handbook", level=0)
    d.add_paragraph("Read this first.")
    d.add_heading("Setup", level=1)
    d.add_paragraph("Plug the device in.")
    table = d.add_table(rows=2, cols=2)
    for r, row in enumerate([("volts", "230"), ("hertz", "50")]):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    d.add_heading("Linux", level=2)
    d.add_paragraph("Install the driver package.")
    d.add_heading("Usage", level=1)
    d.add_paragraph("Press the green button.")
    d.save(str(path))


def write_folder(folder):
    """A folder of every kind m3db reads, plus a file of another kind."""
    folder.mkdir(parents=True, exist_ok=True)
    write_pdf(folder / "report.pdf", PAGES)
    (folder / "notes.md").write_text(MARKDOWN)
    write_docx(folder / "manual.docx")
    (folder / "paris.html").write_text(HTML)
    (folder / "plain.txt").write_text("A plain text file about Rome.")
    (folder / "picture.png").write_bytes(b"\x89PNG\r\n")
    return folder


def words(text):
    return " ".join(text.split())


def by_source(docs):
    return {d["source"]: d for d in docs}


def test_a_pdf_is_a_document_per_page_citing_its_page(tmp_path):
    path = str(tmp_path / "report.pdf")
    write_pdf(path, PAGES)
    docs = documents.read(path)
    assert [d["source"] for d in docs] == [f"{path}#page={n}" for n in (1, 2, 3)]
    assert [d["title"] for d in docs] == ["report.pdf p. 1", "report.pdf p. 2", "report.pdf p. 3"]
    assert [d["metadata"] for d in docs] == [{"file": path, "page": n} for n in (1, 2, 3)]
    assert [words(d["text"]) for d in docs] == [words(p) for p in PAGES]
    # the wrapped lines of a paragraph are joined: a chunk then ends at a sentence, not at a line's end
    assert "\n" not in docs[1]["text"].replace(".\n", ". ")


def test_wrapped_lines_are_joined_and_headings_kept():
    page = (
        "1. Introduction\n"
        "This paragraph wraps across lines because the page is narrow and\n"
        "so the extractor breaks it where the line ended on the page, well-\n"
        "known behaviour of every PDF text extractor there is in this world.\n"
        "Short last line\n"
        "Next paragraph."
    )
    joined = documents.join_wrapped_lines(page)
    assert joined.split("\n") == [
        "1. Introduction",
        "This paragraph wraps across lines because the page is narrow and so the extractor breaks it where the "
        "line ended on the page, well-known behaviour of every PDF text extractor there is in this world.",
        "Short last line",
        "Next paragraph.",
    ]
    assert documents.join_wrapped_lines("") == "" and documents.join_wrapped_lines("one\r\ntwo.") == "one two."


def test_markdown_and_docx_are_documents_per_section(tmp_path):
    md = str(tmp_path / "notes.md")
    (tmp_path / "notes.md").write_text(MARKDOWN)
    docs = by_source(documents.read(md))
    sections = ["Guide", "Guide > Install", "Guide > Install (3)", "Guide > Install (2)"]
    assert list(docs) == [md] + [f"{md}#{s}" for s in sections]  # a real "Install (2)" keeps its name
    assert docs[md] == {
        "text": "Notes before any heading.",
        "source": md,
        "title": "notes.md",
        "metadata": {"file": md},
    }
    install = docs[f"{md}#Guide > Install"]
    assert install["title"] == "notes.md § Guide > Install"
    assert install["metadata"] == {"file": md, "section": "Guide > Install"}
    assert install["text"].startswith("## Install\nRun the installer.") and "# not a heading" in install["text"]
    assert docs[f"{md}#Guide > Install (3)"]["text"] == "## Install\nThe same heading again."

    path = str(tmp_path / "manual.docx")
    write_docx(path)
    docs = by_source(documents.read(path))
    names = ["Handbook", "Handbook > Setup", "Handbook > Setup > Linux", "Handbook > Usage"]
    assert list(docs) == [f"{path}#{n}" for n in names]
    setup = docs[f"{path}#Handbook > Setup"]
    assert setup["text"] == "Setup\nPlug the device in.\nvolts | 230\nhertz | 50"  # a table: a row a line
    assert setup["title"] == "manual.docx § Handbook > Setup"
    assert setup["metadata"] == {"file": path, "section": "Handbook > Setup"}


def test_html_is_its_main_text_under_its_title(tmp_path):
    path = str(tmp_path / "paris.html")
    (tmp_path / "paris.html").write_text(HTML)
    [doc] = documents.read(path)
    assert doc["source"] == path and doc["title"] == "paris.html" and doc["metadata"] == {"file": path}
    lines = doc["text"].split("\n")
    assert lines[0] == "Paris travel guide" and lines.count("Paris travel guide") == 1
    assert "The Louvre is the most visited museum in the world" in doc["text"]
    assert "Copyright" not in doc["text"] and "About us" not in doc["text"]  # the page's frame is left out


def test_unreadable_files_are_listed_with_their_reason_and_the_rest_is_read(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    write_pdf(folder / "locked.pdf", PAGES, user_password="secret")
    write_pdf(folder / "owner-only.pdf", ["An owner password alone does not hide the text."], owner_password="x")
    write_pdf(folder / "scanned.pdf", ["", ""], text=False)
    write_pdf(folder / "cut.pdf", PAGES)
    (folder / "cut.pdf").write_bytes((folder / "cut.pdf").read_bytes()[:400])
    (folder / "fake.docx").write_bytes(b"this is not a zip file")
    (folder / "latin1.txt").write_bytes("café".encode("latin-1"))
    (folder / "lines.jsonl").write_text('{"text": "one"}\nnot json\n')
    (folder / "empty.html").write_text("<html><body></body></html>")
    (folder / "good.txt").write_text("Still read.")
    (folder / ".hidden.txt").write_text("a hidden file")
    (folder / "~$manual.docx").write_bytes(b"an office lock file")
    found = sources.files(folder)
    docs = list(found)
    assert [d["source"] for d in docs] == [f"{folder}/good.txt", f"{folder}/owner-only.pdf#page=1"]
    reasons = dict(found.skipped)
    assert sorted(reasons) == sorted(
        f"{folder}/{n}"
        for n in ("cut.pdf", "empty.html", "fake.docx", "latin1.txt", "lines.jsonl", "locked.pdf", "scanned.pdf")
    )
    assert "encrypted and needs a password" in reasons[f"{folder}/locked.pdf"]
    assert "no text layer on any of its 2 pages" in reasons[f"{folder}/scanned.pdf"]
    assert reasons[f"{folder}/cut.pdf"].startswith("not a readable PDF file (")
    assert reasons[f"{folder}/fake.docx"].startswith("not a readable DOCX file (")
    assert "not UTF-8 (bad byte 0xe9 at offset 3)" in reasons[f"{folder}/latin1.txt"]
    assert reasons[f"{folder}/lines.jsonl"] == "line 2 is not JSON (Expecting value)"
    assert reasons[f"{folder}/empty.html"] == "no main text found in the page"
    assert sorted(found.ignored) == [f"{folder}/.hidden.txt", f"{folder}/~$manual.docx"]


def test_import_m3db_loads_no_document_library():
    code = "import m3db, sys; print([m for m in ('pypdf', 'trafilatura', 'docx', 'markdown_it') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_missing_library_names_the_extra_before_the_model_loads(tmp_path, monkeypatch, capsys):
    folder = write_folder(tmp_path / "docs")
    real = documents.importlib.import_module

    def without_pypdf(name, *a):
        if name == "pypdf":
            raise ImportError("No module named 'pypdf'")
        return real(name, *a)

    monkeypatch.setattr(documents.importlib, "import_module", without_pypdf)
    with pytest.raises(m3db.DependencyError, match=r"reading PDF files needs pypdf .*pip install 'm3db\[documents\]'"):
        documents.read(str(folder / "report.pdf"))
    assert main(["build", str(tmp_path / "kb"), "--from", str(folder)]) == 1
    assert "pip install 'm3db[documents]'" in capsys.readouterr().err
    assert not (tmp_path / "kb").exists()  # refused before a database was made


def test_build_refuses_folders_and_files_it_cannot_read_up_front(tmp_path, capsys):
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "a.png").write_bytes(b"\x89PNG")
    (tmp_path / "slides.pptx").write_bytes(b"PK")
    for source, says in (("pictures", "holds no .txt, .md, .markdown, .jsonl, .pdf"), ("slides.pptx", "m3db reads")):
        assert main(["build", str(tmp_path / "kb"), "--from", str(tmp_path / source)]) == 1
        assert says in capsys.readouterr().err
        assert not (tmp_path / "kb").exists()


def use_tiny_model(monkeypatch):
    """The tiny decoder and the hashing embedder stand in for the bundled model (the CLI's too); the pair."""
    pytest.importorskip("torch")
    from m3db.model.memory_model import MemoryModel
    from m3db.testing import HashEmbedder

    pair = (MemoryModel.tiny(seed=0), HashEmbedder())
    for module in ("m3db.opening", "m3db.knowledge.bundled"):
        monkeypatch.setattr(sys.modules[module], "bundled", lambda *a, **k: pair)
    return pair


@pytest.fixture
def tiny_bundled(monkeypatch):
    return use_tiny_model(monkeypatch)


def test_a_build_from_a_folder_cites_pages_and_sections_and_lists_what_it_skipped(tmp_path, capsys, tiny_bundled):
    folder = write_folder(tmp_path / "docs")
    write_pdf(folder / "locked.pdf", PAGES, user_password="secret")
    kb = str(tmp_path / "kb.m3db")
    assert main(["build", kb, "--from", str(folder), "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    [skip] = out["files_skipped"]
    assert skip["file"] == f"{folder}/locked.pdf" and "encrypted and needs a password" in skip["reason"]
    assert f"skipped {folder}/locked.pdf: it is encrypted and needs a password" in captured.err
    assert out["files_ignored"] == 1 and "picture.png" in captured.err
    assert out["documents_added"] == 3 + 5 + 4 + 1 + 1  # pages; sections (md: the lead and 4; docx 4); html; txt
    model, embedder = tiny_bundled
    with m3db.connect(kb, read_only=True, model=model, embedder=embedder) as db:
        # a page, a section: filters and the names an answer cites
        page2 = db.recall("Zurich museum opened in 1898", k=3, where="page = 2")
        assert page2 and {db.documents_of([m])[0] for m in page2} == {
            (f"{folder}/report.pdf#page=2", "report.pdf p. 2")
        }
        linux = db.recall("driver package", k=1, where="section = 'Handbook > Setup > Linux'")
        assert db.documents_of(linux) == [
            (f"{folder}/manual.docx#Handbook > Setup > Linux", "manual.docx § Handbook > Setup > Linux")
        ]
        answer = db.generate(
            "When did the Zurich museum open?", max_tokens=2, where="file = ?", params=[f"{folder}/report.pdf"]
        )
        assert answer.sources and {s.title for s in answer.sources} <= {f"report.pdf p. {n}" for n in (1, 2, 3)}
    # a rerun adds nothing: every source is committed with the same text
    assert main(["build", kb, "--from", str(folder), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["documents_added"] == 0 and again["documents_skipped"] == out["documents_added"]
