"""The product-quantization codec (the paper's PQ): trained codebooks, one byte per sub-vector.

Owns `PQCodec` (encode, decode, its parameters as checked bytes) and `train_pq` (k-means on a
sample of a knowledge base's own keys and values). Imports: errors and codec_base.py only, never
codec.py (which imports this module to register PQCodec); numpy is all it needs (training and
decoding), so reading a pq database needs nothing more than reading an int4 one.

A codebook per (memory layer, KV head, keys or values): the head vector of D dims is split
into M sub-vectors of D / M dims, each replaced by the number (one byte) of its nearest of 256
centroids. A memory of L x H x n vectors costs L * H * n * M bytes for its keys and L * H * n * M'
for its values, plus a header per blob naming the codebook it was encoded with, so a mismatch is
a FormatError, not wrong numbers. Decoding is a table lookup (one `np.take`).

Blob versions (the record's `codec_version`, the codebook row's version; `BLOB_HEADERS`):
- v2, what a newly trained codebook writes: a 4-byte header, the codebook's crc32. The crc
  covers the codebook's number with everything else (`params_crc`), so it alone names the
  codebook: each blob still checks its own, keys and values alike.
- v1, what m3db wrote before: an 8-byte header, the codebook's number and its crc32 (the number
  said twice; 8 bytes more per record). Still read and written: a codec is loaded at its catalog
  row's version (codec.stored_codec), so a database whose codebook an older m3db stored goes on
  as it was, its records never mixing versions; `m3db recompress PATH --codec pq` trains a new
  codebook and rewrites every record as v2. Decoded arrays do not depend on the version.

The error is not bounded per element (a vector far from what the codebook was trained on
decodes far from itself); what is stated is the relative error sqrt(sum |x - x'|^2 / sum |x|^2)
per part, measured on an eighth of the sample held out of training (`codec.error`), and tests
check that arrays of the same distribution round-trip within it (tests/test_pq.py).

Parameters (the catalog's `codecs` row, msgpack; never pickled): {"format": 1, "codebook":
number, "m": M, "shape": [L, H, M, 256, D / M], "dtype": "<f4", "keys": bytes, "values":
bytes (float32 little-endian), "error": {"keys": e, "values": e}, "vectors": the number of
training vectors per codebook, "crc32": of all the others (`params_crc`), which is also the
codebook's identity in every blob}.
"""

import math
import struct
import zlib

import msgpack
import numpy as np

from ..errors import FormatError, InvalidInputError
from .codec_base import Codec

KSUB = 256  # centroids per sub-quantizer: one byte per code
# each blob version's header: v1 the codebook's number and crc32; v2 the crc32 alone (it covers the number)
BLOB_HEADERS = {1: struct.Struct("<II"), 2: struct.Struct("<I")}
PARAMS_FORMAT = 1
PARTS = ("keys", "values")
# k-means with 256 centroids needs several points per centroid to place them: fewer is refused
MIN_TRAIN_VECTORS = 4 * KSUB
# past this many points per codebook (a random subset is kept), training time grows and the
# centroids barely move: bench/bench_codec.py measures the error against the cap
MAX_TRAIN_VECTORS = 32 * KSUB
HELD_OUT = 8  # one vector in HELD_OUT of a sample measures the stated error instead of training
PARAM_FIELDS = {"format", "codebook", "m", "shape", "dtype", "keys", "values", "crc32", "error", "vectors"}


class PQCodec(Codec):
    """Product quantization with trained codebooks (Jégou et al.; the paper's FAISS PQ).

    centroids: {"keys": float32 (L, H, M, 256, D / M), "values": float32 (L, H, M', 256, D / M')}
    (M, M': bytes per vector of each part, `codec.m`; values are harder to compress than keys,
    so they may get more bytes); codebook: its
    number in this database (1, 2, ... as it is trained again); error: the relative error
    measured on the held-out part of the sample, per part; vectors: training vectors per codebook.
    """

    name, version = "pq", 2
    versions = (1, 2)  # blob versions this m3db reads (module docstring)
    trained = True

    def __init__(self, centroids, *, codebook=1, error=None, vectors=0, version=2):
        if version not in self.versions:
            raise FormatError(
                f"codec pq version {version} is not readable by this m3db (it reads versions {self.versions}); "
                "upgrade m3db"
            )
        self.version = int(version)  # of the blobs this instance writes and reads: its catalog row's
        self._header = BLOB_HEADERS[self.version]
        self.centroids = {p: np.ascontiguousarray(centroids[p], dtype="<f4") for p in PARTS}
        shapes = {p: c.shape for p, c in self.centroids.items()}
        L, H = shapes["keys"][:2]
        if any(
            len(s) != 5 or s[:2] != (L, H) or s[3] != KSUB or s[2] * s[4] != shapes["keys"][2] * shapes["keys"][4]
            for s in shapes.values()
        ):
            raise FormatError(f"codec pq: codebook shapes {list(shapes.values())} do not match")
        self.layers, self.heads, self.dim = L, H, shapes["keys"][2] * shapes["keys"][4]
        self.m = {p: s[2] for p, s in shapes.items()}  # bytes per vector, per part
        self.codebook = int(codebook)
        self.error = dict(error or {})
        self.vectors = int(vectors)
        self.crc = params_crc(self._described(), *(self.centroids[p].tobytes() for p in PARTS))
        # the blob header: what names this codebook in every blob it encodes
        ids = (self.codebook, self.crc) if self.version == 1 else (self.crc,)
        self._identity = self._header.pack(*ids)
        # decode: the flat table of every sub-centroid, (L*H*M*256, d), and each (l, h, m)'s row offset
        self._table = {p: c.reshape(-1, c.shape[4]) for p, c in self.centroids.items()}
        self._base = {p: (np.arange(L * H * M, dtype=np.intp) * KSUB).reshape(L, H, 1, M) for p, M in self.m.items()}
        # encode: |c|^2 of every centroid, (L*H*M, 1, 256)
        self._norms = {p: (c.reshape(-1, 1, KSUB, c.shape[4]) ** 2).sum(-1) for p, c in self.centroids.items()}

    # -- the Codec interface -------------------------------------------------------------------

    def _check_shape(self, shape, error=FormatError):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4 or shape[:2] != (self.layers, self.heads) or shape[3] != self.dim:
            raise error(
                f"codec pq: shape {shape} does not fit its codebook of (layers={self.layers}, heads={self.heads}, "
                f"n, head_dim={self.dim})"
            )
        return shape

    def encode(self, x, *, part="keys") -> bytes:
        """float32 (L, H, n, D) -> header + uint8 codes (L, H, n, M)."""
        L, H, n, _ = self._check_shape(np.shape(x), InvalidInputError)
        M = self.m[part]
        d = self.dim // M
        xs = np.asarray(x, dtype=np.float32).reshape(L, H, n, M, d).transpose(0, 1, 3, 2, 4)  # (L, H, M, n, d)
        xs = xs.reshape(L * H * M, n, d)
        cents = self.centroids[part].reshape(L * H * M, KSUB, d)
        # nearest centroid: argmin |c|^2 - 2 x.c (|x|^2 is the same for every centroid)
        dist = self._norms[part] - 2.0 * np.matmul(xs, cents.transpose(0, 2, 1))  # (L*H*M, n, 256)
        codes = dist.argmin(axis=2).astype(np.uint8).reshape(L, H, M, n).transpose(0, 1, 3, 2)  # (L, H, n, M)
        return self._identity + np.ascontiguousarray(codes).tobytes()

    def decode(self, data, shape, *, part="keys") -> np.ndarray:
        """header + codes -> float32 `shape`: a lookup of each code's sub-centroid."""
        shape = self._check_shape(shape)
        if len(data) != self.encoded_size(shape, part=part):
            raise FormatError(
                f"codec pq: {len(data)} bytes of {part} for shape {shape}, expected "
                f"{self.encoded_size(shape, part=part)}; the blob is corrupt"
            )
        if data[: self._header.size] != self._identity:
            *number, crc = self._header.unpack_from(data)
            which = f"codebook {number[0]}" if number else "another codebook"
            raise FormatError(
                f"codec pq: this blob was encoded with {which} (crc32 {crc:08x}); the catalog holds "
                f"codebook {self.codebook} (crc32 {self.crc:08x}). The record and the catalog disagree: restore the "
                "catalog that goes with these segments, or run `m3db check` to list the damage"
            )
        L, H, n, _ = shape
        codes = np.frombuffer(data, dtype=np.uint8, offset=self._header.size).reshape(L, H, n, self.m[part])
        rows = self._base[part] + codes  # (L, H, n, M): each code's row in the flat table
        return np.take(self._table[part], rows, axis=0).reshape(shape)  # (L, H, n, M, d) -> (L, H, n, D)

    def encoded_size(self, shape, *, part="keys") -> int:
        L, H, n, _ = self._check_shape(shape)
        return self._header.size + L * H * n * self.m[part]

    def bound(self, x) -> np.ndarray:
        raise NotImplementedError(
            "codec pq has no per-element bound: its error is statistical, measured on its training sample (codec.error)"
        )

    # -- parameters ----------------------------------------------------------------------------

    def _described(self) -> dict[str, object]:
        """The parameters other than the centroid bytes and the checksum."""
        return {
            "format": PARAMS_FORMAT,
            "codebook": self.codebook,
            "m": dict(self.m),
            "shape": {p: list(c.shape) for p, c in self.centroids.items()},
            "dtype": "<f4",
            "error": {p: float(self.error.get(p, 0.0)) for p in PARTS},
            "vectors": self.vectors,
        }

    def params(self) -> dict[str, object]:
        keys, values = (self.centroids[p].tobytes() for p in PARTS)
        return {**self._described(), "keys": keys, "values": values, "crc32": self.crc}

    @classmethod
    def reads(cls, version) -> bool:
        return version in cls.versions

    @classmethod
    def from_params(cls, params, *, version=None) -> "PQCodec":
        if not params:
            raise FormatError(
                "codec pq: the catalog holds no codebook for it; the database's codebook row is missing (restore the "
                "catalog, or recompress the database into another codec from a backup)"
            )
        try:
            if set(params) != PARAM_FIELDS or params["format"] != PARAMS_FORMAT or params["dtype"] != "<f4":
                raise ValueError(f"fields {sorted(params)}, format {params.get('format')}")
            centroids = {}
            for p in PARTS:
                shape = params["shape"][p]
                if (
                    not isinstance(shape, list)
                    or len(shape) != 5
                    or not all(_is_int(s, 1, 1 << 31) for s in shape)
                    or shape[3] != KSUB
                    or shape[2] != params["m"][p]
                ):
                    raise ValueError(f"{p} shape {str(shape)[:80]}")
                blob = params[p]
                size = math.prod(shape) * 4
                if not isinstance(blob, bytes) or len(blob) != size:
                    raise ValueError(f"{p} centroid bytes of the wrong size (expected {size})")
                centroids[p] = np.frombuffer(blob, dtype="<f4").reshape(shape)
            # a codebook's number goes in a u32 of each v1 blob; counts and errors are plain numbers
            if not _is_int(params["codebook"], 0, 1 << 32) or not _is_int(params["vectors"], 0, 1 << 63):
                raise ValueError(f"codebook {str(params['codebook'])[:40]}, vectors {str(params['vectors'])[:40]}")
            if not all(type(params["error"][p]) in (int, float) for p in PARTS):
                raise ValueError(f"error {str(params['error'])[:80]}")
            described = {k: v for k, v in params.items() if k not in ("keys", "values", "crc32")}
            if params_crc(described, params["keys"], params["values"]) != params["crc32"]:
                raise ValueError("crc32 mismatch")
            if not all(np.isfinite(c).all() for c in centroids.values()):
                raise ValueError("non-finite centroids")
            error = {p: float(params["error"][p]) for p in PARTS}
            return cls(
                centroids,
                codebook=params["codebook"],
                error=error,
                vectors=params["vectors"],
                version=cls.version if version is None else version,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FormatError(
                f"codec pq: the codebook in the catalog is damaged ({e}); restore the catalog from a backup"
            ) from e

    def __repr__(self):
        m = self.m
        return f"<Codec pq v{self.version} codebook {self.codebook}: {m['keys']} + {m['values']} bytes per key + value>"


def _is_int(value, low, high) -> bool:
    """Whether `value` is an int (not a bool) in [low, high)."""
    return type(value) is int and low <= value < high


def params_crc(described, keys, values) -> int:
    """crc32 of a codebook: its described fields (canonical msgpack: sorted keys) and centroids."""
    head = msgpack.packb(_sorted(described), use_bin_type=True)
    return zlib.crc32(values, zlib.crc32(keys, zlib.crc32(head)))


def _sorted(value):
    return {k: _sorted(value[k]) for k in sorted(value)} if isinstance(value, dict) else value


# -- training ------------------------------------------------------------------------------------


def check_m(m, head_dim) -> dict:
    """pq's m ({"keys": m, "values": m'}, or one m for both) checked against the head dim."""
    if isinstance(m, dict) and set(m) != set(PARTS):
        raise InvalidInputError(
            f"codec pq: m as a dict names each part, {{'keys': m, 'values': m'}}; got the keys {sorted(map(str, m))}"
        )
    ms = dict(m) if isinstance(m, dict) else {p: m for p in PARTS}
    for part, v in ms.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1 or head_dim % v:
            raise InvalidInputError(
                f"codec pq: m (sub-vectors per vector, one byte each) must be a positive integer dividing the head "
                f"dim {head_dim}; {part} got {v!r}"
            )
    return ms


def train_pq(keys, values, *, m=8, codebook=1, iterations=15, seed=0, progress=None) -> PQCodec:
    """Train a PQCodec from a sample: `keys`, `values` float32 (L, H, V, D), V vectors of each
    (layer, head). m: sub-vectors per head vector (bytes per vector; D % m == 0), one for both
    parts or {"keys": m, "values": m'}. `progress`:
    called with the number of codebooks done. Refuses fewer than MIN_TRAIN_VECTORS vectors."""
    keys, values = (np.asarray(a, dtype=np.float32) for a in (keys, values))
    if keys.ndim != 4 or keys.shape != values.shape:
        raise InvalidInputError(
            f"train_pq takes keys and values of one shape (L, H, V, D), got {keys.shape}, {values.shape}"
        )
    L, H, V, D = keys.shape
    ms = check_m(m, D)
    if V < MIN_TRAIN_VECTORS:
        raise InvalidInputError(
            f"codec pq: a codebook trained on {V} vectors per (layer, head) is refused: k-means with {KSUB} "
            f"centroids needs at least {MIN_TRAIN_VECTORS} (from a larger sample of memories)"
        )
    rng = np.random.default_rng(seed)
    # an eighth of the sample is held out: the stated error is measured on vectors the
    # codebook was not fitted to (the training error flatters it when centroids are many)
    order = rng.permutation(V)
    held, fit = np.sort(order[: V // HELD_OUT]), np.sort(order[V // HELD_OUT :][:MAX_TRAIN_VECTORS])
    centroids, done = {}, 0
    for part, x in (("keys", keys), ("values", values)):
        m, d = ms[part], D // ms[part]
        out = np.empty((L, H, m, KSUB, d), np.float32)
        for layer in range(L):
            for head in range(H):
                sub = np.ascontiguousarray(x[layer, head, fit].reshape(-1, m, d).transpose(1, 0, 2))  # (M, V, d)
                out[layer, head], _ = kmeans(sub, KSUB, iterations=iterations, rng=rng)
                done += 1
                if progress is not None:
                    progress(done)
        centroids[part] = out
    codec = PQCodec(centroids, codebook=codebook, vectors=len(fit))
    error = {}
    for part, x in (("keys", keys), ("values", values)):
        sample = np.ascontiguousarray(x[:, :, held])  # (L, H, held, D)
        decoded = codec.decode(codec.encode(sample, part=part), sample.shape, part=part)
        total = float(np.square(sample, dtype=np.float64).sum())
        error[part] = float(np.sqrt(np.square(sample - decoded, dtype=np.float64).sum() / total)) if total else 0.0
    return PQCodec(centroids, codebook=codebook, error=error, vectors=len(fit))


def kmeans(x, k, *, iterations, rng) -> tuple[np.ndarray, float]:
    """Lloyd's k-means on M independent sets at once: x float32 (M, V, d) -> (centroids (M, k, d),
    the final sum of squared errors). Initial centroids: k distinct sample points; an empty
    cluster takes the point currently worst served (so none is wasted)."""
    M, V, d = x.shape
    cents = np.stack([x[j, rng.choice(V, k, replace=False)] for j in range(M)])  # (M, k, d)
    offsets = (np.arange(M) * k)[:, None]  # (M, 1)
    for it in range(iterations + 1):
        # |c|^2 - 2 x.c, in place: the (M, V, k) matrix is the cost of an iteration
        dist = np.matmul(x, cents.transpose(0, 2, 1))  # (M, V, k)
        dist *= -2.0
        dist += np.square(cents).sum(-1)[:, None, :]
        assign = dist.argmin(axis=2)  # (M, V)
        if it == iterations:
            break
        flat = (assign + offsets).ravel()
        counts = np.bincount(flat, minlength=M * k).reshape(M, k)
        sums = np.stack([np.bincount(flat, weights=x[..., j].ravel(), minlength=M * k) for j in range(d)], -1)
        filled = counts > 0
        cents = np.where(filled[..., None], sums.reshape(M, k, d) / np.maximum(counts, 1)[..., None], cents)
        cents = cents.astype(np.float32)
        for j in np.flatnonzero((~filled).any(axis=1)):
            empty = np.flatnonzero(~filled[j])
            served = np.take_along_axis(dist[j], assign[j, :, None], axis=1)[:, 0]  # (V,) minus |x|^2
            worst = np.argsort(served + np.square(x[j]).sum(-1))[::-1][: len(empty)]
            cents[j, empty] = x[j, worst]
    err = x - np.take_along_axis(cents, assign[..., None], axis=1)  # (M, V, d)
    return cents, float(np.square(err, dtype=np.float64).sum())
