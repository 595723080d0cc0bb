"""The decoder: a Llama-family transformer whose memory layers read explicit memories.

Reads top-down like nanoGPT: config, norm, RoPE, attention, MLP, block, model. Architecture
of SmolLM2 (Llama): RMSNorm, rotary position embedding ("rotate half" layout), grouped-query
attention, SwiGLU MLP, tied input/output embeddings. fp32 on CPU.

Memory attention (Memory³): at a memory layer, the current memories' keys/values (already
rotated to their positions, see `model.memory`) sit in front of the context's keys/values for
every head; the context stays causal. Non-memory layers never see memory. A reader adapter
(`model.adapter`), when given, adds low-rank updates to the attention projections.

Must not import the engine (`m3db`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import KVCache


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int = 49152
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3
    n_embd: int = 576
    n_hidden: int = 1536
    rope_base: float = 100000.0
    rope_scaling: dict | None = None
    norm_eps: float = 1e-5
    max_seq_len: int = 8192
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def tiny(cls, vocab_size: int = 512) -> "DecoderConfig":
        """Same architecture, small sizes: 4 layers, 4 query heads sharing 2 KV heads of 16."""
        return cls(
            vocab_size=vocab_size,
            n_layer=4,
            n_head=4,
            n_kv_head=2,
            n_embd=64,
            n_hidden=128,
            rope_base=10000.0,
            max_seq_len=2048,
        )

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape positions.shape + (hs,) for integer positions of any shape."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # (..., hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., hs)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., hs) by its positions' angles; pairs are (i, i + hs/2) ("rotate half")."""
    h = x.shape[-1] // 2
    rotated = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hs = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * self.hs, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.hs, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.hs, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * self.hs, cfg.n_embd, bias=False)

    def qkv(self, x):
        """Pre-RoPE q (B, nh, T, hs), k and v (B, kv, T, hs)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2)  # (B, kv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2)  # (B, kv, T, hs)
        return q, k, v

    def forward(self, x, cos, sin, mask, cache=None, memory=None, capture=None, lora=None):
        """x (B, T, C); cos/sin (B, 1, T, hs); mask (B, 1, T, S) bool, True = may attend.

        cache: this layer's `LayerCache` (its memory slots already filled), or None.
        memory: (k, v) rotated memory (B, kv, M, hs) for the cacheless path, or None.
        capture: a list that receives the pre-RoPE (q, k, v), for memory encoding.
        lora: this layer's reader adapter (`model.adapter.LayerAdapter`), or None.
        """
        B, T, C = x.shape
        q, k, v = self.qkv(x)
        if lora is not None:
            q, k, v = (_plus(t, lora.delta(name, x), self.hs) for name, t in (("q", q), ("k", k), ("v", v)))
        if capture is not None:
            capture.append((q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, kv, M + S, hs)
        elif memory is not None:
            k = torch.cat((memory[0], k), dim=2)  # (B, kv, M + T, hs)
            v = torch.cat((memory[1], v), dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.n_head != self.n_kv
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, nh*hs)
        out = self.o_proj(y)
        d = lora.delta("o", y) if lora is not None else None
        return out if d is None else out + d


def _plus(states, delta, hs):
    """states (B, heads, T, hs) plus a projection update delta (B, T, heads*hs), or states."""
    if delta is None:
        return states
    B, heads, T, _ = states.shape
    return states + delta.view(B, T, heads, hs).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.n_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.n_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.n_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, memory=None, capture=None, lora=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, memory, capture, lora)
        return x + self.mlp(self.mlp_norm(x))


def attention_mask(q_valid, k_valid, offset: int, mem_valid=None) -> torch.Tensor:
    """Boolean mask (B, 1, T, M + S): memory slots by validity, context causal and unpadded.

    q_valid (B, T) for the T new tokens at context index offset..offset+T-1; k_valid (B, S)
    for all S context keys; mem_valid (B, M) or None. Every query may attend to itself, so a
    padding query never has an empty row (its output is discarded, but NaN would spread).
    """
    T, S = q_valid.shape[1], k_valid.shape[1]
    qi = torch.arange(offset, offset + T, device=q_valid.device)[:, None]  # (T, 1)
    kj = torch.arange(S, device=q_valid.device)[None, :]  # (1, S)
    ctx = (kj <= qi)[None] & k_valid[:, None, :]  # (B, T, S)
    ctx = ctx | (kj == qi)[None]
    if mem_valid is not None:
        mem = mem_valid[:, None, :].expand(-1, T, -1)  # (B, T, M)
        ctx = torch.cat((mem, ctx), dim=2)  # (B, T, M + S)
    return ctx[:, None]  # (B, 1, T, M + S)


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head = None  # a quantized output projection (model.quantize), else the weights above

    @classmethod
    def random(cls, cfg: DecoderConfig, seed: int = 0, std: float = 0.02) -> "Decoder":
        """Random weights (std 0.02 like nanoGPT; larger std gives peakier attention, so that
        tests can see a memory's effect) for fast tests of the architecture."""
        g = torch.Generator().manual_seed(seed)
        model = cls(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(std * torch.randn(p.shape, generator=g))
        return model.eval()

    @property
    def device(self) -> torch.device:
        """Where the weights live (memory encoding and training put their inputs there)."""
        return self.tok_emb.weight.device

    def logits(self, x):
        x = self.norm(x)
        if self.head is not None:
            return self.head(x)
        w = self.tok_emb.weight if self.cfg.tie_embeddings else self.lm_head.weight
        return x @ w.T  # (B, T, vocab)

    def forward(
        self,
        idx,
        *,
        positions=None,
        valid=None,
        cache: KVCache | None = None,
        memory=None,
        last_only=False,
        adapter=None,
    ):
        """Logits (B, T, vocab), or (B, 1, vocab) with last_only.

        idx (B, T) token ids; positions (B, T) RoPE positions (default 0..T-1 after the cache);
        valid (B, T) bool, False at padding. With a cache, memories come from the cache's
        memory slots (`KVCache.set_memory`); without one, `memory` is a dict
        {layer: (k, v)} of rotated (B, kv, M, hs) tensors plus key "valid" (B, M).
        adapter: a `model.adapter.ReaderAdapter` applied to every layer's attention, or None
        (memory encoding, `layer_states`, never takes one: the encoder stays frozen).
        """
        B, T = idx.shape
        past = cache.get_seq_length() if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + T, device=idx.device).expand(B, T)
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=idx.device)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_base)  # (B, T, hs)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hs)
        if cache is not None:
            cache.append_valid(valid)
            k_valid = cache.ctx_valid[:, : past + T]
            mem_layers, mem_valid = cache.memory_layers, cache.mem_valid
        else:
            k_valid = valid
            mem_valid = memory["valid"] if memory else None
            mem_layers = {i for i in memory if i != "valid"} if memory else set()
        plain_mask = attention_mask(valid, k_valid, past)
        mem_mask = (
            attention_mask(valid, k_valid, past, mem_valid) if mem_layers and mem_valid is not None else plain_mask
        )
        x = self.tok_emb(idx)  # (B, T, C)
        for i, blk in enumerate(self.blocks):
            is_mem = i in mem_layers
            mask = mem_mask if is_mem else plain_mask
            layer_cache = cache[i] if cache is not None else None
            layer_mem = memory[i] if (cache is None and is_mem) else None
            x = blk(x, cos, sin, mask, layer_cache, layer_mem, lora=adapter.layer(i) if adapter is not None else None)
        if last_only:
            x = x[:, -1:]
        return self.logits(x)

    def layer_states(self, idx, layers, valid=None):
        """Pre-RoPE q (B, nh, T, hs), k, v (B, kv, T, hs) at each layer in `layers`.

        Runs only as far as needed: blocks before the last requested layer in full, the last
        one only up to its q/k/v projections (what memory encoding needs). Positions 0..T-1,
        causal, right padding allowed (padding comes after every real token, so it never
        changes a real token's states).
        """
        B, T = idx.shape
        last = max(layers)
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=idx.device)
        positions = torch.arange(T, device=idx.device).expand(B, T)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_base)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hs)
        mask = attention_mask(valid, valid, 0)
        x = self.tok_emb(idx)  # (B, T, C)
        out = {}
        for i, blk in enumerate(self.blocks[: last + 1]):
            if i == last:
                out[i] = blk.attn.qkv(blk.attn_norm(x))
                break
            capture = [] if i in layers else None
            x = blk(x, cos, sin, mask, capture=capture)
            if capture:
                out[i] = capture[0]
        return out


def load_state(model: Decoder, state: dict[str, torch.Tensor]) -> Decoder:
    """Copy a state dict into the model, refusing missing or extra names."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not fit the decoder: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model
