"""The KV cache: per-layer key/value buffers, with a memory region in front at memory layers.

Follows transformers' `cache_utils` shape: a `KVCache` is a list of `LayerCache` objects that
share a few verbs (`update`, `get_seq_length`, `crop`, `reset`). Each layer's buffer is laid out
as `[memory slots | context]` along the sequence axis, so attention reads memory and context as
one contiguous view, and swapping memories (every 64 tokens) writes the front slots in place
instead of concatenating on every decoding step. Non-memory layers have no memory slots.

Must not import the engine (`m3db`).
"""

from __future__ import annotations

import torch


class LayerCache:
    """Keys and values of one layer.

    Buffers are (B, n_kv, mem_cap + capacity, hs): `mem_cap` memory slots, then the context.
    Context keys are stored after RoPE; memory keys are written already rotated (see
    `model.memory`).
    """

    def __init__(
        self,
        batch: int,
        n_kv: int,
        head_dim: int,
        capacity: int,
        mem_cap: int = 0,
        *,
        dtype=torch.float32,
        device=None,
    ):
        self.batch, self.n_kv, self.head_dim, self.dtype, self.device = batch, n_kv, head_dim, dtype, device
        self.mem_cap = mem_cap
        self.length = 0  # context tokens held
        # zeros, not empty: masked slots still meet V in the matmul and 0 * NaN would be NaN
        self.keys = torch.zeros(
            batch, n_kv, mem_cap + capacity, head_dim, dtype=dtype, device=device
        )  # (B, kv, M+C, hs)
        self.values = torch.zeros_like(self.keys)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2] - self.mem_cap

    def _realloc(self, mem_cap: int, capacity: int) -> None:
        keys = torch.zeros(
            self.batch, self.n_kv, mem_cap + capacity, self.head_dim, dtype=self.dtype, device=self.device
        )
        values = torch.zeros_like(keys)
        n = self.length
        keys[:, :, mem_cap : mem_cap + n] = self.keys[:, :, self.mem_cap : self.mem_cap + n]
        values[:, :, mem_cap : mem_cap + n] = self.values[:, :, self.mem_cap : self.mem_cap + n]
        self.keys, self.values, self.mem_cap = keys, values, mem_cap

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append context k, v (B, kv, T, hs); return views (B, kv, mem_cap + length, hs)."""
        t = k.shape[2]
        if self.length + t > self.capacity:
            self._realloc(self.mem_cap, max(2 * self.capacity, self.length + t))
        s = self.mem_cap + self.length
        self.keys[:, :, s : s + t] = k
        self.values[:, :, s : s + t] = v
        self.length += t
        end = self.mem_cap + self.length
        return self.keys[:, :, :end], self.values[:, :, :end]

    def set_memory(self, k: torch.Tensor, v: torch.Tensor, mem_cap: int) -> None:
        """Write rotated memory k, v (B, kv, M, hs) into the front slots, M <= mem_cap."""
        if mem_cap != self.mem_cap:
            self._realloc(mem_cap, self.capacity)
        m = k.shape[2]
        self.keys[:, :, :m] = k
        self.values[:, :, :m] = v
        self.keys[:, :, m:mem_cap] = 0
        self.values[:, :, m:mem_cap] = 0

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, length: int) -> None:
        """Forget context tokens past `length` (memory slots are kept)."""
        self.length = min(self.length, length)

    def reset(self) -> None:
        self.length = 0
        self.keys.zero_()
        self.values.zero_()


class KVCache:
    """All layers' caches, plus which context and memory slots are real (not padding).

    `ctx_valid` (B, capacity) marks context tokens that may be attended to (left padding of a
    batch is False); `mem_valid` (B, mem_cap) does the same for memory slots. Both stay on the
    CPU (masks are built there); dtype and device place the key/value buffers (a transformers
    model on a GPU keeps its cache there, in its own dtype).
    """

    def __init__(
        self,
        batch: int,
        n_layer: int,
        n_kv: int,
        head_dim: int,
        capacity: int,
        memory_layers=(),
        *,
        dtype=torch.float32,
        device=None,
    ):
        self.memory_layers = frozenset(memory_layers)
        self.layers = [LayerCache(batch, n_kv, head_dim, capacity, dtype=dtype, device=device) for _ in range(n_layer)]
        self.batch = batch
        self.ctx_valid = torch.zeros(batch, capacity, dtype=torch.bool)
        self.mem_valid = torch.zeros(batch, 0, dtype=torch.bool)

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def mem_cap(self) -> int:
        return self.mem_valid.shape[1]

    def get_seq_length(self) -> int:
        return self.layers[0].get_seq_length()

    def append_valid(self, valid: torch.Tensor) -> None:
        """Record validity (B, T) of the T context tokens about to be appended."""
        n, t = self.get_seq_length(), valid.shape[1]
        if n + t > self.ctx_valid.shape[1]:
            grown = torch.zeros(self.batch, max(2 * self.ctx_valid.shape[1], n + t), dtype=torch.bool)
            grown[:, :n] = self.ctx_valid[:, :n]
            self.ctx_valid = grown
        self.ctx_valid[:, n : n + t] = valid

    def set_memory(self, keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor) -> None:
        """Put rotated memories in front of the context at every memory layer.

        keys[i], values[i]: (B, kv, M, hs) for the i-th memory layer in ascending order;
        valid: (B, M). Slot capacity only grows, so swapping in fewer memories costs no copy.
        """
        m = valid.shape[1]
        cap = max(self.mem_cap, m)
        for layer, k, v in zip(sorted(self.memory_layers), keys, values):
            self.layers[layer].set_memory(k, v, cap)
        mv = torch.zeros(self.batch, cap, dtype=torch.bool)
        mv[:, :m] = valid
        self.mem_valid = mv

    def clear_memory(self) -> None:
        self.mem_valid = torch.zeros_like(self.mem_valid)

    def crop(self, length: int) -> None:
        for c in self.layers:
            c.crop(length)

    def reset(self) -> None:
        for c in self.layers:
            c.reset()
        self.ctx_valid.zero_()
        self.clear_memory()
