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
Qwen3 normalizes before RoPE), held only while encoding.

A reader adapter (`m3db.model.adapter.ReaderAdapter`, the sparse mode's) adds its low-rank
updates to every layer's q/k/v/o projections through forward hooks on those modules, held only
for the duration of one m3db call and acting only in the calling thread. Without the cache,
`memory` carries rotated memories for every memory layer (the training loop's path), and a
trainable adapter gets gradients through the frozen model. Must not import the engine (`m3db`).
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
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
    n_embd: int  # hidden size (a reader adapter's projections read and write it)
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
        n_embd=int(config.hidden_size),
        rope_base=float(base),
        rope_scaling=scaling,
        max_seq_len=context,
    )


@dataclass
class ReadState:
    """What m3db hands its attention function through transformers' kwargs for one forward.

    cache: the `KVCache` (None when encoding or reading `memory`); memory: {layer: (k, v)}
    rotated memories (B, kv, M, hs) read without a cache (training); plain_mask / memory_mask:
    bool (B, 1, T, S) and (B, 1, T, M + S), True = may attend; plain_mask None means plain
    causal attention (sdpa's faster is_causal path); stop_at: the layer after whose q/k/v
    projections an encoding forward stops (its states are captured by then)."""

    cache: object | None
    plain_mask: torch.Tensor | None
    memory_mask: torch.Tensor | None = None
    stop_at: int | None = None
    memory: dict | None = None


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
    elif state.memory is not None and i in state.memory:
        mk, mv = state.memory[i]  # (B, kv, M, hs), rotated to their read positions
        key = torch.cat((mk.to(key.dtype), key), dim=2)  # (B, kv, M + T, hs)
        value = torch.cat((mv.to(value.dtype), value), dim=2)
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

    forward(idx, positions=, valid=, cache=, memory=, last_only=, adapter=) and layer_states(idx,
    layers, valid) have the meaning of `m3db.model.decoder.Decoder`'s. Inputs go to the model's
    device; logits come back as float32 on the inputs' device (the CPU when generating: sampling
    runs there).
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

    def __call__(self, idx, *, positions=None, valid=None, cache=None, memory=None, last_only=False, adapter=None):
        """Logits (B, T, vocab), or (B, 1, vocab) with last_only; float32, on idx's device
        (the generation loop's inputs are on the CPU, the training loop's on the model's).

        idx (B, T); positions (B, T) RoPE positions (default 0..T-1 after the cache); valid
        (B, T) bool. With a cache, memories come from its memory slots; without one, `memory`
        is {layer: (k, v)} rotated (B, kv, M, hs) plus "valid" (B, M), as for the bundled
        decoder. adapter: a `ReaderAdapter` applied to every layer's attention projections for
        this call; gradients are built only when it has trainable parameters (training), and
        reach only it (the model's weights are frozen)."""
        if cache is not None and memory is not None:
            raise ValueError("memories come from the cache or from `memory`, not both")
        learn = torch.is_grad_enabled() and adapter is not None and any(p.requires_grad for p in adapter.parameters())
        with torch.set_grad_enabled(learn), self.adapted(adapter):
            return self._forward(idx, positions, valid, cache, memory, last_only)

    def _forward(self, idx, positions, valid, cache, memory, last_only):
        B, T = idx.shape
        past = cache.get_seq_length() if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + T).expand(B, T)
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=idx.device)
        if cache is not None:
            cache.append_valid(valid)
            k_valid = cache.ctx_valid[:, : past + T]
        else:
            k_valid = valid
        plain = attention_mask(valid, k_valid, past)  # (B, 1, T, S)
        mem, layers = None, None
        if cache is not None and cache.memory_layers:
            mem = attention_mask(valid, k_valid, past, cache.mem_valid)  # (B, 1, T, M + S)
        elif memory is not None:
            mem = attention_mask(valid, k_valid, past, memory["valid"].to(valid.device))  # (B, 1, T, M + T)
            layers = {i: (kv[0].to(self.device), kv[1].to(self.device)) for i, kv in memory.items() if i != "valid"}
        state = ReadState(
            cache=cache,
            plain_mask=plain.to(self.device),
            memory_mask=None if mem is None else mem.to(self.device),
            memory=layers,
        )
        x = self._run(idx, positions, state)
        if last_only:
            x = x[:, -1:]
        return self.hf.lm_head(self.base.norm(x)).float().to(idx.device)

    @contextmanager
    def adapted(self, adapter):
        """While the block runs, add `adapter`'s low-rank updates (`LayerAdapter.delta`) to every
        layer's q/k/v/o projection outputs (q, k, v before their norms and RoPE, as the bundled
        decoder adds them), in the calling thread only: forward hooks on the projection modules,
        removed on exit, so other calls of the model (other threads included) are untouched."""
        if adapter is None:
            yield
            return
        me = threading.get_ident()
        dtype = next(adapter.parameters()).dtype

        def update(lora, target):
            def hook(module, args, output):
                if threading.get_ident() != me:
                    return None
                d = lora.delta(target, args[0].to(dtype))  # (B, T, out)
                return output + d.to(output.dtype)

            return hook

        hooks = []
        try:
            for i, layer in enumerate(self._layers()):
                lora = adapter.layer(i)
                for target in adapter.targets:
                    module = getattr(layer.self_attn, f"{target}_proj")
                    hooks.append(module.register_forward_hook(update(lora, target)))
            yield
        finally:
            for h in hooks:
                h.remove()

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
        me = threading.get_ident()

        def keep(layer, slot, head_dim):
            def hook(module, args, output):
                if threading.get_ident() != me:  # another thread's call of the shared model
                    return
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
