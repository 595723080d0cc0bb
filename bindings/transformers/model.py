"""`HFMemoryModel`: explicit memories for a Hugging Face transformers causal LM.

Owns `HFMemoryModel`, the model interface that `m3db.connect(path, model=...)` uses
(`memory_spec_fields`, `count_tokens`, `encode`, `generate` with none / rag / memory, the
fingerprint) implemented over a Llama-family transformers causal LM (Llama and SmolLM2,
Mistral, Qwen2, Qwen3), and what it refuses before loading (device, memory mode, adapter
choice, a tokenizer of another model). Writing and reading memories run the bundled decoder's
own code paths (`m3db.model.encoder`, `m3db.model.memory`, `m3db.model.generate`) over the
model's own modules (`decoder.HFDecoder`), and the memory spec's fields are the bundled model's
own (`m3db.model.memory_model.model_spec_fields`), so the two implementations cannot drift
apart. The sparse mode reads through a reader adapter trained for the model by the bundled
training loop (`m3db.model.train.train` over `HFMemoryModel.for_training()`;
`m3db train OUT --model PATH`). docs/bindings.md.

    from m3db.bindings.transformers import HFMemoryModel
    model = HFMemoryModel.from_pretrained("path/to/Qwen2.5-0.5B-Instruct", device="cpu")
    db = m3db.connect("kb.m3db", model=model)
    sparse = HFMemoryModel.from_pretrained(path, memory_mode="sparse", adapter="run/adapter.safetensors")

Imports: torch, transformers (when loading), `m3db.model`, and this package's decoder.py and
tokenizer.py; never the engine (`m3db`), which never imports this module either.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from m3db.model import encoder as memory_encoder
from m3db.model.adapter import AdapterError, ReaderAdapter
from m3db.model.generate import ReadingVerbs
from m3db.model.memory_model import model_spec_fields, trained_for
from m3db.model.settings import MEMORY_MODES, MemorySettings

from .decoder import SUPPORTED_FAMILIES, HFDecoder, UnsupportedModel, family_of
from .tokenizer import HFTokenizer

__all__ = ["AdapterError", "AdapterRequired", "HFMemoryModel", "SUPPORTED_FAMILIES", "UnsupportedModel"]


# The config fields that shape the computation; the weights carry the rest. Loading paths
# (a checkpoint folder, a GGUF file) fill other fields differently, so only these are hashed.
FINGERPRINT_CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "max_position_embeddings",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
    "sliding_window",
    "use_sliding_window",
    "layer_types",
)


class AdapterRequired(ValueError):
    """The sparse mode reads memories through a reader adapter trained for this model, and none
    was given: train one with `m3db train OUT --model PATH` (docs/bindings.md), then pass
    adapter="OUT/adapter.safetensors" (on the command line: --adapter OUT/adapter.safetensors),
    or use memory_mode="dense"."""


def model_fingerprint(hf_model, tokenizer: HFTokenizer) -> str:
    """sha256 over the model's shape-defining config fields, its tokenizer and every weight
    (names, dtypes, shapes and bytes): two models share it only if they compute the same."""
    h = hashlib.sha256()
    cfg = hf_model.config.to_dict()
    h.update(json.dumps({k: cfg.get(k) for k in FINGERPRINT_CONFIG_KEYS}, sort_keys=True, default=str).encode())
    h.update(tokenizer.fingerprint_bytes())
    for name, t in sorted(hf_model.state_dict().items()):
        t = t.detach().reshape(-1).contiguous()
        h.update(f"{name}:{t.dtype}:{t.numel()}".encode())
        h.update(t.cpu().view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def check_device(device: str) -> str:
    """A device name: "cpu", "cuda" or "cuda:N". CUDA is asked about only when named, so a CPU-only machine
    never initializes it."""
    name = str(device)
    if name == "cpu":
        return name
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but torch sees no CUDA GPU here; use device='cpu'")
        return name
    raise ValueError(f"device={device!r}: expected 'cpu', 'cuda' or 'cuda:N'")


def check_mode(mode: str) -> str:
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory_mode={mode!r}: expected one of {', '.join(map(repr, MEMORY_MODES))}")
    return mode


def check_adapter_choice(mode: str, settings, adapter) -> None:
    """Refuse the sparse mode without an adapter, and an adapter for the dense mode, before
    anything loads."""
    check_mode(mode)
    if settings is not None:
        return  # explicit settings read with any adapter that fits (experiments, training)
    if mode == "sparse" and adapter is None:
        raise AdapterRequired(" ".join(AdapterRequired.__doc__.split()))
    if mode == "dense" and adapter is not None:
        raise ValueError(
            "a reader adapter reads the sparse mode: pass memory_mode='sparse' with adapter= "
            "(the dense mode reads with the base weights)"
        )


def check_vocabulary(hf_model, tokenizer: HFTokenizer) -> None:
    """Refuse a tokenizer with more tokens than the model has embedding rows (another model's,
    as a rule): its higher ids would fail only later, deep inside an embedding lookup."""
    embeddings = hf_model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and tokenizer.vocab_size > rows:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model embeds only {rows}: it belongs to "
            "another model; use the tokenizer saved with these weights (tokenizer.json in the checkpoint folder)"
        )


def settings_for(mode: str, n_layer: int, tokenizer: HFTokenizer) -> MemorySettings:
    """The memory settings of a memory mode for this model (dense: every layer, 32 tokens per
    head, as for the bundled model), with the model's own reference prefix."""
    check_mode(mode)
    return MemorySettings.named(mode, n_layer).with_(reference_prefix=tokenizer.reference_prefix())


class HFMemoryModel(ReadingVerbs):
    """A transformers causal LM that writes and reads explicit memories.

    Build with `HFMemoryModel.from_pretrained(path, ...)` or wrap loaded objects:
    `HFMemoryModel(hf_model, tokenizer, memory_mode="dense")`. Wrapping sets the model's
    attention implementation to m3db's ("m3db", registered with transformers'
    AttentionInterface), which is transformers' sdpa for every call that does not read memory.

    memory_mode: "dense" (every layer, 32 tokens per head, base weights) or "sparse" (8 tokens
    per head on the upper half of the layers, read through `adapter`, which it requires).
    adapter: a reader adapter file trained for this model (`m3db train OUT --model PATH` writes
    OUT/adapter.safetensors) or a `ReaderAdapter`; refused when it was trained on another model
    (fingerprint) or for other memory settings.
    settings: explicit `MemorySettings` instead of a memory mode (tests, experiments); they
    read with any adapter whose shapes fit.
    """

    def __init__(
        self,
        hf_model,
        tokenizer,
        *,
        memory_mode: str = "dense",
        settings: MemorySettings | None = None,
        adapter=None,
    ):
        family_of(hf_model.config)  # refuse an unsupported architecture before touching the model
        check_adapter_choice(memory_mode, settings, adapter)
        self.tokenizer = HFTokenizer(tokenizer)
        check_vocabulary(hf_model, self.tokenizer)
        self.decoder = HFDecoder(hf_model)
        self.hf_model = hf_model
        self.fingerprint = model_fingerprint(hf_model, self.tokenizer)
        eos = getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)
        self.default_stop_tokens = self.tokenizer.stop_ids(eos if isinstance(eos, (list, tuple)) else [eos])
        # where the generation loop keeps the KV cache, and how it rotates memory keys
        self.cache_dtype, self.cache_device = self.decoder.dtype, self.decoder.device
        self.rotate_keys = self.decoder.rotate_keys
        if settings is None:
            settings = settings_for(memory_mode, self.decoder.cfg.n_layer, self.tokenizer)
        self._use(settings, self._adapter(adapter, settings if memory_mode == "sparse" else None))

    def _use(self, settings: MemorySettings, adapter: ReaderAdapter | None) -> None:
        """Set the memory settings (and the sink they imply) and the reader adapter."""
        self.settings = settings.resolve(self.decoder.cfg.n_layer)
        self.prefix_ids = self.tokenizer.encode(self.settings.reference_prefix)
        if not self.prefix_ids:
            raise ValueError("the reference prefix is empty: give settings a reference_prefix of at least one token")
        # the sink: the prefix's keys/values are the same in every reference (causal attention)
        self.sink_keys, self.sink_values = memory_encoder.prefix_states(
            self.decoder, self.prefix_ids, self.settings.memory_layers
        )  # (L, H, p, D)
        self.adapter = adapter

    def _adapter(self, adapter, mode_settings: MemorySettings | None) -> ReaderAdapter | None:
        """The reader adapter on the model's device, checked against this model (and against the
        mode's settings, when a memory mode chose them)."""
        if adapter is None:
            return None
        if not isinstance(adapter, ReaderAdapter):
            adapter = ReaderAdapter.load(adapter, self.decoder.cfg, base_fingerprint=self.fingerprint)
        elif adapter.base_fingerprint != self.fingerprint:
            raise AdapterError(
                f"the reader adapter was trained on the model {adapter.base_fingerprint[:23]}..., not on this "
                f"{self.fingerprint[:23]}...: train one for this model (m3db train OUT --model PATH)"
            )
        if mode_settings is not None:
            want = trained_for(mode_settings.resolve(self.decoder.cfg.n_layer))
            if adapter.settings != want:
                raise AdapterError(
                    f"the reader adapter was trained for the memory settings {adapter.settings}, not for this "
                    f"model's sparse mode {want}: train one for the sparse mode (m3db train OUT --model PATH), "
                    "or pass those settings as settings= instead of memory_mode"
                )
        return adapter.to(self.decoder.device).eval().requires_grad_(False)

    def for_training(self, **changes) -> "HFMemoryModel":
        """The same model (weights and fingerprint shared, nothing copied) in its sparse mode's
        memory settings with no reader adapter: what `m3db.model.train.train` trains an adapter
        for. changes: `MemorySettings` fields to train for other settings (memory_layers,
        tokens_per_head, reference_length, ...); an adapter is read with the settings it was
        trained for."""
        twin = copy.copy(self)
        settings = settings_for("sparse", self.decoder.cfg.n_layer, self.tokenizer).with_(**changes)
        twin._use(settings, None)
        return twin

    @classmethod
    def from_pretrained(
        cls,
        path,
        *,
        memory_mode: str = "dense",
        device: str = "cpu",
        dtype=None,
        settings=None,
        adapter=None,
    ) -> "HFMemoryModel":
        """Load a local model: a checkpoint folder (config, weights, tokenizer) or a GGUF file
        (transformers' GGUF loading, dequantized). Never downloads.

        device: "cpu" (float32 by default: reduced-precision matmuls are slow on CPUs) or
        "cuda[:N]" (bfloat16 by default). dtype: a torch dtype to override that.
        memory_mode, settings, adapter: as for the constructor (sparse needs adapter=)."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        check_adapter_choice(memory_mode, settings, adapter)  # before any weight loads
        device = check_device(device)
        if dtype is None:
            dtype = torch.float32 if device == "cpu" else torch.bfloat16
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"no model at {str(path)!r}: give a local checkpoint folder or a .gguf file")
        if isinstance(adapter, (str, os.PathLike)) and not os.path.isfile(adapter):
            raise FileNotFoundError(
                f"no reader adapter at {os.fspath(adapter)!r}: `m3db train OUT --model PATH` writes one"
            )
        if p.is_file():
            if p.suffix != ".gguf":
                raise ValueError(f"{p.name}: a model file must be a .gguf; otherwise give the checkpoint's folder")
            where, extra = str(p.parent), {"gguf_file": p.name}
        else:
            where, extra = str(p), {}
        config = AutoConfig.from_pretrained(where, local_files_only=True, **extra)
        family_of(config)  # refuse before loading weights
        tok = AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
        hf = AutoModelForCausalLM.from_pretrained(where, local_files_only=True, dtype=dtype, **extra)
        hf = hf.to(device)
        return cls(hf, tok, memory_mode=memory_mode, settings=settings, adapter=adapter)

    # -- the memory spec ---------------------------------------------------------------------

    def memory_spec_fields(self) -> dict:
        """The model's part of the engine's memory spec (plain JSON values), as the bundled model's."""
        return model_spec_fields(self.fingerprint, self.decoder.cfg, self.settings)

    def bytes_per_memory(self, bytes_per_number: float = 2.0) -> int:
        """Bytes of one full memory's keys and values (every kept token), at bytes_per_number
        (2: fp16; 1: int8; 0.5: int4), before the record's text and positions."""
        cfg, s = self.decoder.cfg, self.settings
        n = len(s.memory_layers) * cfg.n_kv_head * min(s.tokens_per_head, s.reference_length) * 2 * cfg.head_dim
        return int(n * bytes_per_number)

    # -- writing -----------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def encode(self, texts: Sequence[str], *, batch_size: int = 16) -> list[dict]:
        """Encode references (each <= reference_length tokens) into memories: dicts of positions
        uint8 (L, H, n), keys float32 (L, H, n, D) before RoPE, values, token_count."""
        ids = self.tokenizer.encode_batch(texts)
        return memory_encoder.encode(self.decoder, ids, self.prefix_ids, self.settings, batch_size=batch_size)

    # -- reading -----------------------------------------------------------------------------

    # generate_many, generate, stream and prompt_ids: ReadingVerbs (m3db.model.generate)

    def __repr__(self) -> str:
        name = getattr(self.hf_model.config, "_name_or_path", "") or type(self.hf_model).__name__
        return (
            f"HFMemoryModel({os.path.basename(str(name))!r}, family={self.decoder.family!r}, "
            f"layers={len(self.settings.memory_layers)}, tokens_per_head={self.settings.tokens_per_head}, "
            f"adapter={self.adapter is not None})"
        )
