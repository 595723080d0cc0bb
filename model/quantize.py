"""Quantized reading: the decoder's linear layers on int8 or int4 weights, for speed on CPU.

A batch-1 decode step reads every weight once, so on a CPU it is bound by memory bandwidth:
fp32 weights are 4 bytes a parameter, int8 1, int4 about 0.6 with its group scales. The kernels
are PyTorch's weight-only ones (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`): the
weights stay quantized, activations are bf16 and the kernels accumulate in fp32 (with fp32
activations the same kernels ran 20-40x slower on the AVX-512 development machine; bf16 is
their vectorized path). Measured there, one batch-1 decode step of SmolLM2-135M: fp32 ~37 ms,
int8 ~10 ms, int4 ~15 ms (docs/decoder.md has bench/bench_decode.py's figures).

- int4: every projection of every block in groups of 32 inputs, w = scale * q + minimum, q in
  0..15: the rule of the GGUF's Q4_1 blocks, so on weights dequantized from a Q4_1 file (the
  bundled model) the groups are the file's own blocks and the weights are exact, but for the
  scales' bf16 rounding. The output projection (the tied embedding) stays fp32.
- int8: every projection and the output projection symmetric per output channel.

Measured and rejected: FBGEMM's dynamic int8 linear (activations quantized per call) ran a
step in ~9.5 ms, but per-tensor activation scales cannot hold SmolLM2's outlier channels (up to
4800x the median at a down projection): -0.7 nats per token unsmoothed, and still 0.6-1.0
nats per answer (mean absolute) after SmoothQuant calibration. `torch.compile` of a
dequantizing linear did not beat eager.

Reading uses the quantized layers; memory encoding keeps the fp32 decoder (`MemoryModel`), so
a database's memories do not depend on the precision that reads them. Must not import the
engine (`m3db`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .decoder import MLP, Attention, Decoder

PRECISIONS = ("fp32", "int8", "int4")
# Whether a reader adapter is merged into the reading weights at each precision. Not at int4:
# there the bundled weights are the GGUF's own Q4_1 blocks, exact, and W + U D falls off their
# grid (answer tokens' log-probs moved 0.37-0.50 nats merged against 0.02 with the adapter
# applied on top, measured on two prompts); at int8 merged reads as close to fp32 as on top.
MERGES_ADAPTER = {"fp32": True, "int8": True, "int4": False}
GROUP = 32  # int4 weights: one scale and zero per 32 inputs, the GGUF Q4_1 block


class PrecisionError(ValueError):
    """A precision m3db cannot decode at."""


def check_precision(precision) -> str:
    if precision not in PRECISIONS:
        raise PrecisionError(
            f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r} (see docs/decoder.md)"
        )
    return precision


class Int8Linear(nn.Module):
    """y = x W^T with W int8, symmetric per output channel (the row's largest magnitude maps
    to 127), x in bf16."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().to(torch.float32)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        # the kernel takes bf16 scales: round the scale first and quantize against the rounded
        # one, so the only error left is the weights' own rounding
        self._scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-30).to(torch.bfloat16)
        q = torch.round(w / self._scale.to(torch.float32)[:, None]).clamp(-127, 127)
        self._q = q.to(torch.int8).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self._q, self._scale)
        return y.to(torch.float32).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int4Linear(nn.Module):
    """y = x W^T with W in 4-bit groups of 32 inputs (w = scale * q + minimum, q in 0..15) and
    x in bf16 (PyTorch's CPU int4 kernel is vectorized for bf16 activations only; with fp32 it
    ran 40x slower). The groups follow Q4_1's rule (minimum and (max - min) / 15 per block),
    so on weights dequantized from a Q4_1 GGUF (the bundled model) they reproduce the file's
    own blocks: the weights are exact but for the scales' bf16 rounding."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        w = weight.detach().to(torch.float32)
        n, k = w.shape
        if k % GROUP:
            raise PrecisionError(f"int4 needs every layer's input size to be a multiple of {GROUP}, got {k}")
        self.in_features, self.out_features = k, n
        g = w.reshape(n, k // GROUP, GROUP)
        low, high = g.amin(dim=-1), g.amax(dim=-1)
        scale = (high - low) / 15
        q = torch.where(scale[..., None] > 0, torch.round((g - low[..., None]) / scale[..., None].clamp(min=1e-30)), 0)
        q = q.clamp(0, 15).to(torch.int32).reshape(n, k)
        self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        # the kernel computes (q - 8) * scale + zero
        self._scales_zeros = (
            torch.stack((scale, low + 8 * scale), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).to(torch.bfloat16), self._packed, GROUP, self._scales_zeros
        )
        return y.to(torch.float32).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {GROUP}"


def quantize_decoder(decoder, precision: str, adapter=None):
    """A decoder that reads at `precision`, with `adapter` (a `model.adapter.ReaderAdapter`)
    merged into its attention projections: "fp32" with no adapter is `decoder` itself;
    otherwise a shallow copy whose attention projections are W + (alpha / rank) U D, and whose
    block projections below fp32 are Int8Linear or Int4Linear, with an Int8Linear output
    projection at int8 (embedding lookup and norms stay fp32, shared; at fp32 the MLPs too).
    `decoder` is untouched. Merging is exact up to rounding at fp32 and saves the adapter's
    low-rank matmuls on every step: applied on top they cost 7% of the tokens/s at fp32 and 19%
    at int8 (measured, docs/adapter.md); a merged fp32 reader holds a copy of the attention
    weights (106.2 MB for SmolLM2-135M, counted). Read it with no adapter: the adapter is in its weights.
    Callers merge only where `MERGES_ADAPTER` says so."""
    check_precision(precision)
    if precision == "fp32" and adapter is None:
        return decoder
    linear = {"fp32": _Linear, "int8": Int8Linear, "int4": Int4Linear}[precision]
    q = Decoder.__new__(Decoder)
    nn.Module.__init__(q)
    q.cfg = decoder.cfg
    q.tok_emb = decoder.tok_emb
    q.norm = decoder.norm
    q.blocks = nn.ModuleList(
        _quantized_block(b, linear, adapter.layer(i) if adapter is not None else None)
        for i, b in enumerate(decoder.blocks)
    )
    # int4 keeps the fp32 output projection: an int8 one (per channel, not the GGUF's Q8_0
    # blocks) moved answers' log-probs by 0.07-0.08 nats against 0.04-0.07 without it
    q.head = None
    if precision == "int8":
        q.head = Int8Linear(decoder.tok_emb.weight if decoder.cfg.tie_embeddings else decoder.lm_head.weight)
    return q.eval().requires_grad_(False)


def _quantized_block(block, linear, lora=None):
    """A copy of `block` (sharing its norms) whose attention reads q, k and v from one fused
    projection and whose MLP reads gate and up from one: one kernel call and one bf16
    conversion where there were three and two (each call costs ~5-10 us beside its bytes).
    lora: this layer's reader adapter (`LayerAdapter`), merged into the attention weights. At
    fp32 (`_Linear`) the MLP is the block's own, shared."""
    b = copy.copy(block)
    b._modules = dict(block._modules)
    attn, mlp = block.attn, block.mlp
    with torch.no_grad():
        q, k, v, o = (_merged(getattr(attn, f"{t}_proj").weight, lora, t) for t in ("q", "k", "v", "o"))
    b._modules["attn"] = FusedAttention(attn, linear(torch.cat((q, k, v))), linear(o))
    if linear is not _Linear:
        gate_up = torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight))
        b._modules["mlp"] = FusedMLP(linear(gate_up), linear(mlp.down_proj.weight), mlp.gate_proj.weight.shape[0])
    return b


def _merged(weight: torch.Tensor, lora, target: str) -> torch.Tensor:
    """weight (out, in) with the adapter's update of projection `target` added: W + s U D."""
    if lora is None or target not in lora.down:
        return weight
    return weight + lora.scale * (lora.up[target] @ lora.down[target])


class _Linear(nn.Module):
    """An fp32 projection with no bias (a merged reader's attention at fp32)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().contiguous())

    def forward(self, x):
        return F.linear(x, self.weight)


class FusedAttention(Attention):
    """The decoder's Attention with q, k and v from one projection (`Attention.forward` calls
    `qkv`; everything else is inherited)."""

    def __init__(self, attn, qkv_proj, o_proj):
        nn.Module.__init__(self)  # not Attention's: its fp32 projections are not wanted
        self.n_head, self.n_kv, self.hs = attn.n_head, attn.n_kv, attn.hs
        self.qkv_proj, self.o_proj = qkv_proj, o_proj

    def qkv(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split((self.n_head * self.hs, self.n_kv * self.hs, self.n_kv * self.hs), dim=-1)
        q = q.reshape(B, T, self.n_head, self.hs).transpose(1, 2)
        k = k.reshape(B, T, self.n_kv, self.hs).transpose(1, 2)
        v = v.reshape(B, T, self.n_kv, self.hs).transpose(1, 2)
        return q, k, v


class FusedMLP(MLP):
    """SwiGLU with gate and up from one projection."""

    def __init__(self, gate_up_proj, down_proj, hidden: int):
        nn.Module.__init__(self)
        self.gate_up_proj, self.down_proj, self.hidden = gate_up_proj, down_proj, hidden

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.hidden, dim=-1)
        return self.down_proj(F.silu(gate) * up)
