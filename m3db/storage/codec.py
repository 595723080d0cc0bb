"""Codecs: how the kept keys and values of a memory become bytes, and back.

A codec owns one thing: turning a float32 array whose last axis is a head vector
(shape (..., D)) into bytes and back, with a stated worst-case error. Each codec is
versioned; a blob names the codec and version that wrote it, so old blobs stay readable
when a codec changes (`Codec.reads`). Codecs whose parameters are learned (a product-quantization
codebook, say) set `trained = True` and round-trip their parameters through `params()` /
`from_params()`, which the catalog stores in its `codecs` table as msgpack, never pickle, in a
row of the codec's name and version: `stored_codec` loads a database's codec at its row's version.

Error bounds (checked by tests/test_codec.py on random and adversarial inputs):
- f32: exact.
- f16: |x - x'| <= max(|x| * 2**-11, 2**-25); values beyond +-65504 are refused.
- int8: per head vector v, scale s = max|v| / 127; |x - x'| <= s / 2 + max|v| * 2**-22.
- int4: per group of 32 values g, scale s = max|g| / 7; |x - x'| <= s / 2 + max|g| * 2**-22.
- pq (pq.py, trained): no per-element bound; the relative error measured on its training sample.

`CODECS` are the codecs usable without parameters; `TRAINED_CODECS` names those that need them
(their classes live in their own modules: pq.py). `Codec`, the base class, lives in codec_base.py
so that pq.py need not import this module, which imports it to register it; imported here, it
keeps its name `codec.Codec` (m3db.Codec). Imports: errors, codec_base and pq only.
"""

import dataclasses

import msgpack
import numpy as np

from ..errors import FormatError, InvalidInputError
from .codec_base import Codec
from .pq import PQCodec

F16_MAX = 65504.0


class F32Codec(Codec):
    name, version = "f32", 1

    def encode(self, x, *, part="keys") -> bytes:
        return np.ascontiguousarray(x, dtype="<f4").tobytes()

    def decode(self, data, shape, *, part="keys") -> np.ndarray:
        self._check_size(data, shape)
        return np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32, copy=True)

    def bound(self, x) -> np.ndarray:
        return np.zeros(np.shape(x))

    def encoded_size(self, shape) -> int:
        return int(np.prod(shape)) * 4


class F16Codec(Codec):
    name, version = "f16", 1

    def check(self, x) -> None:
        peak = max(float(x.max(initial=0.0)), -float(x.min(initial=0.0)))
        if peak > F16_MAX:
            raise InvalidInputError(
                f"codec f16 cannot hold {peak:.6g} (its range is +-{F16_MAX:g}); "
                "use codec 'int8' (scaled) or 'f32' for this database"
            )

    def encode(self, x, *, part="keys") -> bytes:
        self.check(x)
        return np.ascontiguousarray(x, dtype="<f2").tobytes()

    def decode(self, data, shape, *, part="keys") -> np.ndarray:
        self._check_size(data, shape)
        return np.frombuffer(data, dtype="<f2").reshape(shape).astype(np.float32)

    def bound(self, x) -> np.ndarray:
        # half a unit in the last place: 11 significant bits in the normal range,
        # a fixed 2**-25 in the subnormal range below 2**-14
        return np.maximum(np.abs(np.asarray(x, dtype=np.float64)) * 2.0**-11, 2.0**-25)

    def encoded_size(self, shape) -> int:
        return int(np.prod(shape)) * 2


class _ScaledIntCodec(Codec):
    """Symmetric integer quantization with one float32 scale per group of `group` values
    along the last axis (group=None: the whole head vector is one group)."""

    levels = 0  # largest integer magnitude
    group = None

    def _groups(self, shape):
        d = shape[-1]
        g = d if self.group is None else self.group
        if d % g:
            raise InvalidInputError(f"codec {self.name} needs head dim divisible by {g}, got {d}")
        return g, int(np.prod(shape[:-1])) * (d // g)

    def _quantize(self, x):
        g, ngroups = self._groups(x.shape)
        xg = np.asarray(x, dtype=np.float32).reshape(ngroups, g)
        # |x| by clearing the float sign bit, then an integer max: ~1.6x faster than
        # abs().max() (integer reductions need no NaN handling; inputs are checked finite)
        peak = (xg.view(np.int32) & 0x7FFFFFFF).max(axis=1).view(np.float32)  # (ngroups,)
        scale = (peak / self.levels).astype("<f4")
        inverse = np.divide(np.float32(self.levels), peak, out=np.zeros_like(peak), where=peak > 0)
        # |x| * levels / peak <= levels, so rint stays in range: no clip needed
        q = np.rint(xg * inverse[:, None]).astype(np.int8)
        return q, scale

    def _dequantize(self, q, scale, shape):
        g, ngroups = self._groups(shape)
        return (q.reshape(ngroups, g).astype(np.float32) * scale[:, None]).reshape(shape)

    def bound(self, x) -> np.ndarray:
        g, ngroups = self._groups(np.shape(x))
        xg = np.abs(np.asarray(x, dtype=np.float64)).reshape(ngroups, g)
        peak = xg.max(axis=1, keepdims=True)
        b = peak / self.levels / 2 + peak * 2.0**-22
        return np.broadcast_to(b, xg.shape).reshape(np.shape(x))


class Int8Codec(_ScaledIntCodec):
    name, version = "int8", 1
    levels, group = 127, None

    def encode(self, x, *, part="keys") -> bytes:
        q, scale = self._quantize(x)
        return scale.tobytes() + q.tobytes()

    def decode(self, data, shape, *, part="keys") -> np.ndarray:
        self._check_size(data, shape)
        _, ngroups = self._groups(shape)
        scale = np.frombuffer(data, dtype="<f4", count=ngroups)
        q = np.frombuffer(data, dtype=np.int8, offset=4 * ngroups)
        return self._dequantize(q, scale, shape)

    def encoded_size(self, shape) -> int:
        _, ngroups = self._groups(shape)
        return 4 * ngroups + int(np.prod(shape))


class Int4Codec(_ScaledIntCodec):
    name, version = "int4", 1
    levels, group = 7, 32

    def _groups(self, shape):
        d = shape[-1]
        g = min(self.group, d)
        if d % g or g % 2:
            raise InvalidInputError(f"codec int4 needs an even head dim divisible by {g}, got {d}")
        return g, int(np.prod(shape[:-1])) * (d // g)

    def encode(self, x, *, part="keys") -> bytes:
        q, scale = self._quantize(x)
        u = (q.reshape(-1) + 8).astype(np.uint8)  # 1..15: two values per byte
        packed = (u[0::2] << 4) | u[1::2]
        return scale.tobytes() + packed.tobytes()

    def decode(self, data, shape, *, part="keys") -> np.ndarray:
        self._check_size(data, shape)
        _, ngroups = self._groups(shape)
        scale = np.frombuffer(data, dtype="<f4", count=ngroups)
        packed = np.frombuffer(data, dtype=np.uint8, offset=4 * ngroups)
        u = np.empty(packed.size * 2, dtype=np.int8)
        u[0::2] = packed >> 4
        u[1::2] = packed & 0x0F
        if (u == 0).any():  # encode never writes 0: a zero nibble is corruption
            raise FormatError("codec int4: a nibble is 0, which no encoder writes; the blob is corrupt")
        return self._dequantize(u - 8, scale, shape)

    def encoded_size(self, shape) -> int:
        _, ngroups = self._groups(shape)
        return 4 * ngroups + int(np.prod(shape)) // 2


@dataclasses.dataclass(frozen=True)
class EncodedArray:
    """Keys or values already encoded by a codec: its name and version, the array's shape and the
    bytes. A distributed build's workers encode on their own machines and send these; the writer
    checks them (they decode to a valid array of the spec's shape) and stores the bytes as they are,
    so the record equals the one a local build writes from the same floats."""

    codec: str
    version: int
    shape: tuple
    data: bytes


def encoded_floats(x, codec, part) -> np.ndarray:
    """`x` as float32 for the spec's checks: an EncodedArray is decoded with `codec` (which must be
    the one that wrote it); anything else passes through."""
    if not isinstance(x, EncodedArray):
        return x
    if (x.codec, x.version) != (codec.name, codec.version):
        raise InvalidInputError(
            f"{part} were encoded with codec {x.codec} v{x.version}; this database stores {codec.name} "
            f"v{codec.version}. Encode with the database's codec"
        )
    try:
        return codec.decode(bytes(x.data), tuple(int(n) for n in x.shape), part=part)
    except (FormatError, ValueError, TypeError) as e:
        raise InvalidInputError(f"{part}: the encoded bytes do not decode to shape {x.shape}: {e}") from None


CODECS = {c.name: c for c in (F32Codec, F16Codec, Int8Codec, Int4Codec)}
TRAINED = {c.name: c for c in (PQCodec,)}  # need their parameters (a codebook) from the catalog
TRAINED_CODECS = tuple(TRAINED)


def codec_class(name, version=None) -> type[Codec]:
    """The codec class registered as `name` (and `version`, when given)."""
    cls = CODECS.get(name) or TRAINED.get(name)
    if cls is None:
        known = ", ".join(sorted(CODECS) + list(TRAINED_CODECS))
        raise InvalidInputError(f"unknown codec {name!r}; known codecs: {known}")
    if version is not None and not cls.reads(version):
        raise FormatError(
            f"codec {name} version {version} is not readable by this m3db (it reads version "
            f"{cls.version}); upgrade m3db"
        )
    return cls


def stored_codec(name, rows) -> Codec:
    """The codec `name` of a database or package, from its catalog's codec rows ([name, version,
    params bytes or None]): at the version of its row, so a database whose codebook an older m3db
    stored keeps reading and writing that version until it is recompressed (the newest row this
    m3db reads, if there are several); a codec without a row at this m3db's version."""
    cls = codec_class(name)
    versions = sorted(int(v) for n, v, _ in rows if n == name)
    readable = [v for v in versions if cls.reads(v)]
    if versions and not readable:
        codec_class(name, versions[-1])  # raises: a newer m3db wrote it
    version = readable[-1] if readable else None
    params = next((p for n, v, p in rows if n == name and v == version), None)
    return load_codec(name, params, version=version)


def load_codec(name, stored: bytes | None, *, version=None) -> Codec:
    """The codec `name` at `version` (None: this m3db's), with its stored parameters (the msgpack
    bytes of its `codecs` row, or None): what reads the records of a database or package."""
    cls = codec_class(name, version)
    v = cls.version if version is None else version
    params = {}
    if stored is not None:
        try:
            params = msgpack.unpackb(stored, raw=False, strict_map_key=True)
        except (ValueError, msgpack.UnpackException) as e:
            raise FormatError(f"the parameters of codec {name} v{v} in the catalog are damaged: {e}") from e
        if not isinstance(params, dict):
            raise FormatError(f"the parameters of codec {name} v{v} in the catalog are not a map")
    return cls.from_params(params, version=version)
