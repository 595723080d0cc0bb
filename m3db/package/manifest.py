"""The package file's frame: the fixed header, the manifest, and the section table.

A package (`.m3kb`, docs/packaging.md) is laid out as

    [0, 4096)        header: magic b"M3KB\\r\\n\\x1a\\n" | u16 format version | u16 flags (0)
                     | u32 reserved (0) | u64 manifest offset | u64 manifest length
                     | 32 bytes sha256(manifest) | u32 crc32(the 64 bytes before it); zeros after
    sections         each at a multiple of 4096 (so a segment can be mmap'd in place),
                     zero bytes between them
    manifest         canonical JSON (sorted keys, no spaces), the last bytes of the file

This module owns reading and checking that frame. It reads at most HEADER_PAGE + MAX_MANIFEST
bytes and allocates nothing whose size it has not bounded first; it never touches section
contents (verify.py checks those) and never imports DuckDB or USearch.
"""

import hashlib
import json
import mmap
import os
import re
import struct
import zlib
from collections.abc import Iterator

from ..errors import FormatError
from ..storage.segment import HEADER_SIZE as SEGMENT_HEADER_SIZE
from ..storage.segment import check_segment_header

MAGIC = b"M3KB\r\n\x1a\n"  # like PNG's: a text-mode transfer or a truncation to 7 bits shows
FORMAT_VERSION = 1
FORMAT_NAME = "m3db-package"
HEADER = struct.Struct("<8sHHIQQ32s")  # 64 bytes
HEADER_CRC = struct.Struct("<I")
HEADER_PAGE = 4096
ALIGN = 4096
MAX_MANIFEST = 16 << 20  # ~100 bytes a section: far beyond MAX_SECTIONS
MAX_SECTIONS = 65_536  # x 256 MiB segments = 16 TiB
MAX_TEXT_FIELD = 64 << 10  # a license text fits; a manifest field is not a place for data
MAX_COUNT = 1 << 40
SECTION_NAME = re.compile(r"^(catalog|index|segment/(\d{6}))$")
ABOUT_FIELDS = ("name", "description", "version", "license", "attribution")
MANIFEST_FIELDS = {"format", "format_version", "about", "spec", "codec", "counts", "build", "sections"}
COUNT_FIELDS = ("memories", "documents", "segments", "record_bytes")
CODEC_FIELDS = {"name", "version", "params_sha256"}
SECTION_FIELDS = {"name", "offset", "length", "sha256"}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def align(n) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def pack_header(manifest_offset, manifest_bytes) -> bytes:
    head = HEADER.pack(
        MAGIC, FORMAT_VERSION, 0, 0, manifest_offset, len(manifest_bytes), hashlib.sha256(manifest_bytes).digest()
    )
    head += HEADER_CRC.pack(zlib.crc32(head))
    return head + bytes(HEADER_PAGE - len(head))


def dump_manifest(manifest) -> bytes:
    """Canonical bytes of a manifest: the same manifest always gives the same bytes."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode(
        "ascii"
    )


def is_package(path) -> bool:
    """Does the file at `path` start with the package magic? (False for directories.)"""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except (IsADirectoryError, FileNotFoundError, PermissionError):
        return False


class Frame:
    """A package's header and checked manifest, read from an open binary file.

    `manifest` is the parsed dict, `manifest_sha256` its hex hash (the package's identity:
    it covers every section's hash), `sections` {name: (offset, length, sha256 hex)},
    `size` the file size. Construction raises FormatError on the first problem found.
    """

    def __init__(self, f, where):
        self.where = where
        size = os.fstat(f.fileno()).st_size
        self.size = size
        f.seek(0)
        head = f.read(HEADER_PAGE)
        if head[: len(MAGIC)] != MAGIC[: len(head)] or not head:
            raise FormatError(
                f"{where}: not an m3db package (it starts {head[:8]!r}); make one with `m3db pack DB OUT.m3kb`"
            )
        if len(head) < HEADER.size + HEADER_CRC.size:
            raise FormatError(
                f"{where}: {size} bytes is too short for an m3db package (the header alone is {HEADER_PAGE}); the "
                "file is truncated"
            )
        magic, version, flags, reserved, m_off, m_len, m_hash = HEADER.unpack_from(head)
        if magic != MAGIC:
            raise FormatError(
                f"{where}: not an m3db package (magic {magic!r}, expected {MAGIC!r}); make one with `m3db pack DB "
                "OUT.m3kb`"
            )
        (crc,) = HEADER_CRC.unpack_from(head, HEADER.size)
        if zlib.crc32(head[: HEADER.size]) != crc:
            raise FormatError(
                f"{where}: the package header is corrupt (checksum mismatch); the file is damaged, get a fresh copy"
            )
        if version != FORMAT_VERSION:
            raise FormatError(
                f"{where}: package format version {version}; this m3db reads version {FORMAT_VERSION}. "
                "Upgrade m3db, or re-pack the knowledge base with this version"
            )
        if flags or reserved:
            raise FormatError(
                f"{where}: header flags {flags} / reserved {reserved} are set; version {FORMAT_VERSION} defines none"
            )
        if len(head) < HEADER_PAGE:
            raise FormatError(f"{where}: {size} bytes is too short for an m3db package; the file is truncated")
        if any(head[HEADER.size + HEADER_CRC.size :]):
            raise FormatError(f"{where}: the header page has stray bytes after the header; the file is damaged")
        if m_len > MAX_MANIFEST or m_len == 0:
            raise FormatError(
                f"{where}: the header declares a {m_len}-byte manifest; the limit is {MAX_MANIFEST} bytes"
            )
        if m_off < HEADER_PAGE or m_off % ALIGN or m_off + m_len != size:
            raise FormatError(
                f"{where}: the manifest is declared at [{m_off}, {m_off + m_len}) but the file is {size} bytes "
                "(it must be aligned and end the file); the file is truncated or damaged"
            )
        f.seek(m_off)
        raw = f.read(m_len)
        if len(raw) != m_len:
            raise FormatError(
                f"{where}: the manifest is cut short ({len(raw)} of {m_len} bytes); the file is truncated"
            )
        if hashlib.sha256(raw).digest() != m_hash:
            raise FormatError(
                f"{where}: the manifest's sha256 does not match the header; the file is damaged, get a fresh copy"
            )
        self.manifest_offset = m_off
        self.manifest_bytes = raw
        self.manifest_sha256 = m_hash.hex()
        self.manifest = parse_manifest(raw, where)
        self.sections = check_sections(self.manifest["sections"], m_off, where)
        check_counts(self.manifest, self.sections, where)


def parse_manifest(raw, where) -> dict[str, object]:
    """Decode and check a manifest's fields and types (not its sections' placement)."""
    try:
        # NaN and Infinity are not JSON: Python reads them, and canonical form cannot write them
        m = json.loads(raw.decode("ascii"), parse_constant=_not_json)
        canonical = dump_manifest(m)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"{where}: the manifest is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if raw != canonical:
        raise FormatError(
            f"{where}: the manifest is not in canonical form (sorted keys, no spaces); it was not written by m3db pack"
        )
    if not isinstance(m, dict):
        raise FormatError(f"{where}: the manifest is a {type(m).__name__}, expected an object")
    if m.get("format") != FORMAT_NAME:
        raise FormatError(f"{where}: the manifest's format is {m.get('format')!r}, expected {FORMAT_NAME!r}")
    if m.get("format_version") != FORMAT_VERSION:
        raise FormatError(
            f"{where}: manifest format version {m.get('format_version')!r}; this m3db reads version {FORMAT_VERSION}"
        )
    fields = set(m)
    if fields != MANIFEST_FIELDS:
        raise FormatError(
            f"{where}: the manifest's fields are wrong: missing {sorted(MANIFEST_FIELDS - fields)}, unknown "
            f"{sorted(fields - MANIFEST_FIELDS)}"
        )
    about = _obj(m, "about", where)
    for key, value in about.items():
        if key not in ABOUT_FIELDS:
            raise FormatError(f"{where}: unknown manifest field about.{key}; known: {', '.join(ABOUT_FIELDS)}")
        if not isinstance(value, str) or len(value) > MAX_TEXT_FIELD:
            raise FormatError(
                f"{where}: manifest field about.{key} must be a string of at most {MAX_TEXT_FIELD} characters"
            )
    _obj(m, "spec", where)
    codec = _obj(m, "codec", where)
    if (
        set(codec) != CODEC_FIELDS
        or not isinstance(codec["name"], str)
        or not _is_int(codec["version"])
        or not isinstance(codec["params_sha256"], str)
        or not _HEX64.match(codec["params_sha256"])
    ):
        raise FormatError(
            f"{where}: manifest field codec must be {{name: str, version: int, params_sha256: hex}}, got "
            f"{str(codec)[:200]}"
        )
    counts = _obj(m, "counts", where)
    if set(counts) != set(COUNT_FIELDS) or not all(_is_int(v) and 0 <= v <= MAX_COUNT for v in counts.values()):
        raise FormatError(
            f"{where}: manifest field counts must hold integers {', '.join(COUNT_FIELDS)} in [0, 2^40], got "
            f"{str(counts)[:200]}"
        )
    build = _obj(m, "build", where)
    for key, value in build.items():
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise FormatError(f"{where}: manifest field build.{key} must be a string or an integer")
    sections = m["sections"]
    if not isinstance(sections, list):
        raise FormatError(f"{where}: manifest field sections must be a list")
    if len(sections) > MAX_SECTIONS:
        raise FormatError(f"{where}: the manifest lists {len(sections)} sections; the limit is {MAX_SECTIONS}")
    return m


def check_sections(sections, manifest_offset, where) -> dict[str, tuple[int, int, str]]:
    """Check the section table against the file's layout; return {name: (offset, length, sha256)}.

    Every section must have a known name (catalog, index, segment/NNNNNN; nothing is ever
    used as a file path), appear once, start on an ALIGN boundary inside [HEADER_PAGE,
    manifest offset), and overlap no other. Segments are numbered 1..n without gaps.
    """
    out = {}
    for i, s in enumerate(sections):
        if not isinstance(s, dict) or set(s) != SECTION_FIELDS:
            raise FormatError(f"{where}: section #{i} must be {{name, offset, length, sha256}}, got {str(s)[:200]}")
        name = s["name"]
        if not isinstance(name, str) or not SECTION_NAME.match(name):
            raise FormatError(
                f"{where}: section #{i} has the name {str(name)[:100]!r}; section names are 'catalog', 'index' or "
                "'segment/NNNNNN' (they are never paths)"
            )
        if name in out:
            raise FormatError(f"{where}: section {name!r} appears twice in the manifest")
        off, length, digest = s["offset"], s["length"], s["sha256"]
        if not (_is_int(off) and _is_int(length)) or off < 0 or length < 0:
            raise FormatError(
                f"{where}: section {name!r} has offset {off!r} and length {length!r}; both must be non-negative "
                "integers"
            )
        if off % ALIGN or off < HEADER_PAGE or off + length > manifest_offset:
            raise FormatError(
                f"{where}: section {name!r} is declared at [{off}, {off + length}), outside the file's section area "
                f"[{HEADER_PAGE}, {manifest_offset}) or not aligned to {ALIGN}; the manifest is wrong or the file "
                "truncated"
            )
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise FormatError(
                f"{where}: section {name!r} has sha256 {str(digest)[:80]!r}; expected 64 lowercase hex digits"
            )
        out[name] = (off, length, digest)
    for required in ("catalog", "index"):
        if required not in out:
            raise FormatError(f"{where}: the package has no {required!r} section")
    placed = sorted((off, off + length, name) for name, (off, length, _) in out.items())
    for (a0, a1, an), (b0, b1, bn) in zip(placed, placed[1:]):
        if b0 < a1:
            raise FormatError(f"{where}: sections {an!r} [{a0}, {a1}) and {bn!r} [{b0}, {b1}) overlap")
    numbers = sorted(int(n.split("/")[1]) for n in out if n.startswith("segment/"))
    if numbers != list(range(1, len(numbers) + 1)):
        raise FormatError(
            f"{where}: segment sections must be numbered 1..{len(numbers)} without gaps, got {numbers[:10]}"
        )
    return out


def check_counts(manifest, sections, where) -> None:
    counts = manifest["counts"]
    segments = [n for n in sections if n.startswith("segment/")]
    if counts["segments"] != len(segments):
        raise FormatError(
            f"{where}: the manifest counts {counts['segments']} segments but lists {len(segments)} segment sections"
        )
    seg_bytes = sum(sections[n][1] for n in segments)
    # every record is at least a 20-byte frame: a count the segments cannot hold is a lie,
    # refused before anything is sized by it
    if counts["memories"] * 20 > seg_bytes or counts["record_bytes"] > seg_bytes:
        raise FormatError(
            f"{where}: the manifest counts {counts['memories']} memories in {counts['record_bytes']} record bytes, "
            f"but the segments hold only {seg_bytes} bytes"
        )


# -- describe ------------------------------------------------------------------------------------


def describe(path) -> dict[str, object]:
    """A package's manifest as a flat, readable dict (for `m3db info FILE`). Reads only the
    header and the manifest; checks them, not the sections (that is verify's job)."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        frame = Frame(f, path)
    m = frame.manifest
    out = {
        "path": path,
        "package": f"m3db package format {m['format_version']}",
        "bytes": frame.size,
        "manifest_sha256": frame.manifest_sha256,
    }
    out.update({k: m["about"][k] for k in ABOUT_FIELDS if k in m["about"]})
    out.update(m["counts"])
    out["codec"] = f"{m['codec']['name']} v{m['codec']['version']}"
    out["spec"] = m["spec"]
    out["build"] = m["build"]
    out["sections"] = [
        f"{s['name']} @ {s['offset']} ({s['length']} bytes) sha256 {s['sha256'][:16]}..." for s in m["sections"]
    ]
    return out


def segment_number(name) -> int:
    return int(name.split("/")[1])


def section_name(number) -> str:
    return f"segment/{number:06d}"


def _not_json(constant):
    raise ValueError(f"{constant} is not a JSON number")


def _obj(m, key, where):
    value = m[key]
    if not isinstance(value, dict):
        raise FormatError(f"{where}: manifest field {key} must be an object, got {type(value).__name__}")
    return value


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


READ_STEP = 8 << 20  # sections are read in pieces of this size: bounded memory for any section


def section_pieces(mm, offset, length, hasher=None) -> Iterator[bytes]:
    """The bytes of a section in READ_STEP pieces (bounded memory), hashing them on the way."""
    end = offset + length
    for pos in range(offset, end, READ_STEP):
        piece = mm[pos : min(end, pos + READ_STEP)]
        if hasher is not None:
            hasher.update(piece)
        yield piece


def open_map(f) -> mmap.mmap | None:
    """A read-only mmap of the open file `f`, or None when it is empty."""
    size = os.fstat(f.fileno()).st_size
    return mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) if size else None


def check_segment_section(mm, offset, length, number, where) -> None:
    """A segment section starts with segment `number`'s header (storage's segment format)."""
    if length < SEGMENT_HEADER_SIZE:
        raise FormatError(f"{where}: segment section is {length} bytes, shorter than a segment header")
    check_segment_header(mm[offset : offset + SEGMENT_HEADER_SIZE], number, where)
