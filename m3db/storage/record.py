"""The on-disk record of one memory: a checked frame around a msgpack payload.

Frame (little-endian, 20 bytes, then the payload):
    magic b"M3MR" | u16 format version | u16 flags | u32 payload length
    | u32 crc32(payload) | u32 crc32(the 16 bytes before it)
flags bit 0: the payload is zstd-compressed. The header has its own checksum so a corrupt
length is caught before anything is allocated.

Payload: a msgpack map with the memory's id, codec name and version, shape (L, H, n, D),
the positions (uint8 bytes), the encoded keys and values, and the text, metadata, document
id, ordinal and token count (absent in the earliest v1 records: read as None). Never pickle.

The repair fields (`REPAIR_FIELDS`, absent in records written before m3db 0.1.0's repair):
the embedding (float32 bytes), the commit number, the character span, and the document's
source, title, uri and metadata. With them a record alone rebuilds its catalog row, and
`m3db check --repair` rebuilds a lost catalog from the segments (repair.py).

A cold record (`"cold": true`, written by cold-start ingest) holds the text and the rest but
no shape, positions, keys or values: the memory is encoded the first time it is read, and a
full record replaces it.
"""

import dataclasses
import struct
import threading
import zlib

import msgpack
import numpy as np
import zstandard

from ..errors import FormatError, InvalidInputError
from .codec import EncodedArray, codec_class

MAGIC = b"M3MR"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sHHIII")
HEADER_SIZE = HEADER.size  # 20
FLAG_ZSTD = 1
MAX_PAYLOAD = 64 << 20  # no memory is near this; a larger declared length is corruption
REPAIR_FIELDS = ("embedding", "seq", "char_start", "char_end", "document")
MAX_DIM = 1 << 31  # no axis of a memory's arrays is near this: a larger one is corruption
_NONE = type(None)
# the type of each payload field that m3db writes and reads (bool is not an int here)
FIELD_TYPES = {
    "id": (int,),
    "cold": (bool,),
    "codec": (str,),
    "codec_version": (int,),
    "shape": (list,),
    "positions": (bytes,),
    "keys": (bytes,),
    "values": (bytes,),
    "text": (str,),
    "metadata": (dict,),
    "document_id": (int, _NONE),
    "ordinal": (int, _NONE),
    "token_count": (int, _NONE),
    "embedding": (bytes,),
    "seq": (int,),
    "char_start": (int, _NONE),
    "char_end": (int, _NONE),
    "document": (dict, _NONE),
}
# zstd barely shrinks dense quantized tensors; keep the compressed form only when it pays,
# and decide from a small probe so that incompressible payloads cost little
ZSTD_MIN_SAVING = 0.9
ZSTD_PROBE = 4096

# zstd (de)compressor objects must not be shared between threads: one per thread
_local = threading.local()


def _zstd():
    if not hasattr(_local, "compressor"):
        _local.compressor = zstandard.ZstdCompressor(level=3)
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local


@dataclasses.dataclass
class Memory:
    """One explicit memory, decoded.

    keys, values: float32 (layers, kv_heads, n, head_dim), keys before RoPE.
    positions: uint8 (layers, kv_heads, n), each kept token's position in its reference.
    """

    id: int
    text: str
    keys: np.ndarray
    values: np.ndarray
    positions: np.ndarray
    metadata: dict
    document_id: int | None = None
    ordinal: int | None = None
    token_count: int | None = None
    cold: bool = False  # stored as text only: keys, values and positions are None

    def detached(self) -> "Memory":
        """A copy to hand a caller: metadata of its own, and the arrays as read-only views that
        cannot be made writable (the RAM cache and every other reader share the arrays)."""
        return dataclasses.replace(
            self,
            metadata=_copy_json(self.metadata),
            keys=_read_only_view(self.keys),
            values=_read_only_view(self.values),
            positions=_read_only_view(self.positions),
        )

    def __repr__(self):
        text = self.text if len(self.text) <= 40 else self.text[:37] + "..."
        shape = "cold" if self.cold else (None if self.keys is None else tuple(self.keys.shape))
        return f"<Memory id={self.id} shape={shape} text={text!r}>"


def encode_record(
    memory_id, codec, keys, values, positions, text, metadata, document_id, ordinal, token_count=None, repair=None
) -> bytes:
    """Build the framed bytes of one memory (arrays already checked against the spec; all
    three None for a cold record). `repair`: the REPAIR_FIELDS, as `repair_fields` makes them."""
    fields = {"id": int(memory_id)}
    if keys is None:
        fields["cold"] = True
    else:
        fields.update(
            codec=codec.name,
            codec_version=codec.version,
            shape=[int(n) for n in keys.shape],
            positions=positions.astype(np.uint8).tobytes(),
            keys=_encoded(codec, keys, "keys"),
            values=_encoded(codec, values, "values"),
        )
    fields.update(text=text, metadata=metadata, document_id=document_id, ordinal=ordinal, token_count=token_count)
    fields.update(repair or {})
    payload = msgpack.packb(fields, use_bin_type=True)
    if len(payload) > MAX_PAYLOAD:  # a reader refuses it: never write what cannot be read back
        raise InvalidInputError(
            f"memory {memory_id}: its record would take {len(payload):,} bytes, over the {MAX_PAYLOAD:,} a reader "
            "accepts; split its text (a reference is meant to be a short passage) or shrink its metadata"
        )
    flags = 0
    middle = len(payload) // 2
    probe = payload[middle : middle + ZSTD_PROBE]  # the middle: tensor bytes, the bulk of a payload
    try:
        if len(payload) <= ZSTD_PROBE or len(_zstd().compressor.compress(probe)) < ZSTD_MIN_SAVING * len(probe):
            squeezed = _zstd().compressor.compress(payload)
            if len(squeezed) < ZSTD_MIN_SAVING * len(payload):
                payload, flags = squeezed, FLAG_ZSTD
    except zstandard.ZstdError as e:
        # zstd reports running out of memory as its own error (measured under RLIMIT_AS, see
        # docs/errors.md): it is Python's MemoryError, raised before anything is written
        raise MemoryError(f"memory {memory_id}: zstd could not compress its record ({e}); nothing was written") from e
    return frame(payload, flags)


def _encoded(codec, x, part):
    """The codec's bytes of `x`; an EncodedArray (checked by validate.py) is already them."""
    return bytes(x.data) if isinstance(x, EncodedArray) else codec.encode(x, part=part)


def repair_fields(embedding, seq, char_start, char_end, document) -> dict:
    """The REPAIR_FIELDS of a record: `document` is None or {"source", "title", "uri", "metadata"}."""
    return {
        "embedding": np.asarray(embedding, dtype="<f4").tobytes(),
        "seq": int(seq),
        "char_start": char_start,
        "char_end": char_end,
        "document": document,
    }


def frame(payload, flags=0) -> bytes:
    head = struct.pack("<4sHHII", MAGIC, FORMAT_VERSION, flags, len(payload), zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def read_header(buf, where) -> tuple[int, int, int]:
    """Parse and check a frame header; return (flags, payload length, payload crc)."""
    if len(buf) < HEADER_SIZE:
        raise FormatError(f"{where}: truncated record header ({len(buf)} of {HEADER_SIZE} bytes)")
    magic, version, flags, length, crc, head_crc = HEADER.unpack_from(buf)
    if zlib.crc32(bytes(buf[:16])) != head_crc:
        raise FormatError(
            f"{where}: record header checksum mismatch (corrupt bytes); list the damage with `m3db check` (a "
            "database) or `m3db verify` (a package)"
        )
    if magic != MAGIC:
        raise FormatError(f"{where}: bad record magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise FormatError(f"{where}: record format version {version}; this m3db reads version {FORMAT_VERSION}")
    if length > MAX_PAYLOAD:
        raise FormatError(f"{where}: record declares {length} payload bytes, over the {MAX_PAYLOAD} limit")
    return flags, length, crc


def read_payload(buf, where, *, expect_crc=None) -> dict:
    """Check a whole frame and return its payload map, decompressed and unpacked."""
    flags, length, crc = read_header(buf, where)
    if len(buf) != HEADER_SIZE + length:
        raise FormatError(f"{where}: record is {len(buf)} bytes, its header says {HEADER_SIZE + length}")
    payload = bytes(buf[HEADER_SIZE:])
    if zlib.crc32(payload) != crc or (expect_crc is not None and crc != expect_crc):
        raise FormatError(
            f"{where}: record checksum mismatch (corrupt bytes); list the damage with `m3db check` (a database) or "
            "`m3db verify` (a package)"
        )
    if flags & FLAG_ZSTD:
        try:
            payload = _zstd().decompressor.decompress(payload, max_output_size=MAX_PAYLOAD)
        except zstandard.ZstdError as e:
            raise FormatError(f"{where}: record payload does not decompress: {e}") from e
    try:
        d = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_bin_len=MAX_PAYLOAD, max_str_len=MAX_PAYLOAD)
    except (ValueError, msgpack.UnpackException) as e:
        raise FormatError(f"{where}: record payload is malformed ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict):
        raise FormatError(f"{where}: record payload is malformed (a {type(d).__name__}, not a map)")
    check_fields(d, where)
    return d


def check_fields(d, where) -> None:
    """A FormatError unless each field of payload `d` that m3db reads has the type it writes
    (FIELD_TYPES; the id is required and non-negative): whatever reads a payload that passed
    read_payload (decode_record, repair's scan, merge) can take its fields as they are."""
    if "id" not in d:
        raise FormatError(f"{where}: record payload is malformed (no id)")
    for name, value in d.items():
        allowed = FIELD_TYPES.get(name)
        if allowed is not None and type(value) not in allowed:
            shown = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise FormatError(f"{where}: record field {name!r} is a {type(value).__name__}, expected {shown}")
    if d["id"] < 0:
        raise FormatError(f"{where}: record holds the negative id {d['id']}")


def decode_record(buf, where, *, expect_id=None, expect_crc=None, arrays=True, codec=None) -> Memory:
    """Check a whole frame and decode it to a Memory (arrays=False: skip the tensors). codec:
    the database's codec; a record of a trained codec (pq) is decoded only with it (the
    codebook is in the catalog, not in the record)."""
    d = read_payload(buf, where, expect_crc=expect_crc)
    try:
        mid = d["id"]
        if expect_id is not None and mid != expect_id:
            raise FormatError(f"{where}: record holds memory {mid}, the catalog expected {expect_id}")
        fields = dict(
            id=mid,
            text=d["text"],
            metadata=d["metadata"],
            document_id=d["document_id"],
            ordinal=d["ordinal"],
            token_count=d.get("token_count"),
        )
        if d.get("cold") is True:
            return Memory(keys=None, values=None, positions=None, cold=True, **fields)
        shape = tuple(d["shape"])
        if len(shape) != 4 or not all(type(x) is int and 1 <= x < MAX_DIM for x in shape):
            raise FormatError(f"{where}: record shape {str(shape)[:80]} is not (layers, heads, n, head_dim)")
        if not arrays:
            return Memory(keys=None, values=None, positions=None, **fields)
        codec = record_codec(d["codec"], d["codec_version"], codec, where)
        positions = np.frombuffer(d["positions"], dtype=np.uint8)
        if positions.size != shape[0] * shape[1] * shape[2]:
            raise FormatError(f"{where}: record has {positions.size} positions for shape {shape}")
        keys = codec.decode(d["keys"], shape, part="keys")
        values = codec.decode(d["values"], shape, part="values")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"{where}: record payload is malformed ({type(e).__name__}: {e})") from e
    return Memory(keys=keys, values=values, positions=positions.reshape(shape[:3]).copy(), **fields)


def record_codec(name, version, given, where):
    """The codec instance that decodes a record naming codec `name` v`version`: `given` when it
    is that codec, a new one when the codec needs no parameters."""
    if given is not None and (given.name, given.version) == (name, version):
        return given
    cls = codec_class(name, version)
    if cls.trained:
        held = "no codec" if given is None else f"codec {given.name} v{given.version}"
        raise FormatError(
            f"{where}: the record is encoded with the trained codec {name} v{version}, whose codebook is not the "
            f"database's ({held}): the record and the catalog disagree; run `m3db check` to list the damage"
        )
    return cls()


def _copy_json(value):
    """A deep copy of JSON-shaped metadata (dicts, lists, scalars): faster than copy.deepcopy."""
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_json(v) for v in value]
    return value


def _read_only_view(array):
    """A view numpy refuses to make writable: its base is marked read-only first."""
    if array is None:
        return None
    owner = array
    while isinstance(owner.base, np.ndarray):  # a view's base is the array that owns the memory
        owner = owner.base
    owner.flags.writeable = False
    array.flags.writeable = False
    view = array.view()
    view.flags.writeable = False
    return view
