"""m3db.bindings.llamaindex on the real llama-index-core: `VectorStoreIndex.from_vector_store(store)`
retrieves the right nodes with and without metadata filters (every filter checked against
LlamaIndex's own in-memory filter semantics, `build_metadata_filter_fn`), deletes documents and
nodes, refuses vectors of another embedder, and `M3DBQueryEngine` answers what `db.generate`
answers, with its sources as source nodes.

Real parts: llama-index-core's index, retriever and query engine base; the tiny decoder of the
real architecture and the hashing embedder (tests/server_models.py). No network: every socket
connect fails in this module, so nothing (a tokenizer, NLTK data) can be downloaded.
"""

import importlib
import socket
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("llama_index.core")

from llama_index.core import VectorStoreIndex  # noqa: E402
from llama_index.core.embeddings import BaseEmbedding, MockEmbedding  # noqa: E402
from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode  # noqa: E402
from llama_index.core.vector_stores.types import (  # noqa: E402
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
)
from llama_index.core.vector_stores.utils import build_metadata_filter_fn  # noqa: E402

import m3db  # noqa: E402
from m3db.bindings.llamaindex import LlamaIndexEmbedder, M3DBEmbedding, M3DBQueryEngine, M3DBVectorStore  # noqa: E402
from m3db.testing import hashed_embedding  # noqa: E402
from tests.server_models import tiny  # noqa: E402

MODELS = tiny()
QUESTION = "What is the capital of France?"
MAX_TOKENS = 16
ROWS = [  # text, document, metadata
    ("Paris is the capital of France.", "geo.txt", dict(lang="en", year=2001, tags=["city", "europe"], title="Paris")),
    ("Berlin is the capital of Germany.", "geo.txt", dict(lang="de", year=1990, tags=["city"], title="Berlin")),
    ("The Nile is the longest river in Africa.", "rivers.txt", dict(lang="en", year=2020, tags=[], title="Nile")),
    ("Bread is made from flour, water and yeast.", "bread.txt", dict(lang="", year=2015, title="bread recipe")),
    ("Mount Everest is the highest mountain on Earth.", "peaks.txt", dict(year=1953, tags=["mountain", "asia"])),
]
LONG = " ".join(f"Sentence {i} says that bridge number {i} crosses the river." for i in range(40))


@pytest.fixture(autouse=True, scope="module")
def no_network():
    """Any attempt to reach the network (a tokenizer or NLTK download) fails the test."""

    def refuse(sock, address, *args):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"the LlamaIndex tests must not reach the network (tried {address!r})")
        return connect(sock, address, *args)

    connect = socket.socket.connect
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket.socket, "connect_ex", refuse)
        yield


def make_nodes():
    return [
        TextNode(
            id_=f"node-{i}",
            text=text,
            metadata=metadata,
            relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=document)},
        )
        for i, (text, document, metadata) in enumerate(ROWS)
    ]


def make_store(**options):
    db = m3db.connect(":memory:", model=MODELS[0], embedder=MODELS[1])
    store = M3DBVectorStore(db, **options)
    index = VectorStoreIndex.from_vector_store(store, embed_model=store.embed_model)
    index.insert_nodes(make_nodes())
    return db, store, index


@pytest.fixture(scope="module")
def kb():
    db, store, index = make_store()
    yield db, store, index
    db.close()


def retrieved(index, query, k=len(ROWS), **options):
    return [n.node.node_id for n in index.as_retriever(similarity_top_k=k, **options).retrieve(query)]


# -- retrieval -----------------------------------------------------------------------------


def test_the_retriever_finds_the_right_node(kb):
    db, store, index = kb
    assert len(db) == len(ROWS)
    hits = index.as_retriever(similarity_top_k=2).retrieve("capital of France")
    assert hits[0].node.node_id == "node-0" and hits[0].node.text == ROWS[0][0]
    assert hits[0].node.metadata == ROWS[0][2] and hits[0].node.ref_doc_id == "geo.txt"
    assert hits[0].score == pytest.approx(db.recall("capital of France", k=1)[0].score)
    assert retrieved(index, "highest mountain", k=1) == ["node-4"]
    # a filter picks among the rest: the nearest German memory
    german = MetadataFilters(filters=[MetadataFilter(key="lang", value="de")])
    assert retrieved(index, "capital of France", k=1, filters=german) == ["node-1"]
    assert retrieved(index, "capital", doc_ids=["rivers.txt", "peaks.txt"]) in (
        ["node-2", "node-4"],
        ["node-4", "node-2"],
    )


def f(key, value, operator="=="):
    return MetadataFilter(key=key, value=value, operator=operator)


CASES = [
    [f("lang", "en")],
    [f("lang", "en", "!=")],
    [f("year", 2000, ">")],
    [f("year", 2001, ">=")],
    [f("year", 1990, "<")],
    [f("year", 1990, "<=")],
    [f("lang", ["en", "de"], "in")],
    [f("lang", ["en"], "nin")],
    [f("tags", "city", "contains")],
    [f("tags", ["asia", "europe"], "any")],
    [f("tags", ["city", "europe"], "all")],
    [f("title", "Par", "text_match")],
    [f("title", "RECIPE", "text_match_insensitive")],
    [f("tags", None, "is_empty")],
    [f("lang", None, "is_empty")],
    [f("missing", "x")],
    [f("missing", "x", "!=")],
    [f("title", "read", "contains")],
]


@pytest.mark.parametrize("condition", ["and", "or", "not"])
def test_filters_mean_what_llama_index_s_own_store_means(kb, condition):
    """Each filter (every FilterOperator, alone and combined) keeps exactly the nodes that
    LlamaIndex's reference filter function keeps."""
    db, store, index = kb
    metadata = {n.node_id: n.metadata for n in make_nodes()}
    cases = [MetadataFilters(filters=c, condition=condition) for c in CASES]
    cases.append(MetadataFilters(filters=[f("lang", "en"), f("year", 2010, ">")], condition=condition))
    cases.append(MetadataFilters(filters=[f("lang", "de"), f("tags", "asia", "contains")], condition=condition))
    assert {x.operator for c in CASES for x in c} == set(FilterOperator)
    for filters in cases:
        keep = build_metadata_filter_fn(lambda node_id: metadata[node_id], filters)
        expected = sorted(i for i in metadata if keep(i))
        assert sorted(retrieved(index, "capital", filters=filters)) == expected, filters


def test_nested_filters_and_the_document_keys(kb):
    db, store, index = kb
    either = MetadataFilters(filters=[f("lang", "en"), f("lang", "de")], condition=FilterCondition.OR)
    nested = MetadataFilters(filters=[either, f("year", 2000, ">")])
    assert sorted(retrieved(index, "capital", filters=nested)) == ["node-0", "node-2"]
    for key in ("ref_doc_id", "doc_id", "document_id"):
        only = MetadataFilters(filters=[f(key, "geo.txt")])
        assert sorted(retrieved(index, "capital", filters=only)) == ["node-0", "node-1"]
    only = store.query(VectorStoreQuery(query_str="capital", similarity_top_k=5, node_ids=["node-3", "node-4"]))
    assert sorted(only.ids) == ["node-3", "node-4"]


def test_what_cannot_map_is_refused(kb):
    db, store, index = kb
    for bad, words in [
        ([f("lang", ["en"], "==")], "takes one value"),
        ([f("lang", "en", "in")], "takes a list"),
        ([f("year", "19", "text_match")], "text column; this one is BIGINT"),
        ([f("year", 1, "contains")], "this column is BIGINT"),
        ([f("no such", 1)], "not a metadata key"),
        ([f("lang", None)], "use the is_empty operator"),
    ]:
        with pytest.raises(m3db.InvalidInputError, match=words):
            index.as_retriever(filters=MetadataFilters(filters=bad)).retrieve("capital")
    with pytest.raises(m3db.InvalidInputError, match="query mode 'mmr'"):
        store.query(VectorStoreQuery(query_str="capital", mode=VectorStoreQueryMode.MMR))
    with pytest.raises(m3db.InvalidInputError, match="takes an m3db Database"):
        M3DBVectorStore("kb.m3db")


def test_a_query_vector_recalls_like_its_text(kb):
    db, store, index = kb
    vector = store.embed_model.get_query_embedding("capital of France")
    by_vector = store.query(VectorStoreQuery(query_embedding=vector, similarity_top_k=3))
    by_text = store.query(VectorStoreQuery(query_str="capital of France", similarity_top_k=3))
    assert by_vector.ids == by_text.ids and by_vector.similarities == pytest.approx(by_text.similarities)


# -- writing -------------------------------------------------------------------------------


def test_delete_a_document_and_nodes_and_replace_a_node():
    db, store, index = make_store()
    index.delete_ref_doc("geo.txt")
    assert len(db) == len(ROWS) - 2 and "node-0" not in retrieved(index, "capital of France")
    index.delete_nodes(["node-2"])
    assert sorted(retrieved(index, "capital")) == ["node-3", "node-4"]
    # the same id again replaces the node's memory in one commit
    index.insert_nodes([TextNode(id_="node-3", text="Rye bread is dense and dark.", metadata={"lang": "en"})])
    assert len(db) == 2 and db.recall("rye bread", k=1)[0].text == "Rye bread is dense and dark."
    store.delete_nodes(filters=MetadataFilters(filters=[f("year", 1960, "<")]))
    assert retrieved(index, "capital") == ["node-3"]
    with pytest.raises(m3db.InvalidInputError, match="clear"):
        store.delete_nodes()
    store.clear()
    assert len(db) == 0


def test_a_long_node_is_kept_in_parts():
    db, store, index = make_store()
    index.insert_nodes([TextNode(id_="long", text=LONG, relationships=make_nodes()[0].relationships)])
    parts = len(db) - len(ROWS)
    assert parts > 1  # longer than one 128-token reference
    hits = index.as_retriever(similarity_top_k=3).retrieve("bridge number 17 crosses the river")
    assert all(h.node.node_id.startswith("long#") and h.node.text in LONG for h in hits)
    index.delete_nodes([hits[0].node.node_id])  # one part
    assert len(db) == len(ROWS) + parts - 1
    index.delete_nodes(["long"])  # the node: every part
    assert len(db) == len(ROWS)


def test_memories_added_without_llama_index_are_nodes_too():
    db, store, index = make_store()
    (mid,) = db.add("Zorblax is a small moon of Quendor.", source="zorblax.txt")
    hit = index.as_retriever(similarity_top_k=1).retrieve("Zorblax moon")[0]
    assert hit.node.node_id == f"memory-{mid}" and hit.node.ref_doc_id == "zorblax.txt"
    index.delete_nodes([f"memory-{mid}"])
    assert len(db) == len(ROWS)


def test_only_the_database_s_own_vectors_are_stored():
    """A node vector from another embedder would be recalled against the database's query vectors
    (generate recalls by its own embedder): it is refused, not stored."""
    db = m3db.connect(":memory:", model=MODELS[0], embedder=MODELS[1])
    store = M3DBVectorStore(db)
    for other, words in [
        (MockEmbedding(embed_dim=256), "not from this database's embedder"),
        (MockEmbedding(embed_dim=8), "shape"),
    ]:
        index = VectorStoreIndex.from_vector_store(store, embed_model=other)
        with pytest.raises(m3db.SpecMismatchError, match=words):
            index.insert_nodes(make_nodes())
    assert len(db) == 0
    # a node without a vector is embedded by the database, as LlamaIndex would embed it
    node = make_nodes()[0]
    store.add([node])
    own = np.asarray(store.embed_model.get_text_embedding(node.get_content(metadata_mode="embed")), np.float32)
    assert db.recall(own, k=1)[0].score == pytest.approx(1.0, abs=1e-5)
    assert isinstance(store.embed_model, M3DBEmbedding) and store.embed_model.model_name == db.spec.embedder_fingerprint


class Hashing(BaseEmbedding):
    """An app's own LlamaIndex embed model (feature hashing of 128 dimensions, no weights)."""

    def _get_text_embedding(self, text):
        return hashed_embedding(text, 128).tolist()

    _get_query_embedding = _get_text_embedding

    async def _aget_query_embedding(self, query):
        return self._get_text_embedding(query)


def test_a_database_built_with_the_app_s_embed_model_takes_its_vectors():
    embedder = LlamaIndexEmbedder(Hashing(model_name="hashing-128"))
    assert embedder.dim == 128 and embedder.fingerprint.endswith("Hashing:hashing-128")
    db = m3db.connect(":memory:", model=MODELS[0], embedder=embedder)
    index = VectorStoreIndex.from_vector_store(M3DBVectorStore(db), embed_model=Hashing(model_name="hashing-128"))
    index.insert_nodes(make_nodes())
    assert retrieved(index, "capital of France", k=1) == ["node-0"]
    assert db.generate(QUESTION, max_tokens=4).sources[0].text == ROWS[0][0]


# -- answering -----------------------------------------------------------------------------


def test_the_query_engine_answers_as_generate_does(kb):
    db, store, index = kb
    for memory in (True, "rag"):
        response = M3DBQueryEngine(vector_store=store, memory=memory, max_tokens=MAX_TOKENS).query(QUESTION)
        answer = db.generate(QUESTION, memory=memory, max_tokens=MAX_TOKENS)
        assert response.response == answer.text and response.metadata["sources"] == answer.sources
        assert response.metadata["mode"] == answer.mode
        assert [n.node.text for n in response.source_nodes] == [s.text for s in answer.sources]
        assert response.source_nodes[0].node.node_id == "node-0"
    german = MetadataFilters(filters=[f("lang", "de")])
    response = M3DBQueryEngine(vector_store=store, filters=german, max_tokens=MAX_TOKENS).query(QUESTION)
    answer = db.generate(QUESTION, where="lang = 'de'", max_tokens=MAX_TOKENS)
    assert response.response == answer.text and [n.node.node_id for n in response.source_nodes] == ["node-1"]


def test_cold_memories_answer_as_warm_ones(kb):
    db, store, index = kb
    cold_db, cold_store, _ = make_store(cold=True)
    warm_answer = db.generate(QUESTION, max_tokens=MAX_TOKENS)
    cold_answer = cold_db.generate(QUESTION, max_tokens=MAX_TOKENS)
    assert cold_answer.text == warm_answer.text and cold_answer.sources == warm_answer.sources


def test_without_llama_index_a_dependency_error_names_the_extra(monkeypatch):
    for name in [n for n in sys.modules if n.startswith("m3db.bindings.llamaindex")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "llama_index.core", None)
    with pytest.raises(m3db.DependencyError, match=r"pip install 'm3db\[llamaindex\]'"):
        importlib.import_module("m3db.bindings.llamaindex")
