"""The memory spec: what every memory in one database is bound to.

A memory is only meaningful to the model that wrote it, read by the embedder that indexed it.
The spec is stored once per database (catalog table `meta`) and every add is checked
against it. Opening with a different spec is refused with a message naming both sides.
"""

import dataclasses
import json
import math
import operator
from collections.abc import Mapping
from numbers import Real
from typing import Self

import numpy as np

from ..errors import FormatError, InvalidInputError, SpecMismatchError
from .codec import codec_class

# positions are stored as uint8, so a reference can hold at most 256 tokens
MAX_REFERENCE_LENGTH = 256
# what a spec mismatch advises unless its caller knows better (MemorySpec.require_same)
REENCODE_ADVICE = (
    "Memories are bound to the model that wrote them: open with the matching model, or re-encode the "
    "knowledge base for this one (`m3db reencode`)"
)


@dataclasses.dataclass(frozen=True)
class MemorySpec:
    """The shape and identity of the memories a database holds.

    memory_layers: the decoder layers that read memories (the paper: the first half).
    kv_heads, head_dim: per memory layer, how many KV heads and their width.
    tokens_per_head: the most tokens a (layer, head) keeps (the paper: 8 of 128).
    reference_length: the most tokens in one reference (the paper: 128).
    codec: how keys and values are stored ('f32', 'f16', 'int8', 'int4').
    """

    model_fingerprint: str
    memory_layers: tuple
    kv_heads: int
    head_dim: int
    tokens_per_head: int
    embedding_dim: int
    embedder_fingerprint: str = ""
    rope_base: float = 10000.0
    rope_scaling: dict | None = None
    reference_length: int = 128
    reference_prefix: str = "Reference:"
    position_policy: str = "parallel"
    codec: str = "int8"

    def __post_init__(self):
        problems = []
        try:  # layer numbers: integers (a numpy integer too), never a bool, a float or a string's digits
            if isinstance(self.memory_layers, (str, bytes, Mapping)):
                raise TypeError
            items = list(self.memory_layers)
            layers = tuple(operator.index(x) for x in items if not isinstance(x, bool))
            if len(layers) != len(items):
                raise TypeError
        except TypeError:
            layers = None
        object.__setattr__(self, "memory_layers", layers if layers is not None else self.memory_layers)
        if layers is None or not layers or min(layers) < 0 or len(set(layers)) != len(layers):
            problems.append(
                f"memory_layers must be distinct non-negative layer numbers, got {str(self.memory_layers)[:80]}"
            )
        if not isinstance(self.model_fingerprint, str) or not self.model_fingerprint:
            problems.append("model_fingerprint must be a non-empty string")
        for name in ("embedder_fingerprint", "reference_prefix", "position_policy", "codec"):
            if not isinstance(getattr(self, name), str):
                problems.append(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        for name in ("kv_heads", "head_dim", "tokens_per_head", "embedding_dim", "reference_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {str(value)[:40]!r}")
        if isinstance(self.reference_length, int) and self.reference_length > MAX_REFERENCE_LENGTH:
            problems.append(
                f"reference_length must be <= {MAX_REFERENCE_LENGTH} (positions are uint8), got {self.reference_length}"
            )
        if (
            isinstance(self.tokens_per_head, int)
            and isinstance(self.reference_length, int)
            and self.tokens_per_head > self.reference_length
        ):
            problems.append(
                f"tokens_per_head ({self.tokens_per_head}) cannot exceed reference_length ({self.reference_length})"
            )
        rope_base = self.rope_base
        if not isinstance(rope_base, Real) or isinstance(rope_base, bool) or not math.isfinite(rope_base):
            problems.append(f"rope_base must be a finite number, got {str(self.rope_base)[:40]!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            problems.append(f"rope_scaling must be a dict or None, got {type(self.rope_scaling).__name__}")
        if problems:
            raise InvalidInputError("invalid memory spec: " + "; ".join(problems))
        codec_class(self.codec)  # raises on an unknown codec name

    # -- persistence ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["memory_layers"] = list(self.memory_layers)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d) -> Self:
        if not isinstance(d, Mapping):
            raise InvalidInputError(f"a memory spec is a mapping of its fields, got a {type(d).__name__}")
        fields = dataclasses.fields(cls)
        known = {f.name for f in fields}
        unknown = sorted(map(str, set(d) - known))
        if unknown:
            raise InvalidInputError(f"unknown memory spec fields {unknown}; known fields: {sorted(known)}")
        missing = [f.name for f in fields if f.name not in d and f.default is dataclasses.MISSING]
        if missing:
            raise InvalidInputError(f"the memory spec lacks the fields {missing}")
        return cls(**d)

    @classmethod
    def from_json(cls, text) -> Self:
        """The spec stored as JSON text (a catalog's meta, spec.json, a package's catalog): a
        FormatError when the text is not a JSON object, an InvalidInputError naming each bad field."""
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise FormatError(f"the stored memory spec is not JSON ({type(e).__name__}: {str(e)[:200]})") from None
        if not isinstance(d, dict):
            raise FormatError(f"the stored memory spec is a JSON {type(d).__name__}, not an object")
        return cls.from_dict(d)

    # -- comparison ----------------------------------------------------------------------

    def differences(self, other) -> list[tuple[str, object, object]]:
        """[(field, this value, other value)] for every field that differs. `other`: a MemorySpec,
        or a mapping of some of its fields (those alone are compared, in its order)."""
        mine = self.to_dict()
        theirs = other if isinstance(other, Mapping) else other.to_dict()
        return [(k, mine[k], v) for k, v in theirs.items() if mine[k] != v]

    def require_same(
        self,
        other,
        *,
        this="the database",
        that="the given spec",
        verb="has",
        what="memory spec mismatch",
        advice=REENCODE_ADVICE,
    ) -> None:
        """Raise SpecMismatchError if `other` (as `differences` takes it) differs, naming each field
        on both sides: "<what> (<field>: <this> has <a>, <that> <verb> <b>; ...). <advice>"."""
        diffs = self.differences(other)
        if diffs:
            lines = "; ".join(f"{k}: {this} has {a!r}, {that} {verb} {b!r}" for k, a, b in diffs)
            raise SpecMismatchError(f"{what} ({lines}). {advice}")

    # -- checking one memory -------------------------------------------------------------

    @property
    def layers(self) -> int:
        return len(self.memory_layers)

    def bytes_full_kv_fp16(self, total_layers) -> int:
        """Bytes of the full fp16 KV cache of one reference of reference_length tokens,
        over `total_layers` layers: the baseline every compression ratio is against."""
        return total_layers * 2 * self.kv_heads * self.reference_length * self.head_dim * 2

    def check_arrays(self, keys, values, positions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Validate one memory's arrays against the spec; return (keys, values, positions)
        as float32, float32, uint8, or raise InvalidInputError naming the problem."""
        keys = _float_array("keys", keys)
        values = _float_array("values", values)
        positions = np.asarray(positions)
        L, H, D = self.layers, self.kv_heads, self.head_dim
        if keys.ndim != 4 or keys.shape[:2] != (L, H) or keys.shape[3] != D:
            raise InvalidInputError(
                f"keys has shape {keys.shape}; this database expects (layers={L}, kv_heads={H}, n, head_dim={D}) "
                f"with 1 <= n <= tokens_per_head={self.tokens_per_head}"
            )
        n = keys.shape[2]
        if not 1 <= n <= self.tokens_per_head:
            raise InvalidInputError(
                f"keys keep {n} tokens per head; this database keeps 1..{self.tokens_per_head} (tokens_per_head)"
            )
        if values.shape != keys.shape:
            raise InvalidInputError(f"values has shape {values.shape}; it must equal the keys' shape {keys.shape}")
        if positions.shape != (L, H, n):
            raise InvalidInputError(
                f"positions has shape {positions.shape}; expected {(L, H, n)} (layers, kv_heads, n)"
            )
        if positions.dtype.kind not in "ui":
            raise InvalidInputError(f"positions has dtype {positions.dtype}; it must be an integer array (uint8)")
        if positions.size and (positions.min() < 0 or positions.max() >= self.reference_length):
            raise InvalidInputError(
                f"positions must lie in [0, {self.reference_length}) (reference_length), "
                f"got values in [{positions.min()}, {positions.max()}]"
            )
        srt = np.sort(positions, axis=-1)
        if n > 1 and (srt[..., 1:] == srt[..., :-1]).any():
            raise InvalidInputError("positions repeat within a (layer, head): each kept token must be distinct")
        for name, arr in (("keys", keys), ("values", values)):
            if not np.isfinite(arr).all():
                bad = int((~np.isfinite(arr)).sum())
                raise InvalidInputError(f"{name} holds {bad} NaN or infinite values; memories must be finite")
        return keys, values, positions.astype(np.uint8)

    def check_embedding(self, embedding) -> np.ndarray:
        e = _float_array("embedding", embedding)
        if e.shape != (self.embedding_dim,):
            raise InvalidInputError(f"embedding has shape {e.shape}; this database expects ({self.embedding_dim},)")
        if not np.isfinite(e).all():
            raise InvalidInputError("embedding holds NaN or infinite values")
        if not np.any(e):
            raise InvalidInputError("embedding is all zeros; cosine similarity is undefined for it")
        return e


def _float_array(name, x):
    arr = np.asarray(x)
    if arr.dtype not in (np.float32, np.float16):
        raise InvalidInputError(
            f"{name} has dtype {arr.dtype}; m3db takes float32 (or float16) arrays: pass x.astype(numpy.float32)"
        )
    return np.ascontiguousarray(arr, dtype=np.float32)
