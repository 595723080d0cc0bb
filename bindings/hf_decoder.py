"""A transformers causal LM seen as the bundled decoder's shape: forward with memory, layer states.

Owns `HFDecoder`, which runs a Hugging Face Llama-family model (Llama, Mistral, Qwen2, Qwen3)
with its own modules (embeddings, rotary embedding, decoder layers, norm, head) and reads
explicit memories through transformers' attention extension point: an attention function
registered in `AttentionInterface` under the name "m3db" (and the sdpa mask under the same
name in `AttentionMaskInterface`), selected for this model instance only with
`set_attn_implementation`. Nothing of transformers is patched: a call that does not come from
m3db finds no m3db state in its kwargs and runs transformers' own sdpa attention.

At memory layers the attention function appends the new keys/values to m3db's `KVCache`
(`m3db.model.cache`, memory slots in front of the context, the layout of transformers'
`cache_utils`) and attends over [memories | context] with the loop's mask. Memory keys are
rotated by the model's *own* rotary embedding module (`rotate_keys`), so RoPE scaling variants
(Llama 3, YaRN) are right by construction. Pre-RoPE queries/keys/values for encoding are
captured with forward hooks on the projections (on q_norm/k_norm where the family has them:
Qwen3 normalizes before RoPE), held only while encoding. Must not import the engine (`m3db`).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from m3db.model.decoder import attention_mask

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ATTENTION_NAME = "m3db"
_REGISTER_LOCK = threading.Lock()


class UnsupportedModel(ValueError):
    """A transformers model of an architecture m3db does not read memories for."""


@dataclass(frozen=True)
class HFShape:
    """What the generation loop and the encoder read of a model's shape (the fields of
    `m3db.model.DecoderConfig` they use). head_dim is the config's own (Qwen3 sets it apart
    from hidden/heads); max_seq_len is the context, capped at the sliding window where one
    is in use (m3db's masks are full causal, which equals a sliding window inside it)."""

    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    rope_base: float
    rope_scaling: dict | None
    max_seq_len: int


def family_of(config) -> str:
    """The config's model_type if m3db supports it, else UnsupportedModel naming the supported ones."""
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_FAMILIES:
        archs = getattr(config, "architectures", None) or [kind]
        raise UnsupportedModel(
            f"m3db cannot read memories for a {kind!r} model ({', '.join(map(str, archs))}); supported "
            f"families: {', '.join(SUPPORTED_FAMILIES)} (Llama and SmolLM2, Mistral, Qwen2 and Qwen2.5, Qwen3). "
            "Use a model of one of these families"
        )
    return kind


def shape_of(config) -> HFShape:
    """The model's shape, its RoPE base and scaling, and its usable context."""
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = dict(getattr(config, "rope_parameters", None) or {})
    base = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = rope.get("rope_type", "default")
    scaling = None if kind == "default" else {k: v for k, v in sorted(rope.items()) if k != "rope_theta"}
    context = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    in_use = window is not None and (
        (types is not None and "sliding_attention" in types)
        or (types is None and getattr(config, "use_sliding_window", True))
    )
    if in_use:
        context = min(context, int(window))
    return HFShape(
        vocab_size=int(config.vocab_size),
        n_layer=int(config.num_hidden_layers),
        n_head=int(n_head),
        n_kv_head=int(config.num_key_value_heads),
        head_dim=int(head_dim),
        rope_base=float(base),
        rope_scaling=scaling,
        max_seq_len=context,
    )


@dataclass
class ReadState:
    """What m3db hands its attention function through transformers' kwargs for one forward.

    cache: the `KVCache` (None when encoding); plain_mask / memory_mask: bool
    (B, 1, T, S) and (B, 1, T, M + S), True = may attend; plain_mask None means plain causal
    attention (sdpa's faster is_causal path); stop_at: the layer after whose q/k/v projections
    an encoding forward stops (its states are captured by then)."""

    cache: object | None
    plain_mask: torch.Tensor | None
    memory_mask: torch.Tensor | None = None
    stop_at: int | None = None


class StopEncoding(Exception):
    """Raised by the attention function at the encoder's last layer: everything is captured."""


def memory_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The "m3db" attention function: query (B, nh, T, hs), key/value (B, kv, T, hs) after RoPE.

    Without m3db's state (any call that does not come from m3db) it is transformers' sdpa."""
    state = kwargs.get("m3db_read")
    if state is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    i = module.layer_idx
    if state.stop_at == i:
        raise StopEncoding
    mask = state.plain_mask
    if state.cache is not None:
        key, value = state.cache[i].update(key, value)  # (B, kv, M + S, hs): memory slots, then context
        if i in state.cache.memory_layers and state.memory_mask is not None:
            mask = state.memory_mask
    causal = mask is None and query.shape[2] > 1
    y = F.scaled_dot_product_attention(
        query,
        key.to(query.dtype),
        value.to(query.dtype),
        attn_mask=mask,
        is_causal=causal,
        scale=scaling,
        enable_gqa=True,
    )  # (B, nh, T, hs)
    return y.transpose(1, 2).contiguous(), None  # (B, T, nh, hs), as transformers' functions return


def register_attention() -> None:
    """Register the "m3db" attention and mask functions with transformers (once per process).
    Adding a named function is transformers' documented extension point; no existing entry
    changes."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    with _REGISTER_LOCK:
        AttentionInterface.register(ATTENTION_NAME, memory_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


class HFDecoder:
    """A transformers causal LM driven as m3db's decoder (see the module docstring).

    forward(idx, positions=, valid=, cache=, last_only=, adapter=) and layer_states(idx, layers,
    valid) have the meaning of `m3db.model.decoder.Decoder`'s. Inputs arrive on the CPU and go
    to the model's device; logits come back as float32 on the CPU (sampling runs there).
    """

    def __init__(self, hf_model):
        self.family = family_of(hf_model.config)
        self.hf = hf_model.eval().requires_grad_(False)
        self.base = hf_model.model  # the bare decoder: embed_tokens, rotary_emb, layers, norm
        self.cfg = shape_of(hf_model.config)
        self.device = next(hf_model.parameters()).device
        self.dtype = next(hf_model.parameters()).dtype
        register_attention()
        hf_model.set_attn_implementation(ATTENTION_NAME)
        if hf_model.config._attn_implementation != ATTENTION_NAME:
            raise UnsupportedModel(
                f"this {type(hf_model).__name__} does not let its attention implementation be set "
                "(transformers' AttentionInterface); m3db cannot read memories through it"
            )
        # the family's own rotate-half, beside its rotary embedding in its modeling module
        self.rotate_half = sys.modules[type(self.base).__module__].rotate_half
        self.encode_lock = threading.Lock()

    def _layers(self):
        return self.base.layers[: self.cfg.n_layer]

    def _run(self, idx, positions, state) -> torch.Tensor:
        """Hidden states (B, T, C) after the layers (raises StopEncoding when state.stop_at)."""
        x = self.base.embed_tokens(idx.to(self.device))  # (B, T, C)
        pos = positions.to(self.device)
        pe = self.base.rotary_emb(x, position_ids=pos)  # cos, sin (B, T, hs): the model's own RoPE
        for layer in self._layers():
            x = layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe, m3db_read=state)
        return x

    @torch.no_grad()
    def __call__(self, idx, *, positions=None, valid=None, cache=None, memory=None, last_only=False, adapter=None):
        """Logits (B, T, vocab), or (B, 1, vocab) with last_only; float32, CPU.

        idx (B, T); positions (B, T) RoPE positions (default 0..T-1 after the cache); valid
        (B, T) bool. With a cache, memories come from its memory slots. A reader adapter is
        not available for transformers models yet (sparse mode is absent)."""
        if adapter is not None or memory is not None:
            raise ValueError("a transformers model reads memories through the cache only, without an adapter")
        B, T = idx.shape
        past = cache.get_seq_length() if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + T).expand(B, T)
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool)
        if cache is not None:
            cache.append_valid(valid)
            k_valid = cache.ctx_valid[:, : past + T]
        else:
            k_valid = valid
        plain = attention_mask(valid, k_valid, past)  # (B, 1, T, S)
        mem = None
        if cache is not None and cache.memory_layers:
            mem = attention_mask(valid, k_valid, past, cache.mem_valid).to(self.device)  # (B, 1, T, M + S)
        state = ReadState(cache=cache, plain_mask=plain.to(self.device), memory_mask=mem)
        x = self._run(idx, positions, state)
        if last_only:
            x = x[:, -1:]
        return self.hf.lm_head(self.base.norm(x)).float().cpu()

    def _sources(self, layer: int):
        """The modules whose outputs are the pre-RoPE q, k, v of a layer (Qwen3: after q/k norms)."""
        attn = self._layers()[layer].self_attn
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        q = attn.q_proj if q_norm is None else q_norm
        k = attn.k_proj if k_norm is None else k_norm
        return (q, k, attn.v_proj), attn.head_dim

    @torch.no_grad()
    def layer_states(self, idx, layers, valid=None):
        """Pre-RoPE q (B, nh, T, hs), k, v (B, kv, T, hs) at each layer in `layers`, float32, CPU.

        Runs layers before the last requested one in full and stops the last one right after
        its q/k/v projections. Positions 0..T-1, causal, right padding allowed."""
        B, T = idx.shape
        layers = sorted(set(int(i) for i in layers))
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool)
        got: dict[int, list] = {i: [None, None, None] for i in layers}
        hooks = []

        def keep(layer, slot, head_dim):
            def hook(module, args, output):
                got[layer][slot] = output.reshape(B, T, -1, head_dim).transpose(1, 2)  # (B, heads, T, hs)

            return hook

        # Padding is on the right, so under a causal mask no real token attends to it; what
        # padding tokens compute is never read (the encoder scores real tokens only). Plain
        # causal attention is therefore exact here, and sdpa's causal path is the fastest.
        state = ReadState(cache=None, plain_mask=None, stop_at=layers[-1])
        with self.encode_lock:  # hooks live on shared modules: one encoding at a time
            try:
                for i in layers:
                    sources, hs = self._sources(i)
                    hooks += [m.register_forward_hook(keep(i, s, hs)) for s, m in enumerate(sources)]
                try:
                    self._run(idx, torch.arange(T).expand(B, T), state)
                except StopEncoding:
                    pass
            finally:
                for h in hooks:
                    h.remove()
        return {i: tuple(t.float().cpu() for t in got[i]) for i in layers}

    @torch.no_grad()
    def rotate_keys(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """keys (..., hs) pre-RoPE, positions (...) ints -> keys rotated to those positions by
        the model's own rotary embedding, on the model's device, float32."""
        lead, hs = positions.shape, keys.shape[-1]
        k = keys.to(self.device, torch.float32).reshape(1, -1, hs)  # (1, N, hs)
        cos, sin = self.base.rotary_emb(k, position_ids=positions.reshape(1, -1).to(self.device))  # (1, N, hs)
        rotated = k * cos + self.rotate_half(k) * sin
        return rotated.reshape(*lead, hs)
