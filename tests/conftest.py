"""Shared fixtures: a small memory spec, memory factories, and databases on disk and in RAM;
a database bound to the tiny decoder and the hashing embedder (`kb`; torch is imported only by
the tests that use it)."""

import numpy as np
import pytest

import m3db

SMALL = dict(
    model_fingerprint="test-model",
    memory_layers=[0, 1],
    kv_heads=2,
    head_dim=8,
    tokens_per_head=4,
    embedding_dim=16,
    embedder_fingerprint="test-embedder",
)


def small_spec(**overrides):
    return m3db.MemorySpec(**{**SMALL, **overrides})


def make_memory(seed, spec=None, n=None, **extra):
    """A deterministic memory for `seed`: the same seed always gives the same arrays."""
    spec = spec or small_spec()
    rng = np.random.default_rng(seed)
    n = n or spec.tokens_per_head
    shape = (spec.layers, spec.kv_heads, n, spec.head_dim)
    positions = np.stack(
        [
            np.stack([rng.choice(spec.reference_length, n, replace=False) for _ in range(spec.kv_heads)])
            for _ in range(spec.layers)
        ]
    ).astype(np.uint8)
    item = dict(
        keys=rng.standard_normal(shape).astype(np.float32),
        values=rng.standard_normal(shape).astype(np.float32),
        positions=positions,
        embedding=rng.standard_normal(spec.embedding_dim).astype(np.float32),
        text=f"reference text number {seed}",
    )
    item.update(extra)
    return item


@pytest.fixture
def spec():
    return small_spec()


@pytest.fixture
def tmp_db(tmp_path):
    db = m3db.connect(tmp_path / "kb.m3db", spec=small_spec())
    yield db
    if not db._closed:
        db.close()


@pytest.fixture
def mem_db():
    db = m3db.connect(":memory:", spec=small_spec())
    yield db
    if not db._closed:
        db.close()


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` run only with M3DB_SLOW=1 (or when selected with -m slow)."""
    import os

    if os.environ.get("M3DB_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: set M3DB_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tiny():
    """The tiny random decoder of the real architecture (m3db.model), once per module."""
    from m3db.model.memory_model import MemoryModel

    return MemoryModel.tiny()


@pytest.fixture
def kb(tiny, tmp_path):
    """A database bound to the tiny decoder and the hashing embedder."""
    from m3db.testing import HashEmbedder

    db = m3db.connect(tmp_path / "kb", model=tiny, embedder=HashEmbedder())
    yield db
    db.close()
