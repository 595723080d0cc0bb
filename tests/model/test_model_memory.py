"""EncodedMemory attention is right: reading a memory equals prefilling its text, and rotating keys
at read time equals rotating them at write time (tiny random config; the real weights are
checked in test_model_smollm.py)."""

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from m3db.model.cache import KVCache  # noqa: E402
from m3db.model.generate import Sampling, run  # noqa: E402
from m3db.model.memory import EncodedMemory, context_start, place  # noqa: E402
from m3db.model.memory_model import MemoryModel  # noqa: E402
from m3db.model.settings import MemorySettings  # noqa: E402

REF = "The Zorblax festival is held every March in the town of Quimby."
CTX = "Question: when is the Zorblax festival? Answer:"

# every layer a memory layer, every token kept, memories laid end to end before the context
FULL = MemorySettings(
    memory_layers=None, tokens_per_head=256, position_policy="sequential", memories_per_chunk=1, reference_length=256
)


def read_logits(m, items, ctx_ids):
    """Logits of ctx_ids attending to `items` through the cache's memory slots."""
    cfg = m.decoder.cfg
    keys, values, valid = place([items], m.sink_keys, m.sink_values, m.settings, cfg.head_dim, cfg.rope_base)
    cache = KVCache(1, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, 64, m.settings.memory_layers)
    cache.set_memory(keys, values, valid)
    start = context_start(m.settings, len(m.prefix_ids))
    pos = torch.arange(start, start + len(ctx_ids))[None]
    with torch.no_grad():
        return m.decoder(torch.tensor([ctx_ids]), positions=pos, cache=cache)


def prefill_logits(m, ids, n_last):
    with torch.no_grad():
        return m.decoder(torch.tensor([ids]))[:, -n_last:]


@pytest.mark.parametrize("seed", [0, 1])
def test_reading_a_memory_equals_prefilling_its_text(seed):
    m = MemoryModel.tiny(settings=FULL, seed=seed)
    item = EncodedMemory.from_encoded(7, REF, m.encode([REF])[0])
    ref_ids, ctx_ids = m.tokenizer.encode(REF), m.tokenizer.encode(CTX)
    got = read_logits(m, [item], ctx_ids)
    want = prefill_logits(m, m.prefix_ids + ref_ids + ctx_ids, len(ctx_ids))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    plain = prefill_logits(m, ctx_ids, len(ctx_ids))
    assert (got - plain).abs().max() > 1e-3  # the memory did something


def test_two_memories_sequential_equal_prefilling_both():
    m = MemoryModel.tiny(settings=FULL.with_(memories_per_chunk=2), seed=2)
    other = "Quimby lies on the river Flent, two days north of the sea."
    items = [EncodedMemory.from_encoded(i, t, e) for i, (t, e) in enumerate(zip([REF, other], m.encode([REF, other])))]
    ctx_ids = m.tokenizer.encode(CTX)
    got = read_logits(m, items, ctx_ids)
    # each reference was encoded on its own, so the prefill must restart attention per
    # reference: that is not a single prefill; check instead that swapping order matters
    # and that each memory alone equals its own prefill
    swapped = read_logits(m, items[::-1], ctx_ids)
    assert (got - swapped).abs().max() > 1e-5
    for it in items:
        ids = m.prefix_ids + m.tokenizer.encode(it.text) + ctx_ids
        torch.testing.assert_close(
            read_logits(m, [it], ctx_ids), prefill_logits(m, ids, len(ctx_ids)), atol=1e-4, rtol=1e-4
        )


def test_parallel_policy_with_a_full_length_reference_equals_prefill():
    ref_ids_len = len(MemoryModel.tiny().tokenizer.encode(REF))
    s = MemorySettings(
        memory_layers=None, tokens_per_head=256, position_policy="parallel", reference_length=ref_ids_len
    )
    m = MemoryModel.tiny(settings=s, seed=3)
    item = EncodedMemory.from_encoded(1, REF, m.encode([REF])[0])
    ctx_ids = m.tokenizer.encode(CTX)
    got = read_logits(m, [item], ctx_ids)
    want = prefill_logits(m, m.prefix_ids + m.tokenizer.encode(REF) + ctx_ids, len(ctx_ids))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_generation_with_a_memory_equals_generation_after_its_text():
    m = MemoryModel.tiny(settings=FULL, seed=4)
    item = EncodedMemory.from_encoded(3, REF, m.encode([REF])[0])
    ctx_ids = m.tokenizer.encode(CTX)
    s = Sampling(max_tokens=20, stop_tokens=())
    loop_a, steps = run(m, [ctx_ids], mode="memory", retriever=lambda q, k: [item], sampling=s)
    list(steps)
    loop_b, steps = run(m, [m.prefix_ids + m.tokenizer.encode(REF) + ctx_ids], mode="none", retriever=None, sampling=s)
    list(steps)
    assert loop_a.results()[0].tokens == loop_b.results()[0].tokens
    assert loop_a.results()[0].chunks[0].memory_ids == (3,)


@pytest.mark.parametrize("policy", ["parallel", "sequential"])
def test_rotate_at_read_equals_rotate_at_write(policy):
    """Keys stored before RoPE and rotated when read equal the keys the reference's own
    forward rotated when it wrote them (parallel: at its own positions after the prefix)."""
    s = MemorySettings(memory_layers=(1, 3), tokens_per_head=5, position_policy=policy, memories_per_chunk=1)
    m = MemoryModel.tiny(settings=s, seed=5)
    cfg = m.decoder.cfg
    ref_ids = m.tokenizer.encode(REF)
    item = EncodedMemory.from_encoded(0, REF, m.encode([REF])[0])
    p = len(m.prefix_ids)
    # rotate at write: the reference's own forward, keys after RoPE at positions 0..p+n-1,
    # shifted so the reference ends where the sequential policy ends it (RoPE is relative,
    # but the rotated vectors themselves depend on absolute positions)
    shift = 0 if policy == "parallel" else context_start(s, p) - len(ref_ids) - p
    cache = KVCache(1, cfg.n_layer, cfg.n_kv_head, cfg.head_dim, 256)
    ids = m.prefix_ids + ref_ids
    with torch.no_grad():
        m.decoder(torch.tensor([ids]), positions=torch.arange(len(ids))[None] + shift, cache=cache)
    keys, values, valid = place([[item]], m.sink_keys, m.sink_values, s, cfg.head_dim, cfg.rope_base)
    assert valid.all() and keys[0].shape == (1, cfg.n_kv_head, p + 5, cfg.head_dim)
    for li, layer in enumerate(s.memory_layers):
        written = cache[layer].keys[0]  # (H, T, D), rotated at write
        written_v = cache[layer].values[0]
        torch.testing.assert_close(keys[li][0, :, :p], written[:, :p], atol=1e-5, rtol=1e-5)  # the sink
        for h in range(cfg.n_kv_head):
            pos = torch.from_numpy(item.positions[li, h].astype(np.int64)) + p
            torch.testing.assert_close(keys[li][0, h, p:], written[h, pos], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(values[li][0, h, p:], written_v[h, pos], atol=1e-5, rtol=1e-5)


def test_parallel_memories_share_one_span():
    s = MemorySettings(memory_layers=(0,), tokens_per_head=4, position_policy="parallel")
    m = MemoryModel.tiny(settings=s, seed=6)
    texts = [REF, "Another reference about Quimby."]
    items = [EncodedMemory.from_encoded(i, t, e) for i, (t, e) in enumerate(zip(texts, m.encode(texts)))]
    cfg = m.decoder.cfg
    both, _, _ = place([items], m.sink_keys, m.sink_values, s, cfg.head_dim, cfg.rope_base)
    alone, _, _ = place([[items[1]]], m.sink_keys, m.sink_values, s, cfg.head_dim, cfg.rope_base)
    p = len(m.prefix_ids)
    # the second memory sits at the same positions whether or not another precedes it
    torch.testing.assert_close(both[0][0, :, p + 4 :], alone[0][0, :, p:])
    assert context_start(s, p) == p + s.reference_length


def test_place_pads_rows_and_marks_validity():
    s = MemorySettings(memory_layers=(0, 1), tokens_per_head=4)
    m = MemoryModel.tiny(settings=s, seed=7)
    item = EncodedMemory.from_encoded(0, REF, m.encode([REF])[0])
    cfg = m.decoder.cfg
    keys, values, valid = place([[item, item], []], m.sink_keys, m.sink_values, s, cfg.head_dim, cfg.rope_base)
    p = len(m.prefix_ids)
    assert valid.shape == (2, p + 8)
    assert valid[0].all() and valid[1, :p].all() and not valid[1, p:].any()
    assert keys[1].shape == (2, cfg.n_kv_head, p + 8, cfg.head_dim)


def test_memory_from_another_spec_is_refused():
    m = MemoryModel.tiny(settings=MemorySettings(memory_layers=(0, 1), tokens_per_head=4))
    other = MemoryModel.tiny(settings=MemorySettings(memory_layers=(0,), tokens_per_head=4))
    item = EncodedMemory.from_encoded(9, REF, other.encode([REF])[0])
    cfg = m.decoder.cfg
    with pytest.raises(ValueError, match="memory 9: .* do not fit the spec"):
        place([[item]], m.sink_keys, m.sink_values, m.settings, cfg.head_dim, cfg.rope_base)


def test_read_only_arrays_are_accepted_without_warning():
    """The engine hands memory-mapped, read-only arrays; torch must not wrap them."""
    import warnings

    s = MemorySettings(memory_layers=(0, 1), tokens_per_head=4)
    m = MemoryModel.tiny(settings=s, seed=8)
    e = m.encode([REF])[0]
    for a in (e["keys"], e["values"], e["positions"]):
        a.setflags(write=False)
    item = EncodedMemory.from_encoded(0, REF, e)
    cfg = m.decoder.cfg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keys, _, _ = place([[item]], m.sink_keys, m.sink_values, s, cfg.head_dim, cfg.rope_base)
    assert torch.isfinite(keys[0]).all()
