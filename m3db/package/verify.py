"""Verifying a package: every byte read with bounded memory (sections hashed in READ_STEP
pieces), nothing written anywhere, nothing unpickled or executed. `verify(path)` returns a
VerifyReport naming each problem and where it is.
Imports: storage's public names and this package's manifest and export modules.
"""

import hashlib
import os

import numpy as np

from ..errors import FormatError, NotFoundError
from ..progress import progress_bar
from ..storage.codec import stored_codec
from ..storage.index import VectorIndex
from ..storage.record import decode_record
from ..storage.segment import HEADER_SIZE as SEG_HEADER_SIZE
from .export import read_catalog
from .manifest import (
    ALIGN,
    HEADER_PAGE,
    Frame,
    check_segment_section,
    open_map,
    section_name,
    section_pieces,
    segment_number,
)

MAX_PROBLEMS = 100


class VerifyReport:
    """What verify() found: `ok`, `problems` (each names where), the manifest, and what was read."""

    def __init__(self, path, problems, manifest, *, sections=(), memories_checked=0, bytes_read=0):
        self.path = path
        self.problems = problems
        self.ok = not problems
        self.manifest = manifest
        self.sections = list(sections)
        self.memories_checked = memories_checked
        self.bytes_read = bytes_read

    def to_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "ok": self.ok,
            "problems": self.problems,
            "sections": self.sections,
            "memories_checked": self.memories_checked,
            "bytes_read": self.bytes_read,
        }

    def __repr__(self):
        return f"<VerifyReport ok={self.ok} problems={len(self.problems)} memories={self.memories_checked}>"


def verify(path, *, arrays=True, progress=False) -> VerifyReport:
    """Check a package: the header, the manifest, every section's sha256, the layout (sections
    inside the file, aligned, not overlapping, zeros between them), the catalog's contents and
    counts, every record (decoded; arrays=False skips decoding tensors), and the index against
    the catalog. Returns a VerifyReport; nothing is written anywhere. progress=True draws a
    bar on stderr."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NotFoundError(f"no package file at {path!r}")
    problems = []

    def problem(text) -> None:
        if len(problems) < MAX_PROBLEMS:
            problems.append(text)
        elif len(problems) == MAX_PROBLEMS:
            problems.append("... more problems not listed")

    with open(path, "rb") as f:
        try:
            frame = Frame(f, path)
        except FormatError as e:
            return VerifyReport(path, [str(e).split("] ", 1)[-1]], None)
        mm = open_map(f)
    try:
        with progress_bar(progress, "memories", total=frame.manifest["counts"]["memories"], desc="verify") as bar:
            return _verify_sections(path, frame, mm, problem, problems, arrays, bar)
    finally:
        mm.close()


def _verify_sections(path, frame, mm, problem, problems, arrays, bar):
    manifest, sections = frame.manifest, frame.sections
    summary, bytes_read = [], HEADER_PAGE + len(frame.manifest_bytes)
    placed = sorted((off, length, name) for name, (off, length, _) in sections.items())
    pos = HEADER_PAGE
    for off, length, name in placed + [(frame.manifest_offset, 0, "manifest")]:
        if off - pos >= ALIGN:
            problem(
                f"bytes [{pos}, {off}) before section {name!r} are a gap of {off - pos} bytes; pack leaves less "
                f"than {ALIGN}"
            )
        if any(any(piece) for piece in section_pieces(mm, pos, off - pos)):  # (in pieces: a gap may be large)
            problem(f"bytes [{pos}, {off}) before section {name!r} should be zero padding; the file is damaged")
        pos = off + length
    intact = {}
    for off, length, name in placed:
        h = hashlib.sha256()
        for _ in section_pieces(mm, off, length, h):
            pass
        bytes_read += length
        intact[name] = h.hexdigest() == sections[name][2]
        if not intact[name]:
            problem(f"section {name!r} [{off}, {off + length}): sha256 mismatch, its bytes are damaged")
        summary.append({"name": name, "offset": off, "length": length, "ok": intact[name]})
    for name, (off, length, _) in sections.items():
        if name.startswith("segment/"):
            try:
                check_segment_section(mm, off, length, segment_number(name), f"section {name!r}")
            except FormatError as e:
                problem(str(e).split("] ", 1)[-1])
    # the catalog: parse it all, keeping only what checks the segments and the index
    where = "section 'catalog'"
    off, length, _ = sections["catalog"]
    loc = {"id": [], "segment": [], "offset": [], "length": [], "checksum": []}
    head = None
    try:
        for item in read_catalog(section_pieces(mm, off, length), where, manifest):
            if item[0] == "head":
                head = item[1]
            elif item[0] == "memories":
                for key in loc:
                    loc[key].append(np.asarray(item[1][key]))
    except FormatError as e:
        problem(str(e).split("] ", 1)[-1])
        head = None
    checked = 0
    if head is not None:
        loc = {k: (np.concatenate(v) if v else np.zeros(0, np.int64)) for k, v in loc.items()}
        codec = None
        try:
            codec = stored_codec(head["spec"].codec, head["codecs"])
        except FormatError as e:
            problem(str(e).split("] ", 1)[-1])
        checked = _verify_records(mm, sections, loc, problem, arrays, bar, codec)
        if int(loc["length"].sum()) != manifest["counts"]["record_bytes"]:
            problem(
                f"the manifest counts {manifest['counts']['record_bytes']} record bytes; the catalog's records take "
                f"{int(loc['length'].sum())}"
            )
        if intact.get("index"):
            _verify_index(mm, sections["index"], loc["id"], head["spec"].embedding_dim, problem)
    return VerifyReport(path, problems, manifest, sections=summary, memories_checked=checked, bytes_read=bytes_read)


def _verify_records(mm, sections, loc, problem, arrays, bar, codec):
    """Every record decodes, and the records tile their segment exactly (no gaps, no overlaps)."""
    order = np.lexsort((loc["offset"], loc["segment"]))
    checked = 0
    ends = {}
    for i in order.tolist():
        mid, seg, off, length, crc = (int(loc[k][i]) for k in ("id", "segment", "offset", "length", "checksum"))
        name = section_name(seg) if 0 < seg < 1_000_000 else f"segment/{seg}"
        where = f"memory {mid} ({name} @ {off})"
        if name not in sections:
            problem(f"{where}: the catalog points into a segment the package does not have")
            continue
        base, size, _ = sections[name]
        expected = ends.get(seg, SEG_HEADER_SIZE)
        if off != expected:
            problem(
                f"{where}: records of {name} should follow each other; expected offset {expected} (a gap or an overlap)"
            )
        ends[seg] = off + length
        if off + length > size:
            problem(f"{where}: bytes [{off}, {off + length}) lie outside the {size}-byte segment")
            continue
        try:
            decode_record(
                mm[base + off : base + off + length], where, expect_id=mid, expect_crc=crc, arrays=arrays, codec=codec
            )
        except FormatError as e:
            problem(str(e).split("] ", 1)[-1])
        checked += 1
        bar.update(1)
    for name, (base, size, _) in sections.items():
        if name.startswith("segment/") and ends.get(segment_number(name), SEG_HEADER_SIZE) != size:
            problem(
                f"section {name!r}: its records end at {ends.get(segment_number(name), SEG_HEADER_SIZE)}, the "
                f"section at {size}"
            )
    return checked


def _verify_index(mm, section, ids, dim, problem):
    off, length, _ = section
    index = VectorIndex.from_bytes(mm[off : off + length])  # only once the section's sha256 matched
    if index is None:
        problem("section 'index': USearch cannot load it")
        return
    if index.dim != dim or len(index) != len(ids):
        problem(
            f"section 'index': holds {len(index)} vectors of dimension {index.dim}; the catalog has {len(ids)} of "
            f"dimension {dim}"
        )
        return
    if not np.array_equal(np.sort(index.keys()), np.sort(ids)):
        problem("section 'index': its keys differ from the catalog's memory ids")
