"""The documents as MCP resources: listed page by page, read by URI.

A document is `m3db://documents/{id}` (`m3db://packages/{package}/documents/{id}` when several
packages are served: their ids repeat). Reading one gives its text, rebuilt from its memories
in order (each memory is an exact span of the document; the whitespace between two spans, which
chunking dropped, comes back as a space, or a blank line where it was longer), as text/plain,
with its source, title, uri, metadata and memory count in `_meta`. A document larger than the
SQL byte cap (`--sql-max-bytes`) is refused with the way to page through it. Reads go through
the database's public SQL (`kb.sql`). Imports: the SDK's types and errors, m3db's errors.
"""

import json
import urllib.parse

import mcp_types as types
from mcp.shared.exceptions import MCPError

from m3db.errors import M3DBError

PAGE = 100  # documents per resources/list page
MIME = "text/plain"


class Documents:
    """The documents of one served knowledge base (`kb`, the server binding's KnowledgeBase)."""

    def __init__(self, kb, limits):
        self.kb, self.limits = kb, limits
        self.packages = kb.packages or [None]  # None: the one database

    def uri(self, package, document_id: int) -> str:
        if package is None:
            return f"m3db://documents/{document_id}"
        return f"m3db://packages/{urllib.parse.quote(package, safe='')}/documents/{document_id}"

    def templates(self) -> list[types.ResourceTemplate]:
        if self.kb.packages:
            template, what = "m3db://packages/{package}/documents/{id}", "a document of a package, by its id"
        else:
            template, what = "m3db://documents/{id}", "a document, by its id (documents.id in SQL)"
        return [types.ResourceTemplate(uri_template=template, name="document", description=what, mime_type=MIME)]

    # -- listing -----------------------------------------------------------------------------

    def page(self, cursor: str | None) -> tuple[list[types.Resource], str | None]:
        """One page of documents in id order (package by package) and the cursor of the next."""
        index, after = self.position(cursor)
        out = []
        while index < len(self.packages) and len(out) < PAGE:
            package = self.packages[index]
            rows = self.kb.sql(
                "SELECT id, source, title, uri FROM documents WHERE id > ? ORDER BY id LIMIT ?",
                [after, PAGE - len(out)],
                package,
            )
            for document_id, source, title, uri in rows:
                out.append(
                    types.Resource(
                        uri=self.uri(package, document_id),
                        name=source,
                        title=title,
                        description=uri if package is None else f"{uri or source} (package {package})",
                        mime_type=MIME,
                    )
                )
                after = document_id
            if len(out) < PAGE:  # this package is done
                index, after = index + 1, -1
        return out, (f"{index}:{after}" if index < len(self.packages) else None)

    def position(self, cursor: str | None) -> tuple[int, int]:
        if cursor is None:
            return 0, -1
        index, _, after = cursor.partition(":")
        try:
            index, after = int(index), int(after)
        except ValueError:
            index = -1
        if not 0 <= index < len(self.packages):
            raise MCPError(types.INVALID_PARAMS, f"{cursor!r} is not a cursor of this server: list from the start")
        return index, after

    # -- reading -----------------------------------------------------------------------------

    def read(self, uri: str) -> types.TextResourceContents:
        package, document_id = self.parse(uri)
        try:
            found = self.kb.sql(
                "SELECT source, title, uri, metadata FROM documents WHERE id = ?", [document_id], package
            )
            spans = self.kb.sql(
                "SELECT text, char_start, char_end FROM memories WHERE document_id = ? ORDER BY ordinal",
                [document_id],
                package,
            )
        except M3DBError as e:
            raise MCPError(types.INTERNAL_ERROR, f"reading {uri} failed: {e}", {"uri": uri}) from e
        if not len(found):
            raise MCPError(types.INVALID_PARAMS, f"no document {document_id} in {self.name(package)}", {"uri": uri})
        source, title, link, metadata = found[0]
        text, end = [], None
        for piece, start, stop in spans:
            if end is not None and start is not None and start > end:
                text.append(" " if start - end == 1 else "\n\n")
            text.append(piece)
            end = stop
        body = "".join(text)
        size = len(body.encode())
        if size > self.limits.sql_max_bytes:
            raise MCPError(
                types.INVALID_PARAMS,
                f"document {document_id} is {size:,} bytes, over the {self.limits.sql_max_bytes:,} this server sends "
                f"(m3db mcp --sql-max-bytes): read its memories with the sql tool, a page at a time (SELECT text "
                f"FROM memories WHERE document_id = {document_id} ORDER BY ordinal LIMIT 100 OFFSET 0)",
                {"uri": uri},
            )
        meta = {
            "id": document_id,
            "source": source,
            "title": title,
            "uri": link,
            "metadata": json.loads(metadata) if isinstance(metadata, str) else metadata,
            "memories": len(spans),
        }
        if package is not None:
            meta["package"] = package
        return types.TextResourceContents(uri=uri, text=body, mime_type=MIME, _meta=meta)

    def parse(self, uri: str) -> tuple[str | None, int]:
        """(package or None, document id) of a document's URI."""
        parts = urllib.parse.urlsplit(uri)
        path = [urllib.parse.unquote(p) for p in (parts.netloc + parts.path).split("/")]
        package, rest = (path[1], path[2:]) if len(path) == 4 and path[0] == "packages" else (None, path)
        if parts.scheme != "m3db" or len(rest) != 2 or rest[0] != "documents" or not is_id(rest[1]):
            package, rest = None, []
        if not rest or package not in self.packages:  # None is in it for one database, not for packages
            expected = self.templates()[0].uri_template
            raise MCPError(
                types.INVALID_PARAMS, f"{uri!r} is not a document of this server; expected {expected}", {"uri": uri}
            )
        return package, int(rest[1])

    def name(self, package) -> str:
        return "this knowledge base" if package is None else f"package {package}"


def is_id(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 19  # not "٣", which int() reads as 3
