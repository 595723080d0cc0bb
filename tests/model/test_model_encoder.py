"""Memory encoding and sparsification on the tiny random config, against brute force."""

import math

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from m3db.model.encoder import ReferenceTooLong, attention_received  # noqa: E402
from m3db.model.memory_model import MemoryModel  # noqa: E402
from m3db.model.settings import MemorySettings  # noqa: E402

TEXTS = [
    "Ada Lovelace wrote the first program for the Analytical Engine in 1843.",
    "Short one.",
    "Paris is the capital of France; its river is the Seine, and its tower was built in 1889 for a fair.",
]


@pytest.fixture(scope="module")
def model():
    return MemoryModel.tiny(settings=MemorySettings(memory_layers=(0, 2), tokens_per_head=8), seed=0)


def brute_force_scores(model, text):
    """w[l][h][j] = sum over query heads g sharing KV head h and reference tokens i of
    exp(q.k / sqrt(d)), pre-RoPE, no mask, prefix excluded; float64 loops."""
    ids = model.prefix_ids + model.tokenizer.encode(text)
    p = len(model.prefix_ids)
    with torch.no_grad():
        st = model.decoder.layer_states(torch.tensor([ids]), list(model.settings.memory_layers))
    cfg = model.decoder.cfg
    g = cfg.n_head // cfg.n_kv_head
    out = []
    for layer in model.settings.memory_layers:
        q, k, _ = (t[0].double() for t in st[layer])
        per_head = []
        for h in range(cfg.n_kv_head):
            w = []
            for j in range(p, len(ids)):
                total = 0.0
                for qh in range(h * g, (h + 1) * g):
                    for i in range(p, len(ids)):
                        total += math.exp(float(q[qh, i] @ k[h, j]) / math.sqrt(cfg.head_dim))
                w.append(total)
            per_head.append(w)
        out.append(per_head)
    return out


def test_shapes_dtypes_and_counts(model):
    enc = model.encode(TEXTS)
    cfg = model.decoder.cfg
    for text, e in zip(TEXTS, enc):
        n_tok = len(model.tokenizer.encode(text))
        n = min(8, n_tok)
        assert e["token_count"] == n_tok
        assert e["positions"].dtype == np.uint8 and e["positions"].shape == (2, cfg.n_kv_head, n)
        assert e["keys"].dtype == np.float32 and e["keys"].shape == (2, cfg.n_kv_head, n, cfg.head_dim)
        assert e["values"].shape == e["keys"].shape
        assert (np.diff(e["positions"].astype(int), axis=-1) > 0).all()  # sorted, distinct
        assert int(e["positions"].max()) < n_tok


def test_topk_matches_brute_force(model):
    enc = model.encode(TEXTS)
    for text, e in zip(TEXTS, enc):
        w = brute_force_scores(model, text)
        for li in range(len(w)):
            for h in range(len(w[li])):
                scores = np.array(w[li][h])
                kept = set(e["positions"][li, h].tolist())
                dropped = [j for j in range(len(scores)) if j not in kept]
                if dropped:  # every kept token scores at least as high as every dropped one, up to
                    # the encoder's rounding of log-scores to 2^-10 (ties broken by position)
                    assert min(scores[list(kept)]) >= max(scores[dropped]) * math.exp(-(2.0**-10)) * (1 - 1e-6)


def test_different_heads_keep_different_tokens(model):
    e = model.encode([TEXTS[2]])[0]
    flat = {tuple(e["positions"][li, h]) for li in range(2) for h in range(model.decoder.cfg.n_kv_head)}
    assert len(flat) > 1


def test_kept_keys_are_pre_rope_states(model):
    text = TEXTS[0]
    ids = model.prefix_ids + model.tokenizer.encode(text)
    p = len(model.prefix_ids)
    with torch.no_grad():
        st = model.decoder.layer_states(torch.tensor([ids]), [0, 2])
    e = model.encode([text])[0]
    for li, layer in enumerate((0, 2)):
        _, k, v = st[layer]
        for h in range(model.decoder.cfg.n_kv_head):
            pos = e["positions"][li, h].astype(int) + p
            np.testing.assert_allclose(e["keys"][li, h], k[0, h, pos].numpy(), atol=1e-5)
            np.testing.assert_allclose(e["values"][li, h], v[0, h, pos].numpy(), atol=1e-5)


def test_batched_equals_one_by_one(model):
    """Padding in a batch changes nothing: the same kept tokens (ties are broken by position,
    not by float noise), the same keys and values at each kept token."""
    together = model.encode(TEXTS, batch_size=3)
    p = len(model.prefix_ids)
    for text, e in zip(TEXTS, together):
        alone = model.encode([text])[0]
        ids = model.prefix_ids + model.tokenizer.encode(text)
        with torch.no_grad():
            st = model.decoder.layer_states(torch.tensor([ids]), [0, 2])
        for li, layer in enumerate((0, 2)):
            for h in range(model.decoder.cfg.n_kv_head):
                a, b = e["positions"][li, h].astype(int), alone["positions"][li, h].astype(int)
                assert np.array_equal(a, b)
                np.testing.assert_allclose(e["keys"][li, h], st[layer][1][0, h, a + p].numpy(), atol=1e-5)
                np.testing.assert_allclose(e["values"][li, h], st[layer][2][0, h, a + p].numpy(), atol=1e-5)


def test_padding_queries_and_keys_score_nothing():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 5, 8, generator=g)
    k = torch.randn(1, 2, 5, 8, generator=g)
    valid = torch.tensor([[True, True, True, False, False]])
    w = attention_received(q, k, valid)
    assert torch.isinf(w[0, :, 3:]).all() and (w[0, :, 3:] < 0).all()
    q2 = q.clone()
    q2[:, :, 3:] = 100.0  # padding queries must not move the real scores
    torch.testing.assert_close(attention_received(q2, k, valid)[..., :3], w[..., :3])


def test_too_long_reference_is_refused():
    m = MemoryModel.tiny(settings=MemorySettings(reference_length=16, tokens_per_head=4))
    with pytest.raises(ReferenceTooLong, match="chunk references to at most 16 tokens"):
        m.encode(["x" * 17])


def test_spec_fields(model):
    spec = model.memory_spec_fields()
    assert set(spec) == {
        "model_fingerprint",
        "memory_layers",
        "kv_heads",
        "head_dim",
        "tokens_per_head",
        "rope_base",
        "rope_scaling",
        "reference_length",
        "reference_prefix",
        "position_policy",
    }
    assert spec["memory_layers"] == [0, 2] and spec["tokens_per_head"] == 8 and spec["kv_heads"] == 2
    assert spec["model_fingerprint"] == MemoryModel.tiny(seed=0).memory_spec_fields()["model_fingerprint"]
    assert spec["model_fingerprint"] != MemoryModel.tiny(seed=1).memory_spec_fields()["model_fingerprint"]
    import json

    json.dumps(spec)
