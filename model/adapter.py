"""The reader adapter: low-rank updates of the decoder's attention, trained to read memories.

Owns the second stage of Memory³ for a decoder that was never trained with memory: the base
weights stay frozen and so does the memory encoder (`Decoder.layer_states` takes no adapter),
so every knowledge base already encoded stays valid when the adapter improves; only the
reading side learns. Per layer and per attention projection (q, k, v, o) a low-rank update
W x + (alpha / rank) * U D x, with U zero at the start, so an untrained adapter changes
nothing.

A file is safetensors (tensors only, never pickle) whose metadata holds a JSON header: the
format, the base model's fingerprint, the decoder shape, rank, alpha, targets, and the memory
settings it was trained for. `fingerprint` hashes that header and every tensor.
Must not import the engine (`m3db`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import torch
import torch.nn as nn

from .decoder import DecoderConfig

FORMAT = "m3db-reader-adapter"
VERSION = 1
TARGETS = ("q", "k", "v", "o")
# the shipped reader adapters of the bundled SmolLM2, one per memory mode (docs/adapter.md); each
# is read with the layers it was trained for and at least its tokens per head (its header says
# which; memory_model.bundled_adapter)
BUNDLED_FILES = {
    mode: os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "adapters", f"reader-smollm2-135m-{mode}.safetensors"
    )
    for mode in ("dense", "sparse")
}
BUNDLED_FILE = BUNDLED_FILES["sparse"]


class AdapterError(ValueError):
    """An adapter file that is damaged, or made for another model."""


def read_header(path) -> dict:
    """The JSON header of an adapter file, without reading its tensors: an object whose
    `settings`, when present, is an object whose memory settings have their types (what the CLI
    reads with, `SETTING_TYPES`); anything else is an AdapterError."""
    from safetensors import SafetensorError, safe_open

    where = f"{os.fspath(path)!r} is not a readable m3db reader adapter"
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
        header = json.loads(meta["m3db_adapter"])
    except (SafetensorError, OSError, KeyError, ValueError, RecursionError) as e:
        raise AdapterError(f"{where} ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(header, dict):
        raise AdapterError(f"{where} (its header is a JSON {type(header).__name__}, not an object)")
    settings = header.get("settings")
    if settings is not None and not isinstance(settings, dict):
        raise AdapterError(f"{where} (its settings are a JSON {type(settings).__name__}, not an object)")
    for key, check in SETTING_TYPES.items():
        if settings and key in settings and not check(settings[key]):
            raise AdapterError(f"{where} (its settings' {key} is {str(settings[key])[:80]})")
    return header


def _count(value, low) -> bool:
    return type(value) is int and value >= low


# what each memory setting in an adapter's header must be (read_header)
SETTING_TYPES = {
    "memory_layers": lambda v: v is None or (isinstance(v, list) and all(_count(i, 0) for i in v)),
    "tokens_per_head": lambda v: _count(v, 1),
    "reference_prefix": lambda v: isinstance(v, str),
    "position_policy": lambda v: isinstance(v, str),
}


def _dims(cfg: DecoderConfig) -> dict:
    """(in, out) features of each target projection."""
    hs = cfg.head_dim
    return {
        "q": (cfg.n_embd, cfg.n_head * hs),
        "k": (cfg.n_embd, cfg.n_kv_head * hs),
        "v": (cfg.n_embd, cfg.n_kv_head * hs),
        "o": (cfg.n_head * hs, cfg.n_embd),
    }


class LayerAdapter(nn.Module):
    """The low-rank updates of one layer's attention projections."""

    def __init__(self, cfg: DecoderConfig, rank: int, alpha: float, targets: tuple[str, ...], generator=None):
        super().__init__()
        self.scale = alpha / rank
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        for t in targets:
            n_in, n_out = _dims(cfg)[t]
            # the usual LoRA start: a random down-projection and a zero up-projection
            self.down[t] = nn.Parameter(torch.randn(rank, n_in, generator=generator) / math.sqrt(n_in))
            self.up[t] = nn.Parameter(torch.zeros(n_out, rank))

    def delta(self, target: str, x: torch.Tensor) -> torch.Tensor | None:
        """The update to projection `target` for input x (..., in), or None if not adapted."""
        if target not in self.down:
            return None
        return (x @ self.down[target].T) @ self.up[target].T * self.scale


class ReaderAdapter(nn.Module):
    """Low-rank updates of every layer's attention; see the module docstring."""

    def __init__(
        self,
        cfg: DecoderConfig,
        *,
        base_fingerprint: str,
        rank: int = 8,
        alpha: float = 16.0,
        targets: tuple[str, ...] = TARGETS,
        settings: dict | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise AdapterError(f"rank must be a positive integer, got {rank!r}")
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown or not targets:
            raise AdapterError(f"targets must be a non-empty subset of {TARGETS}, got {targets!r}")
        self.cfg, self.rank, self.alpha = cfg, rank, float(alpha)
        self.targets = tuple(t for t in TARGETS if t in targets)
        self.base_fingerprint = base_fingerprint
        self.settings = dict(settings or {})
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList(LayerAdapter(cfg, rank, self.alpha, self.targets, g) for _ in range(cfg.n_layer))

    def layer(self, i: int) -> LayerAdapter:
        return self.layers[i]

    def header(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "base_fingerprint": self.base_fingerprint,
            "decoder": {k: getattr(self.cfg, k) for k in ("n_layer", "n_head", "n_kv_head", "n_embd")},
            "rank": self.rank,
            "alpha": self.alpha,
            "targets": list(self.targets),
            "settings": self.settings,
        }

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self.header(), sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().contiguous().numpy().tobytes())
        return "sha256:" + h.hexdigest()

    def save(self, path, *, extra: dict | None = None) -> None:
        """Write the adapter (temp file, then rename: a crash never leaves half a file)."""
        from safetensors.torch import save_file

        meta = {"m3db_adapter": json.dumps(self.header(), sort_keys=True)}
        if extra:
            meta["m3db_training"] = json.dumps(extra, sort_keys=True)
        tmp = f"{path}.tmp"
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, tmp, metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, cfg: DecoderConfig, *, base_fingerprint: str) -> "ReaderAdapter":
        """Read an adapter file, refusing one made for another model or damaged."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterError(f"cannot read the adapter file {os.fspath(path)!r}: {e}") from e
        try:
            head = json.loads(meta["m3db_adapter"])
            if head.get("format") != FORMAT or head.get("version") != VERSION:
                raise AdapterError(
                    f"{path}: not an m3db reader adapter of version {VERSION} "
                    f"({head.get('format')!r} v{head.get('version')!r})"
                )
            if head["base_fingerprint"] != base_fingerprint:
                raise AdapterError(
                    f"{path}: this adapter was trained on the model {head['base_fingerprint'][:23]}..., "
                    "not on the loaded "
                    f"{base_fingerprint[:23]}...: train one for this model (m3db train)"
                )
            adapter = cls(
                cfg,
                base_fingerprint=base_fingerprint,
                rank=int(head["rank"]),
                alpha=float(head["alpha"]),
                targets=tuple(head["targets"]),
                settings=head.get("settings"),
            )
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise AdapterError(f"{path}: the adapter header is missing or malformed ({e})") from e
        want = adapter.state_dict()
        if set(tensors) != set(want) or any(tensors[k].shape != want[k].shape for k in want):
            raise AdapterError(
                f"{path}: the adapter's tensors do not fit this decoder "
                f"(rank {adapter.rank}, targets {adapter.targets})"
            )
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise AdapterError(f"{path}: the adapter holds NaN or infinite values")
        adapter.load_state_dict({k: v.float() for k, v in tensors.items()})
        adapter.training_info = json.loads(meta["m3db_training"]) if "m3db_training" in meta else {}
        return adapter.eval().requires_grad_(False)
