"""The memory model: decoder + tokenizer + memory settings, with the verbs the engine calls.

Owns the `MemoryModel` entry object: `memory_spec_fields()` (what the engine's memory spec
records; `model_spec_fields` is that record's one home, for the bindings' models too),
`encode(texts)` (write memories), `generate(prompt, retriever=...)` and `stream(...)` (read
them). The engine reaches the model only through these verbs and the `Retriever`
callback, so it never imports torch. Must not import the engine (`m3db`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

from . import encoder as _encoder
from . import quantize as _quantize
from .adapter import BUNDLED_FILES, AdapterError, ReaderAdapter, read_header
from .decoder import Decoder, DecoderConfig, load_state
from .generate import ReadingVerbs
from .settings import MemorySettings
from .tokenizer import Tokenizer, tiny_tokenizer_data


class MemoryModel(ReadingVerbs):
    """A decoder that writes and reads explicit memories.

    Build with `MemoryModel.load()` (bundled SmolLM2-135M-Instruct) or `MemoryModel.tiny()`
    (random weights, same architecture, for tests).
    """

    def __init__(
        self,
        decoder: Decoder,
        tokenizer: Tokenizer,
        *,
        fingerprint: str,
        settings: MemorySettings | None = None,
        adapter: ReaderAdapter | None = None,
        precision: str = "fp32",
        readers: dict | None = None,
    ):
        # inference only: with no parameter requiring grad, no autograd graph is ever built,
        # whatever the caller's grad mode
        self.decoder = decoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.settings = (settings or MemorySettings()).resolve(decoder.cfg.n_layer)
        self.prefix_ids = tokenizer.encode(self.settings.reference_prefix)
        # The prefix's keys/values are the same in every reference (causal attention), so the
        # sink is computed once here and placed in front of every chunk's memories.
        self.sink_keys, self.sink_values = _encoder.prefix_states(
            decoder, self.prefix_ids, self.settings.memory_layers
        )  # (L, H, p, D)
        self.default_stop_tokens = tuple(
            sorted({i for i in (tokenizer.eos_id, tokenizer.find("<|endoftext|>")) if i is not None})
        )
        if adapter is not None and adapter.base_fingerprint != fingerprint:
            raise AdapterError("the reader adapter was trained on another model; train one for this model (m3db train)")
        # the reader adapter changes reading only, so it is not part of the memory spec
        self.adapter = adapter.eval().requires_grad_(False) if adapter is not None else None
        # reading may run on quantized weights (model.quantize); writing memories always runs on
        # `decoder` in fp32, so a database's memories do not depend on the precision reading them
        self.precision = _quantize.check_precision(precision)
        # readers of these weights by (precision, merged adapter), shared by every settings
        # variant: where model.quantize merges the adapter into a reader's attention weights,
        # the generation loop reads it with no adapter on top (`reader_adapter`)
        self._readers = readers if readers is not None else {}
        self.reader, self.reader_adapter = self._reader(precision)

    def _reader(self, precision: str):
        """(the decoder that reads at `precision`, the adapter to apply on top of it)."""
        merged = self.adapter if _quantize.MERGES_ADAPTER[precision] else None
        key = (precision, merged.fingerprint if merged is not None else None)
        if key not in self._readers:
            self._readers[key] = _quantize.quantize_decoder(self.decoder, precision, merged)
        return self._readers[key], (None if merged is not None else self.adapter)

    def at_precision(self, precision: str) -> "MemoryModel":
        """The same model (weights, settings, adapter) reading at `precision`; the quantized
        weights are made once per precision and adapter and shared by every settings variant."""
        _quantize.check_precision(precision)
        if precision == self.precision:
            return self
        twin = type(self).__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin.precision = precision
        twin.reader, twin.reader_adapter = self._reader(precision)
        return twin

    @classmethod
    def load(
        cls, path=None, *, settings: MemorySettings | None = None, adapter="default", precision: str = "fp32"
    ) -> "MemoryModel":
        """The bundled SmolLM2-135M-Instruct (or another Llama GGUF file at `path`).

        adapter: "default" reads the bundled reader adapter when one ships for these
        memory settings (see docs/adapter.md); None reads with the base weights only; or the
        path of an adapter file (`m3db train` writes one). precision: the weights that read
        (generate): "fp32", "int8" or "int4" (the GGUF's own 4-bit blocks), ~3x faster per
        step on CPU (model.quantize, docs/decoder.md); memories are encoded in fp32 at every
        precision."""
        from .gguf_loader import load_gguf

        g = load_gguf(path)
        decoder = load_state(Decoder(g.config), g.state_dict)
        resolved = (settings or MemorySettings()).resolve(g.config.n_layer)
        if adapter == "default":
            adapter = bundled_adapter(g.config, g.fingerprint, resolved)
        elif adapter is not None:
            adapter = ReaderAdapter.load(adapter, g.config, base_fingerprint=g.fingerprint)
        return cls(
            decoder,
            Tokenizer(g.tokenizer),
            fingerprint=g.fingerprint,
            settings=settings,
            adapter=adapter,
            precision=precision,
        )

    def with_settings(self, settings: MemorySettings, *, adapter="default") -> "MemoryModel":
        """The same weights with other memory settings (nothing is copied); adapter as in `load`."""
        resolved = settings.resolve(self.decoder.cfg.n_layer)
        if adapter == "default":
            adapter = bundled_adapter(self.decoder.cfg, self.fingerprint, resolved)
        elif adapter is not None and not isinstance(adapter, ReaderAdapter):
            adapter = ReaderAdapter.load(adapter, self.decoder.cfg, base_fingerprint=self.fingerprint)
        return type(self)(
            self.decoder,
            self.tokenizer,
            fingerprint=self.fingerprint,
            settings=resolved,
            adapter=adapter,
            precision=self.precision,
            readers=self._readers,
        )

    @classmethod
    def tiny(
        cls,
        *,
        settings: MemorySettings | None = None,
        seed: int = 0,
        std: float = 0.02,
        config: DecoderConfig | None = None,
        precision: str = "fp32",
    ) -> "MemoryModel":
        """Random weights of the same architecture and a byte-level tokenizer: fast tests."""
        tok = Tokenizer(tiny_tokenizer_data())
        cfg = config or DecoderConfig.tiny(vocab_size=tok.vocab_size)
        decoder = Decoder.random(cfg, seed=seed, std=std)
        h = hashlib.sha256(repr(cfg.to_dict()).encode())
        for name, t in decoder.state_dict().items():
            h.update(name.encode())
            h.update(t.numpy().tobytes())
        return cls(decoder, tok, fingerprint="sha256:" + h.hexdigest(), settings=settings, precision=precision)

    # -- the memory spec ---------------------------------------------------------------------

    def memory_spec_fields(self) -> dict:
        """The model's part of the engine's memory spec (plain JSON values)."""
        return model_spec_fields(self.fingerprint, self.decoder.cfg, self.settings)

    # -- writing -----------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def encode(self, texts: Sequence[str], *, batch_size: int = 16) -> list[dict]:
        """Encode references (each <= reference_length tokens) into sparse memories:
        dicts of positions uint8 (L, H, n), keys float32 (L, H, n, D) before RoPE, values,
        token_count."""
        ids = self.tokenizer.encode_batch(texts)
        words = None
        if self.settings.token_selection.endswith("words"):
            words = [_encoder.word_spans([self.tokenizer.decode([t]) for t in row]) for row in ids]
        return _encoder.encode(self.decoder, ids, self.prefix_ids, self.settings, batch_size=batch_size, words=words)

    # -- reading -----------------------------------------------------------------------------

    # generate_many, generate, stream and prompt_ids: ReadingVerbs (m3db.model.generate)


def model_spec_fields(fingerprint: str, cfg, settings: MemorySettings) -> dict:
    """A model's part of the engine's memory spec (plain JSON values), from its fingerprint, its
    decoder's config (n_kv_head, head_dim, rope_base, rope_scaling: a `DecoderConfig` or a
    binding's shape of the same names) and its resolved memory settings. The one home of these
    fields for every model (`MemoryModel` and the transformers binding's `HFMemoryModel`), so
    two models that compute the same write the same spec. rope_base is a float whatever type the
    config holds, as `MemorySpec.rope_base` declares it: the spec is stored as JSON text, where an
    int base would be written 10000, not 10000.0."""
    s = settings
    return {
        "model_fingerprint": fingerprint,
        "memory_layers": [int(i) for i in s.memory_layers],
        "kv_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "tokens_per_head": s.tokens_per_head,
        "rope_base": float(cfg.rope_base),
        "rope_scaling": cfg.rope_scaling,
        "reference_length": s.reference_length,
        "reference_prefix": s.reference_prefix,
        "position_policy": s.position_policy,
    }


def trained_for(settings: MemorySettings) -> dict:
    """The memory settings an adapter is trained for (and must be read with)."""
    return {
        "memory_layers": [int(i) for i in settings.memory_layers],
        "tokens_per_head": settings.tokens_per_head,
        "reference_prefix": settings.reference_prefix,
        "position_policy": settings.position_policy,
    }


def bundled_adapter(cfg, fingerprint: str, settings: MemorySettings) -> ReaderAdapter | None:
    """The shipped reader adapter trained on this model for these memory layers, prefix and
    positions with at most these tokens per head (the dense default's or the sparse mode's),
    else None: other settings read with the base weights. More tokens per head than an adapter
    was trained with read better through it, never worse, in every point measured (held out,
    docs/quality.md: dense adapter at 64 and every token, sparse adapter at 16 and 32); fewer
    were not measured better than the base weights, so they get none."""
    want = trained_for(settings)
    for path in BUNDLED_FILES.values():
        if not os.path.exists(path):
            continue
        header = read_header(path)
        got = dict(header.get("settings") or {})
        if header.get("base_fingerprint") != fingerprint or "tokens_per_head" not in got:
            continue
        same_layers_prefix_positions = {**got, "tokens_per_head": want["tokens_per_head"]} == want
        if same_layers_prefix_positions and got["tokens_per_head"] <= want["tokens_per_head"]:
            return ReaderAdapter.load(path, cfg, base_fingerprint=fingerprint)
    return None
