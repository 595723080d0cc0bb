"""Nodes and memories: how a LlamaIndex node is kept as m3db memories, and a memory read back as a node.

A node is one memory when its text fits the database's reference length (128 decoder tokens for
the bundled model); a longer one is split by m3db's own chunker (`m3db.extend.chunk_text`, the
decoder's tokenizer) into parts, one memory each. Every memory of a node holds the node's id in
the metadata column `node_id` (and its part number in `node_part` when split) beside the node's
own metadata; the node's document (`ref_doc_id`) is the memory's m3db document, whose source is
that id and whose title is the node's `title` or `file_name` metadata, so an answer's sources
name it. Read back, a memory is a `TextNode`: its text, its metadata, the id it was added under
(`"<node id>#<part>"` for a part of a split node, `"memory-<id>"` for a memory added without
LlamaIndex, by `db.add` or `m3db build`), and its document as the SOURCE relationship.

Imports: m3db.errors, m3db.extend, llama_index.core.
"""

import dataclasses
import re

from llama_index.core.schema import MetadataMode, NodeRelationship, RelatedNodeInfo, TextNode

from m3db.errors import InvalidInputError
from m3db.extend import chunk_text

NODE_ID, NODE_PART = "node_id", "node_part"  # the metadata keys the store writes
TITLE_KEYS = ("title", "file_name")  # the node metadata that titles its m3db document
MEMORY_PREFIX = "memory-"  # the node id of a memory added without LlamaIndex
PART = re.compile(r"^(.*)#(\d+)$")
MEMORY_ID = re.compile(rf"^{MEMORY_PREFIX}(\d+)$")


@dataclasses.dataclass
class Part:
    """One memory of a node: its text, what to embed for it, and its add_memories fields."""

    text: str
    embed_text: str
    tokens: int
    metadata: dict
    document: dict | None


def parts_of(node, count_tokens, reference_length) -> list[Part]:
    """The memories `node` is kept as: one when its text fits a reference, else its chunks."""
    text = node.get_content(metadata_mode=MetadataMode.NONE)
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError(
            f"node {node.node_id!r} has no text; m3db keeps text as memories (an image or an empty node cannot be one)"
        )
    reserved = sorted({NODE_ID, NODE_PART} & {str(k).lower() for k in node.metadata})
    if reserved:
        raise InvalidInputError(
            f"node {node.node_id!r} has the metadata {reserved}, which the m3db store writes itself; rename it"
        )
    metadata = {k: v for k, v in node.metadata.items() if v is not None}
    document = None
    if node.ref_doc_id is not None:
        title = next((metadata[k] for k in TITLE_KEYS if isinstance(metadata.get(k), str)), None)
        document = {"source": node.ref_doc_id, "title": title}
    chunks = chunk_text(text, count_tokens, reference_length)
    if len(chunks) == 1:  # the node whole: embedded as LlamaIndex embeds it, with its metadata
        embed_text = node.get_content(metadata_mode=MetadataMode.EMBED)
        return [Part(chunks[0].text, embed_text, chunks[0].tokens, {**metadata, NODE_ID: node.node_id}, document)]
    return [
        Part(c.text, c.text, c.tokens, {**metadata, NODE_ID: node.node_id, NODE_PART: i}, document)
        for i, c in enumerate(chunks)
    ]


def node_of(match, source) -> TextNode:
    """A recalled memory (an m3db Match) as a TextNode; `source`: its document's source, or None."""
    metadata = dict(match.metadata)
    node_id, part = metadata.pop(NODE_ID, None), metadata.pop(NODE_PART, None)
    if node_id is None:
        node_id = f"{MEMORY_PREFIX}{match.id}"
    elif part is not None:
        node_id = f"{node_id}#{part}"
    relationships = {} if source is None else {NodeRelationship.SOURCE: RelatedNodeInfo(node_id=source)}
    return TextNode(id_=node_id, text=match.text, metadata=metadata, relationships=relationships)


def node_ids_sql(node_ids, columns) -> tuple[str, list]:
    """(SQL condition, params) for the memories of `node_ids`: a node's id means all its parts,
    `"<id>#<part>"` one part, and `"memory-<id>"` that memory."""
    if not isinstance(node_ids, (list, tuple)) or not all(isinstance(i, str) for i in node_ids):
        raise InvalidInputError(f"node_ids must be a list of strings, got {node_ids!r}", option="node_ids")
    memories = [int(m.group(1)) for m in map(MEMORY_ID.match, node_ids) if m]
    parts = [(m.group(1), int(m.group(2))) for m in map(PART.match, node_ids) if m]
    conditions, params = [], []
    if memories:
        conditions.append(f"id IN ({', '.join('?' * len(memories))})")
        params.extend(memories)
    if NODE_ID in columns and node_ids:
        conditions.append(f"{NODE_ID} IN ({', '.join('?' * len(node_ids))})")
        params.extend(node_ids)
    if NODE_PART in columns:
        for node_id, part in parts:
            conditions.append(f"({NODE_ID} = ? AND {NODE_PART} = ?)")
            params.extend([node_id, part])
    if not conditions:
        return "FALSE", []
    return "COALESCE(" + " OR ".join(conditions) + ", FALSE)", params
