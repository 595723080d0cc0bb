"""Reading memories: the retrieval callback protocol, and placing memories for attention.

Owns the contract between the generation loop and whoever stores memories (the engine, or a
dict in tests): a `Retriever` returns `MemoryItem`s. Also owns the read-time placement: keys are
stored before RoPE with each kept token's position inside its reference, and are rotated here,
once per chunk, to the position policy's positions. Must not import the engine (`m3db`).

One encoded memory (numpy), for L memory layers, H KV heads, head dim D, n kept tokens:
    positions  uint8   (L, H, n)     token index inside the reference (prefix not counted)
    keys       float32 (L, H, n, D)  before RoPE
    values     float32 (L, H, n, D)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .decoder import apply_rope, rope_cos_sin
from .settings import MemorySettings


@runtime_checkable
class MemoryItem(Protocol):
    """One retrieved memory, as the engine hands it to the decoder."""

    id: int
    text: str  # the reference's source text (read by the text-RAG baseline)
    token_count: int  # tokens in the reference, prefix not counted
    positions: np.ndarray  # uint8 (L, H, n)
    keys: np.ndarray  # float32 (L, H, n, D), before RoPE
    values: np.ndarray  # float32 (L, H, n, D)


class Retriever(Protocol):
    """The callback through which generation asks for memories.

    Called with the text of one chunk (64 tokens of prompt, or the last 64 generated tokens)
    and how many memories to return; returns at most k items, best first. The engine
    implements it (embed, vector search, SQL filter, load from segments).
    """

    def __call__(self, query_text: str, k: int) -> Sequence[MemoryItem]: ...


@dataclass(frozen=True)
class EncodedMemory:
    """A plain `MemoryItem` made from what `encode()` returned (what tests and in-process stores
    use); not to be confused with `m3db.Memory`, a record read from a database."""

    id: int
    text: str
    token_count: int
    positions: np.ndarray
    keys: np.ndarray
    values: np.ndarray

    @classmethod
    def from_encoded(cls, id: int, text: str, encoded: dict) -> "EncodedMemory":
        return cls(
            id=id,
            text=text,
            token_count=int(encoded["token_count"]),
            positions=encoded["positions"],
            keys=encoded["keys"],
            values=encoded["values"],
        )


def context_start(settings: MemorySettings, prefix_len: int) -> int:
    """RoPE position of the first context token when memories are read.

    parallel: after the sink (positions 0..p-1) and the shared reference span of
    reference_length positions. sequential: after the sink and room for memories_per_chunk
    references laid end to end. Fixed for a whole generation, because context keys in the
    cache are already rotated when the memories change.
    """
    if settings.position_policy == "parallel":
        return prefix_len + settings.reference_length
    return prefix_len + max(1, settings.memories_per_chunk) * settings.reference_length


def check_item(item: MemoryItem, n_layers: int, n_kv: int, head_dim: int, reference_length: int) -> None:
    """Refuse a memory whose arrays do not fit this model's memory spec."""
    k, v, p = item.keys, item.values, item.positions
    if (
        k.ndim != 4
        or k.shape[:2] != (n_layers, n_kv)
        or k.shape[3] != head_dim
        or v.shape != k.shape
        or p.shape != k.shape[:3]
    ):
        raise ValueError(
            f"memory {item.id}: keys {k.shape}, values {v.shape}, positions {p.shape} do not fit the "
            f"spec (L={n_layers}, H={n_kv}, n, D={head_dim}); it was encoded for another model or settings"
        )
    if p.size and int(p.max()) >= reference_length:
        raise ValueError(
            f"memory {item.id}: position {int(p.max())} is outside the reference length {reference_length}"
        )


def place(
    rows: Sequence[Sequence[MemoryItem]],
    sink_keys: torch.Tensor,
    sink_values: torch.Tensor,
    settings: MemorySettings,
    head_dim: int,
    rope_base: float,
    rotate=None,
):
    """Rotate and pad one chunk's memories for attention.

    rows: per batch row, its memories (possibly none). sink_keys/values: (L, H, p, D), the
    reference prefix's pre-RoPE keys and values at the memory layers. rotate: None (this
    decoder's RoPE with rope_base), or a callable (keys (B, L, H, M, D), positions (B, L, H, M))
    -> rotated keys, so another implementation rotates with its own rotary embedding (scaling
    variants included). Returns (keys, values, valid): keys[i], values[i] (B, H, M, D) for the
    i-th memory layer, rotated; valid (B, M).
    """
    L, H, p, D = sink_keys.shape
    start = context_start(settings, p)
    per_row_k, per_row_v, per_row_pos = [], [], []
    for items in rows:
        for it in items:
            check_item(it, L, H, D, settings.reference_length)
        if settings.position_policy == "parallel":
            base, offsets = p, [p] * len(items)
        else:
            lengths = [int(it.token_count) for it in items]
            base = start - sum(lengths)
            offsets = list(np.cumsum([0] + lengths[:-1]) + base) if items else []
        sink_pos = torch.arange(base - p, base).expand(L, H, p)  # (L, H, p)
        # np.array copies: the engine may hand read-only (memory-mapped) arrays, which torch
        # must not wrap; the copy is small (one chunk's memories) and made once per chunk
        ks = [sink_keys] + [torch.from_numpy(np.array(it.keys, dtype=np.float32)) for it in items]
        vs = [sink_values] + [torch.from_numpy(np.array(it.values, dtype=np.float32)) for it in items]
        ps = [sink_pos] + [
            torch.from_numpy(it.positions.astype(np.int64)) + int(off) for it, off in zip(items, offsets)
        ]
        per_row_k.append(torch.cat(ks, dim=2))  # (L, H, M_b, D)
        per_row_v.append(torch.cat(vs, dim=2))
        per_row_pos.append(torch.cat(ps, dim=2))  # (L, H, M_b)
    B, M = len(rows), max(k.shape[2] for k in per_row_k)
    keys = torch.zeros(B, L, H, M, D)
    values = torch.zeros(B, L, H, M, D)
    pos = torch.zeros(B, L, H, M, dtype=torch.long)
    valid = torch.zeros(B, M, dtype=torch.bool)
    for b, (k, v, ps) in enumerate(zip(per_row_k, per_row_v, per_row_pos)):
        m = k.shape[2]
        keys[b, :, :, :m], values[b, :, :, :m], pos[b, :, :, :m] = k, v, ps
        valid[b, :m] = True
    if rotate is None:
        cos, sin = rope_cos_sin(pos, head_dim, rope_base)  # (B, L, H, M, D)
        keys = apply_rope(keys, cos, sin)
    else:
        keys = rotate(keys, pos)
    return [keys[:, i] for i in range(L)], [values[:, i] for i in range(L)], valid
