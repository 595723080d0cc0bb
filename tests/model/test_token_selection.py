"""Token selection variants (MemorySettings.token_selection) on the tiny random config."""

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from m3db.model.encoder import attention_received, select_words, word_spans  # noqa: E402
from m3db.model.memory_model import MemoryModel  # noqa: E402
from m3db.model.settings import TOKEN_SELECTIONS, MemorySettings  # noqa: E402

TEXTS = [
    "Quorvenna Dalstrup is a market town on the Skelvo river; it counted 48213 inhabitants.",
    "Short one.",
    "The Hyolt Vaskan was launched on 14 March 1873 and ran aground near the isle of Tyoachrn.",
]


def model_for(selection, tokens=8):
    s = MemorySettings(memory_layers=(0, 2), tokens_per_head=tokens, token_selection=selection)
    return MemoryModel.tiny(settings=s, seed=0)


def words_of(model, text):
    ids = model.tokenizer.encode(text)
    return word_spans([model.tokenizer.decode([t]) for t in ids])


def test_word_spans_join_subword_pieces_and_digits():
    assert word_spans(["The", " Qu", "orv", "enna", " was", " 1", "8", "7", "3", "."]) == [0, 1, 1, 1, 2, 3, 3, 3, 3, 4]
    assert word_spans([]) == []


def test_select_words_keeps_whole_words_then_fills():
    score = torch.tensor([0.0, 5.0, 1.0, 1.0, 4.0, -1.0])
    words = [0, 1, 1, 1, 2, 3]
    # the best word (tokens 1-3, best token 5.0) fits in 4 slots; then word 2 (4.0)
    assert select_words(score, words, 4).tolist() == [1, 2, 3, 4]
    # 2 slots: word 1 does not fit, word 2 does, then word 0 (whole words before parts)
    assert select_words(score, words, 2).tolist() == [0, 4]
    # 3 slots: word 0 (tokens 0-1) fits, word 1 (4 tokens) does not: the slot left goes to
    # the best token left
    assert select_words(score, [0, 0, 1, 1, 1, 1], 3).tolist() == [0, 1, 4]


def test_unknown_selection_is_refused():
    with pytest.raises(ValueError, match="token_selection"):
        MemorySettings(token_selection="random").resolve(4)


@pytest.mark.parametrize("selection", TOKEN_SELECTIONS)
def test_every_selection_keeps_the_same_count_and_is_batch_invariant(selection):
    m = model_for(selection)
    together = m.encode(TEXTS)
    for text, enc in zip(TEXTS, together):
        alone = m.encode([text])[0]
        n = min(8, m.count_tokens(text))
        assert enc["positions"].shape == (2, m.decoder.cfg.n_kv_head, n)
        assert np.array_equal(alone["positions"], enc["positions"])
        assert (np.diff(enc["positions"].astype(int), axis=-1) > 0).all()  # ascending, distinct


def test_head_selection_is_each_heads_own_top_tokens():
    m = model_for("head")
    text = TEXTS[0]
    ids = m.prefix_ids + m.tokenizer.encode(text)
    p = len(m.prefix_ids)
    with torch.no_grad():
        st = m.decoder.layer_states(torch.tensor([ids]), [0, 2])
    enc = m.encode([text])[0]
    for li, layer in enumerate((0, 2)):
        q, k, _ = st[layer]
        w = attention_received(q[:, :, p:], k[:, :, p:], torch.ones(1, len(ids) - p, dtype=torch.bool))[0]
        for h in range(w.shape[0]):
            top = torch.argsort(-torch.round(w[h] * 1024), stable=True)[:8].sort().values
            assert enc["positions"][li, h].tolist() == top.tolist()


def test_shared_selections_share_positions():
    for selection, across_layers in (("layer", False), ("layer-words", False), ("memory-words", True)):
        enc = model_for(selection).encode([TEXTS[0]])[0]
        pos = enc["positions"]  # (L, H, n)
        assert (pos == pos[:, :1]).all(), selection  # every head of a layer keeps the same tokens
        if across_layers:
            assert (pos == pos[:1]).all(), selection


@pytest.mark.parametrize("selection", ["layer-words", "memory-words"])
def test_word_selections_keep_whole_words(selection):
    n = 24
    m = model_for(selection, tokens=n)
    for text in TEXTS:
        words = words_of(m, text)
        size = {w: words.count(w) for w in set(words)}
        pos = m.encode([text])[0]["positions"]
        for row in pos.reshape(-1, pos.shape[-1]).tolist():
            if len(words) <= n:
                assert row == list(range(len(words)))
                continue
            inside = {w: sum(words[t] == w for t in row) for w in set(words[t] for t in row)}
            whole = sum(c for w, c in inside.items() if c == size[w])
            free = n - whole
            # a word is cut or left out only when it did not fit in the slots whole words left
            for w in size:
                if inside.get(w, 0) != size[w]:
                    assert size[w] > free, (selection, text, w)
