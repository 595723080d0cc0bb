"""A file's documents: PDF, HTML, DOCX, Markdown and plain text, each parsed by a maintained library.

`read(path)` returns the documents of one file (dicts for add_documents), or raises Unreadable
with the reason (encrypted, no text layer, not the format its name says, not UTF-8, ...):
- PDF (pypdf): one document per page, `report.pdf#page=12`, titled "report.pdf p. 12", metadata
  {file, page}; lines a paragraph wraps are joined so chunks end at sentences, not at line ends;
- Markdown (markdown-it-py) and DOCX (python-docx): one document per section, the text from a
  heading to the next, `notes.md#Install > Linux`, titled "notes.md § Install > Linux", metadata
  {file, section} (text before the first heading: the file's own source, `notes.md`);
- HTML (trafilatura): one document, the main text with the page's title as its first line;
- .txt: one document; .jsonl: one document per line, {"text", "source"?, "title"?, ...}.
Every document a file gives carries metadata `file`, the path it was read from.

A document's title and metadata are a function of its source alone. The engine keeps the row a
source was first stored with (replace=True forgets a document's memories, not its row), so a
title taken from the content (an HTML <title>) would go stale when the file changes; the page's
title is therefore text, and a section's source names its heading path. Duplicate heading paths
get " (2)", " (3)", ... (never a real heading of the same file).

The libraries are imported inside the readers: a missing one is a DependencyError naming
`pip install 'm3db[documents]'`. Imports: errors only.
"""

import importlib
import json
import os
import re

from ..errors import DependencyError, InvalidInputError

# suffix -> (format, the module that reads it, or None)
FORMATS = {
    ".txt": ("text", None),
    ".md": ("markdown", "markdown_it"),
    ".markdown": ("markdown", "markdown_it"),
    ".jsonl": ("jsonl", None),
    ".pdf": ("pdf", "pypdf"),
    ".html": ("html", "trafilatura"),
    ".htm": ("html", "trafilatura"),
    ".docx": ("docx", "docx"),
}
EXTRA = "pip install 'm3db[documents]'"
# a wrapped PDF line is joined to the next unless it ends a sentence, or is this much shorter
# than the page's long lines (a heading, a paragraph's last line)
SENTENCE_END = tuple(".!?:;…。！？\"'”’)]")
SHORT_LINE = 0.6


class Unreadable(InvalidInputError):
    """A file that cannot be read into documents; `reason` says why."""

    @property
    def reason(self) -> str:
        return self.args[0]


def suffix(path) -> str:
    return os.path.splitext(os.fspath(path))[1].lower()


def readable(path) -> bool:
    """True for a file name m3db reads (by its suffix)."""
    return suffix(path) in FORMATS


def unsupported(path) -> InvalidInputError:
    """The error for a file named that m3db does not read."""
    return InvalidInputError(f"{path!r}: m3db reads {', '.join(FORMATS)} files; convert it to one of those")


def require(suffixes) -> None:
    """DependencyError unless the libraries for these suffixes are installed (checked before a
    build loads a model)."""
    for s in sorted(set(suffixes)):
        fmt, module = FORMATS.get(s, (None, None))
        if module is not None:
            _library(module, fmt)


def _library(module, fmt):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DependencyError(f"reading {fmt.upper()} files needs {module} ({e}): {EXTRA}") from e


def read(path) -> list[dict]:
    """The documents of one file, by its suffix; Unreadable names the reason it cannot be read."""
    path = os.fspath(path)
    fmt, module = FORMATS.get(suffix(path), (None, None))
    if fmt is None:
        raise unsupported(path)
    library = _library(module, fmt) if module else None
    try:
        return READERS[fmt](path, library)
    except (Unreadable, DependencyError, MemoryError):
        raise
    except OSError as e:
        raise Unreadable(f"cannot read it ({e.strerror or e})") from e
    except Exception as e:  # noqa: BLE001 (the libraries' own errors for a damaged file are many)
        raise Unreadable(f"not a readable {fmt.upper()} file ({type(e).__name__}: {e})") from e


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def utf8(path) -> str:
    raw = _bytes(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Unreadable(
            f"not UTF-8 (bad byte {raw[e.start]:#04x} at offset {e.start}); convert it, e.g. iconv -f latin1 -t utf-8"
        ) from e


def _text(path, _):
    return [{"text": utf8(path), "source": path, "title": os.path.basename(path), "metadata": {"file": path}}]


def _jsonl(path, _):
    docs = []
    for n, line in enumerate(utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise Unreadable(f"line {n} is not JSON ({e.msg})") from e
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            raise Unreadable(f"line {n}: each line must be an object with a string 'text'")
        metadata = doc.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise Unreadable(f"line {n}: metadata must be an object {{name: value}}")
        if metadata and "file" in metadata:
            raise Unreadable(f"line {n}: metadata 'file' is m3db's (the file a document was read from); rename it")
        doc.setdefault("source", f"{path}#{n}")
        doc["metadata"] = {**(metadata or {}), "file": path}
        docs.append(doc)
    return docs


def _pdf(path, pypdf):
    reader = pypdf.PdfReader(path)
    if reader.is_encrypted and not reader.decrypt(""):  # an owner password alone opens with ""
        raise Unreadable(
            "it is encrypted and needs a password: decrypt it first (e.g. qpdf --decrypt --password=... in.pdf out.pdf)"
        )
    pages = [page.extract_text() or "" for page in reader.pages]
    if not any(p.strip() for p in pages):
        raise Unreadable(
            f"no text layer on any of its {len(pages)} pages (a scanned PDF?): run OCR on it first "
            "(e.g. ocrmypdf in.pdf out.pdf)"
        )
    name = os.path.basename(path)
    return [
        {
            "text": join_wrapped_lines(text),
            "source": f"{path}#page={n}",
            "title": f"{name} p. {n}",
            "metadata": {"file": path, "page": n},
        }
        for n, text in enumerate(pages, 1)
    ]


def join_wrapped_lines(text) -> str:
    """Page text with the line breaks a paragraph wraps at made spaces. A line stays a line when it
    ends a sentence (or a clause: `:` `;`), or is well short of the page's long lines (a heading,
    a list item, a paragraph's last line); a hyphen at a line's end joins without a space."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lengths = sorted(len(line.strip()) for line in lines if line.strip())
    if not lengths:
        return text.strip()
    wide = lengths[(len(lengths) - 1) * 9 // 10]  # the page's long lines (90th percentile)
    out, last = [], ""
    for line in (raw.strip() for raw in lines):
        if out and out[-1] and line and not last.endswith(SENTENCE_END) and len(last) >= SHORT_LINE * wide:
            out[-1] += ("" if last.endswith("-") else " ") + line
        else:
            out.append(line)
        last = line
    return "\n".join(out).strip()


def _html(path, trafilatura):
    found = trafilatura.bare_extraction(_bytes(path), with_metadata=True, favor_recall=True)
    text = (found.text or "").strip() if found is not None else ""
    if not text:
        raise Unreadable("no main text found in the page")
    title = (found.title or "").strip()
    if title and text.split("\n", 1)[0].strip() != title:
        text = f"{title}\n{text}"
    return [{"text": text, "source": path, "title": os.path.basename(path), "metadata": {"file": path}}]


def _markdown(path, markdown_it):
    text = utf8(path)
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    tokens = markdown_it.MarkdownIt("commonmark").parse(text)
    heads = [  # (line, level, heading text) of the headings at the top level (not in a quote or list)
        (t.map[0], int(t.tag[1]), tokens[i + 1].content.strip())
        for i, t in enumerate(tokens)
        if t.type == "heading_open" and t.level == 0 and t.map
    ]
    cuts = [0] + [starts[line] for line, _, _ in heads] + [len(text)]
    parts = [(None, None, text[: cuts[1]])]
    parts += [(level, head, text[cuts[i + 1] : cuts[i + 2]]) for i, (_, level, head) in enumerate(heads)]
    return sectioned(path, parts)


def _docx(path, docx):
    blocks = []  # (level or None, text)
    for block in docx.Document(path).iter_inner_content():
        if hasattr(block, "rows"):  # a table: a row a line, cells joined by " | "
            rows = [" | ".join(cell.text.strip() for cell in row.cells) for row in block.rows]
            blocks.append((None, "\n".join(r for r in rows if r.strip(" |"))))
        else:
            blocks.append((_heading_level(block.style), block.text))
    parts, level, head, body = [], None, None, []
    for lvl, text in blocks:
        if lvl is not None and text.strip():
            parts.append((level, head, "\n".join(body)))
            level, head, body = lvl, text.strip(), []
        body.append(text)
    parts.append((level, head, "\n".join(body)))
    return sectioned(path, parts)


def _heading_level(style):
    """A paragraph style's heading level (Title 0, Heading N: N; or its outline level), else None."""
    if style is None:
        return None
    name = style.name or ""
    if name == "Title":
        return 0
    m = re.fullmatch(r"Heading ([1-9])", name)
    if m:
        return int(m.group(1))
    outline = style.element.xpath("./w:pPr/w:outlineLvl/@w:val")  # a localised heading style
    return int(outline[0]) + 1 if outline and outline[0].isdigit() and int(outline[0]) < 9 else None


def sectioned(path, parts) -> list[dict]:
    """The documents of a file cut at its headings. parts: [(level, heading, text)] in order, the
    first (None, None, text before any heading). A section is named by its heading path
    ("Install > Linux"); a path seen before gets " (2)", " (3)", ... avoiding the file's real ones."""
    name = os.path.basename(path)
    real, used, stack, docs = set(), set(), [], []
    paths = []
    for level, head, _ in parts[1:]:
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, head))
        paths.append(" > ".join(h for _, h in stack))
    real.update(paths)
    lead = parts[0][2]
    if lead.strip() or not paths:
        docs.append({"text": lead.strip(), "source": path, "title": name, "metadata": {"file": path}})
    for section, (_, _, text) in zip(paths, parts[1:]):
        unique, k = section, 1
        while unique in used or (k > 1 and unique in real):
            k += 1
            unique = f"{section} ({k})"
        used.add(unique)
        docs.append(
            {
                "text": text.strip(),
                "source": f"{path}#{unique}",
                "title": f"{name} § {unique}",
                "metadata": {"file": path, "section": unique},
            }
        )
    return docs


READERS = {"text": _text, "jsonl": _jsonl, "pdf": _pdf, "html": _html, "markdown": _markdown, "docx": _docx}
