"""The RAM cache of decoded memories: bounded in bytes, shared, dropped on forget."""

import numpy as np
import pytest
from conftest import make_memory, small_spec

import m3db


def test_cache_hits_bounds_and_forget(tmp_path):
    one = make_memory(0)
    size = one["keys"].nbytes * 2 + one["positions"].nbytes + len(one["text"]) + 200
    with m3db.connect(tmp_path / "kb", spec=small_spec(), config={"cache_bytes": 3 * size}) as db:
        ids = db.add_memories([make_memory(i) for i in range(10)])
        a = db.get(ids[0])
        # the second read is the cached memory: the caller's copy views the cached arrays
        assert np.shares_memory(db.get(ids[0]).keys, a.keys) and db.cache.hits == 1
        with pytest.raises(ValueError):
            a.keys[0, 0, 0, 0] = 1.0  # shared arrays are read-only
        for i in ids:
            db.get(i)
        assert len(db.cache) == 3 and db.cache.nbytes <= 3 * size  # bounded: least recently used out
        db.forget(ids[-1])
        assert ids[-1] not in db.cache._items
        with pytest.raises(m3db.NotFoundError):
            db.get(ids[-1])
        got = db.recall(make_memory(3)["embedding"], k=1, decode=True)[0].memory
        assert np.allclose(got.keys, make_memory(3)["keys"], atol=0.05)


def test_cache_config_is_checked(tmp_path):
    with pytest.raises(m3db.InvalidInputError, match="cache_bytes"):
        m3db.connect(tmp_path / "kb", spec=small_spec(), config={"cache_bytes": -1})
