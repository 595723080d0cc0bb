"""Writing memories: self-encoding a reference and sparsifying its keys/values.

Owns the memory encoder (Memory³ section "writing"): each reference (<= reference_length
tokens) is encoded on its own after the reference prefix, through the memory layers only;
then per (memory layer, KV head) the tokens that receive the most attention are kept. Output
is the engine's memory layout (see `model.memory`). Must not import the engine (`m3db`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .decoder import Decoder
from .settings import MemorySettings


class ReferenceTooLong(ValueError):
    """A reference has more tokens than the memory spec's reference_length: chunk it first."""


def attention_received(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Log of the attention each token receives: log sum_{g, i} exp(q_{g,i} . k_j / sqrt(hs)).

    q (B, nh, T, hs) and k (B, kv, T, hs) are pre-RoPE (no position encoding in the score) and
    cover reference tokens only (prefix already cut off); valid (B, T) marks real tokens. No
    causal mask: every real token i scores every real token j (paper's w_j). With GQA the
    query heads that share a KV head are summed (the paper leaves this open). Computed as a
    logsumexp, whose order equals the sum's, so large scores cannot overflow.
    Returns (B, kv, T), -inf at padding.
    """
    B, nh, T, hs = q.shape
    kv = k.shape[1]
    g = nh // kv
    qg = q.reshape(B, kv, g * T, hs)  # (B, kv, g*T, hs): query head h reads KV head h // g
    s = (qg @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hs))  # (B, kv, g*Tq, Tk)
    q_valid = valid[:, None, :].expand(B, g, T).reshape(B, 1, g * T, 1)  # (B, 1, g*Tq, 1)
    s = s.masked_fill(~q_valid, float("-inf"))  # padding queries give nothing
    w = torch.logsumexp(s, dim=2)  # (B, kv, Tk)
    return w.masked_fill(~valid[:, None, :], float("-inf"))


def word_spans(pieces: Sequence[str]) -> list[int]:
    """Word index of each token, from the tokens' decoded text: a token continues the previous
    token's word when it starts with a letter or digit and the previous one ends with one
    (so an invented name cut into sub-word pieces, or a number cut into digits, is one word)."""
    out, w = [], -1
    for i, piece in enumerate(pieces):
        joins = i > 0 and piece[:1].isalnum() and pieces[i - 1][-1:].isalnum()
        if not joins:
            w += 1
        out.append(w)
    return out


def select_words(score: torch.Tensor, words: Sequence[int], n: int) -> torch.Tensor:
    """Positions (n,) of whole words to keep: words ranked by their best token's score (ties by
    position), each taken while it fits in the n slots; slots left over go to the best tokens
    not yet taken (parts of words too long to fit). score (T,) is rounded already; -inf at
    padding; words has one entry per real token."""
    T = len(words)
    best: dict[int, float] = {}
    members: dict[int, list[int]] = {}
    for t, w in enumerate(words):
        v = float(score[t])
        best[w] = max(best.get(w, float("-inf")), v)
        members.setdefault(w, []).append(t)
    taken: list[int] = []
    for w in sorted(best, key=lambda w: (-best[w], members[w][0])):
        if len(taken) == n:
            break
        if len(taken) + len(members[w]) <= n:
            taken += members[w]
    if len(taken) < n:
        kept = set(taken)
        rest = [t for t in torch.argsort(-score[:T], stable=True).tolist() if t not in kept]
        taken += rest[: n - len(taken)]
    return torch.tensor(sorted(taken), dtype=torch.long)


def select(scores: torch.Tensor, lens: Sequence[int], n_max: int, how: str, words=None) -> torch.Tensor:
    """Kept positions (L, B, kv, n_max), best first for "head", ascending otherwise (callers
    sort), from rounded scores (L, B, kv, T) with -inf at padding.

    "head": each (layer, head) its own top tokens. "layer": per layer, the tokens the layer's
    heads attend to most together (logsumexp over heads). "layer-words": as "layer", in whole
    words (`select_words`). "memory-words": one word set from every layer and head together.
    A row with fewer than n_max real tokens fills its tail from the padding (callers cut at
    its own n)."""
    L, B, kv, T = scores.shape
    if how == "head":
        return torch.argsort(-scores, dim=-1, stable=True)[..., :n_max]
    shared = torch.logsumexp(scores, dim=2)  # (L, B, T): attention from all the layer's heads
    if how == "memory-words":
        shared = torch.logsumexp(shared, dim=0, keepdim=True).expand(L, B, T)
    shared = torch.round(shared * 1024) / 1024  # ties broken by position, as for "head"
    if how == "layer":
        top = torch.argsort(-shared, dim=-1, stable=True)[..., :n_max]  # (L, B, n_max)
        return top[:, :, None, :].expand(L, B, kv, n_max)
    if words is None:
        raise ValueError(f"token_selection {how!r} needs the word of every token")
    out = torch.zeros(L, B, kv, n_max, dtype=torch.long)
    layers = 1 if how == "memory-words" else L
    for b in range(B):
        n = min(n_max, lens[b])
        for i in range(layers):
            pos = select_words(shared[i, b, : lens[b]], words[b], n)
            out[i if layers > 1 else slice(None), b, :, :n] = pos
    return out


def prefix_states(
    decoder: Decoder, prefix_ids: Sequence[int], layers: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-RoPE keys and values (L, H, p, D) of the reference prefix alone: the attention sink.

    Attention is causal, so the prefix's states inside any reference equal these.
    """
    idx = torch.tensor([list(prefix_ids)], device=decoder.device)
    with torch.no_grad():
        st = decoder.layer_states(idx, list(layers))
    keys = torch.stack([st[i][1][0] for i in layers]).cpu()  # (L, H, p, D)
    values = torch.stack([st[i][2][0] for i in layers]).cpu()
    return keys, values


def encode(
    decoder: Decoder,
    token_ids: Sequence[Sequence[int]],
    prefix_ids: Sequence[int],
    settings: MemorySettings,
    *,
    batch_size: int = 16,
    words: Sequence[Sequence[int]] | None = None,
) -> list[dict]:
    """Encode tokenized references into sparse memories (numpy, engine layout).

    settings must be resolved (explicit memory_layers). words: per reference, the word index
    of each token (`word_spans`), needed by the word-keeping token selections. Returns per reference a dict with
    positions uint8 (L, H, n), keys float32 (L, H, n, D) pre-RoPE, values float32 (L, H, n, D),
    token_count; n = min(tokens_per_head, token_count).
    """
    layers = list(settings.memory_layers)
    for j, ids in enumerate(token_ids):
        if not 1 <= len(ids) <= settings.reference_length:
            raise ReferenceTooLong(
                f"reference {j} has {len(ids)} tokens; expected 1..{settings.reference_length}: "
                "chunk references to at most "
                f"{settings.reference_length} tokens"
            )
    p = len(prefix_ids)
    # longest first, so each batch pads little; results are put back in input order
    order = sorted(range(len(token_ids)), key=lambda j: -len(token_ids[j]))
    out: list[dict | None] = [None] * len(token_ids)
    for s in range(0, len(order), batch_size):
        batch = order[s : s + batch_size]
        lens = [len(token_ids[j]) for j in batch]
        T = max(lens)
        idx = torch.zeros(len(batch), p + T, dtype=torch.long)  # (B, p+T), right padding
        valid = torch.zeros(len(batch), p + T, dtype=torch.bool)
        for b, j in enumerate(batch):
            idx[b, :p] = torch.tensor(list(prefix_ids), dtype=torch.long)
            idx[b, p : p + lens[b]] = torch.tensor(list(token_ids[j]), dtype=torch.long)
            valid[b, : p + lens[b]] = True
        with torch.no_grad():
            states = decoder.layer_states(idx.to(decoder.device), layers, valid.to(decoder.device))
        ref_valid = valid[:, p:].to(states[layers[0]][0].device)  # (B, T): prefix and padding excluded from scoring
        n_max = min(settings.tokens_per_head, T)
        # all memory layers scored in one batched call: few large ops beat many small ones
        queries = torch.stack([states[i][0][:, :, p:] for i in layers])  # (L, B, nh, T, D), pre-RoPE
        keys = torch.stack([states[i][1][:, :, p:] for i in layers])  # (L, B, kv, T, D), pre-RoPE
        values = torch.stack([states[i][2][:, :, p:] for i in layers])
        L, B, kv, _, D = keys.shape
        scores = attention_received(queries.flatten(0, 1), keys.flatten(0, 1), ref_valid.repeat(L, 1))  # (L*B, kv, T)
        # the forward ran where the decoder lives (a GPU in training); selection and the
        # memories themselves are small and leave for the CPU, where the engine stores them
        scores, keys, values = scores.cpu(), keys.cpu(), values.cpu()
        # Ties are real (layer 0's pre-RoPE keys of a repeated token are identical) and float
        # noise of ~1e-6 differs with the batch's padding, so topk alone keeps different tokens
        # for the same reference in different batches. Rank by the score rounded to 2^-10, then
        # by position: a reference gets the same memory however it is batched.
        rounded = torch.round(scores.view(L, B, kv, T) * 1024)
        top = select(
            rounded / 1024,
            lens,
            n_max,
            settings.token_selection,
            None if words is None else [words[j] for j in batch],
        )  # (L, B, kv, n_max)
        for b, j in enumerate(batch):
            n = min(settings.tokens_per_head, lens[b])
            pos = top[:, b, :, :n].sort(dim=-1).values  # (L, kv, n), ascending
            at = pos[..., None].expand(-1, -1, -1, D)  # (L, kv, n, D)
            out[j] = {
                "positions": pos.numpy().astype(np.uint8),
                "keys": torch.gather(keys[:, b], 2, at).numpy(),
                "values": torch.gather(values[:, b], 2, at).numpy(),
                "token_count": lens[b],
            }
    return out  # type: ignore[return-value]
