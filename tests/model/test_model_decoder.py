"""The decoder on the tiny random config: shapes, KV-cache decoding, padding, memory paths."""

import pytest

torch = pytest.importorskip("torch")

from m3db.model.cache import KVCache  # noqa: E402
from m3db.model.decoder import Decoder, DecoderConfig, apply_rope, rope_cos_sin  # noqa: E402

CFG = DecoderConfig.tiny(vocab_size=300)


@pytest.fixture(scope="module")
def dec():
    return Decoder.random(CFG, seed=0)


def ids(n, seed=1, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (batch, n), generator=g)


def test_logits_shape_and_last_only(dec):
    x = ids(10, batch=3)
    with torch.no_grad():
        full = dec(x)
        last = dec(x, last_only=True)
    assert full.shape == (3, 10, CFG.vocab_size)
    assert last.shape == (3, 1, CFG.vocab_size)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_causal_prefix_does_not_depend_on_future(dec):
    x = ids(12)
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % CFG.vocab_size
    with torch.no_grad():
        a, b = dec(x), dec(y)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_kv_cache_decoding_equals_full_forward(dec):
    x = ids(20, batch=2)
    with torch.no_grad():
        full = dec(x)
        cache = KVCache(2, CFG.n_layer, CFG.n_kv_head, CFG.head_dim, capacity=4)  # small: forces growth
        parts = [dec(x[:, :7], cache=cache)]
        for t in range(7, 20):
            parts.append(dec(x[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 20


def test_cache_crop_then_redo(dec):
    x = ids(10)
    with torch.no_grad():
        cache = KVCache(1, CFG.n_layer, CFG.n_kv_head, CFG.head_dim, capacity=16)
        dec(x, cache=cache)
        cache.crop(6)
        again = dec(x[:, 6:], cache=cache)
    torch.testing.assert_close(again, dec(x)[:, 6:], atol=1e-5, rtol=1e-5)


def test_left_padding_changes_nothing(dec):
    x = ids(9)
    pad = torch.zeros(1, 4, dtype=torch.long)
    xp = torch.cat((pad, x), dim=1)
    valid = torch.cat((torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 9, dtype=torch.bool)), dim=1)
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        a = dec(x)
        b = dec(xp, positions=pos, valid=valid)[:, 4:]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rope_is_relative(dec):
    """Shifting every position by a constant leaves the logits unchanged (RoPE is relative),
    which is what lets the context start after the memory span."""
    x = ids(11)
    with torch.no_grad():
        a = dec(x)
        b = dec(x, positions=torch.arange(11)[None] + 300)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_apply_rope_preserves_norm_and_rotates_half_pairs():
    x = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_cos_sin(torch.arange(5), 16, 10000.0)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :])  # position 0 is the identity
    # the pair (0, 8) rotates by angle pos * inv_freq[0] = pos
    a = torch.tensor(3.0)
    torch.testing.assert_close(y[..., 3, 0], x[..., 3, 0] * a.cos() - x[..., 3, 8] * a.sin())


def test_memory_in_cache_equals_cacheless_memory(dec):
    """Memories written into the cache's front slots read the same as memories concatenated."""
    g = torch.Generator().manual_seed(3)
    M = 6
    mem = {
        i: (
            torch.randn(1, CFG.n_kv_head, M, CFG.head_dim, generator=g),
            torch.randn(1, CFG.n_kv_head, M, CFG.head_dim, generator=g),
        )
        for i in (1, 3)
    }
    valid = torch.tensor([[True] * 5 + [False]])
    x = ids(8)
    with torch.no_grad():
        ref = dec(x, memory={**mem, "valid": valid})
        cache = KVCache(1, CFG.n_layer, CFG.n_kv_head, CFG.head_dim, capacity=8, memory_layers=(1, 3))
        cache.set_memory([mem[1][0], mem[3][0]], [mem[1][1], mem[3][1]], valid)
        got = torch.cat([dec(x[:, :5], cache=cache), dec(x[:, 5:], cache=cache)], dim=1)
        plain = dec(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref, plain, atol=1e-3)


def test_invalid_memory_slot_is_never_read(dec):
    g = torch.Generator().manual_seed(4)
    k = torch.randn(1, CFG.n_kv_head, 3, CFG.head_dim, generator=g)
    v = torch.randn(1, CFG.n_kv_head, 3, CFG.head_dim, generator=g)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 2] = 50.0  # garbage in the masked slot
    v2[:, :, 2] = -50.0
    valid = torch.tensor([[True, True, False]])
    x = ids(5)
    with torch.no_grad():
        a = dec(x, memory={0: (k, v), "valid": valid})
        b = dec(x, memory={0: (k2, v2), "valid": valid})
    torch.testing.assert_close(a, b)


def test_non_memory_layers_never_see_memory(dec):
    """Memory at the last layer only: the states entering that layer are untouched, so the
    q/k/v every earlier layer computes are identical with and without memory."""
    g = torch.Generator().manual_seed(5)
    last = CFG.n_layer - 1
    mem = (
        torch.randn(1, CFG.n_kv_head, 4, CFG.head_dim, generator=g),
        torch.randn(1, CFG.n_kv_head, 4, CFG.head_dim, generator=g),
    )
    x = ids(6)
    with torch.no_grad():
        cache_a = KVCache(1, CFG.n_layer, CFG.n_kv_head, CFG.head_dim, capacity=8, memory_layers=(last,))
        cache_a.set_memory([mem[0]], [mem[1]], torch.ones(1, 4, dtype=torch.bool))
        la = dec(x, cache=cache_a)
        cache_b = KVCache(1, CFG.n_layer, CFG.n_kv_head, CFG.head_dim, capacity=8)
        lb = dec(x, cache=cache_b)
    for i in range(CFG.n_layer):
        a = cache_a[i].keys[:, :, cache_a[i].mem_cap : cache_a[i].mem_cap + 6]
        b = cache_b[i].keys[:, :, :6]
        torch.testing.assert_close(a, b)
    assert not torch.allclose(la, lb, atol=1e-4)


def test_layer_states_stop_at_last_layer_and_match_forward(dec):
    x = ids(7)
    with torch.no_grad():
        st = dec.layer_states(x, [0, 2])
        cache = KVCache(1, CFG.n_layer, CFG.n_kv_head, CFG.head_dim, capacity=8)
        dec(x, cache=cache)
    cos, sin = rope_cos_sin(torch.arange(7), CFG.head_dim, CFG.rope_base)
    assert sorted(st) == [0, 2]
    for i in (0, 2):
        q, k, v = st[i]
        assert q.shape == (1, CFG.n_head, 7, CFG.head_dim) and k.shape == v.shape == (1, CFG.n_kv_head, 7, CFG.head_dim)
        torch.testing.assert_close(apply_rope(k, cos, sin), cache[i].keys[:, :, :7], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, cache[i].values[:, :, :7], atol=1e-5, rtol=1e-5)
