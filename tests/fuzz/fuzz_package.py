"""Fuzz a package's frame: the header, the manifest and the section table (manifest.Frame, through
package.store.Package, what opening a `.m3kb` reads first, and manifest.describe, `m3db info`),
and the segment sections' headers.

The first byte's bits 0-1: 0, the rest is the whole file; 1, the rest is a manifest, placed
after a valid header (sha256 and crc32 made right here) and enough zero pages for its sections
(so mutations reach the manifest's checks); 2, the same after the manifest is rewritten in
canonical form when it is JSON; 3, the rest tweaks the fields of a valid manifest
(harness.tweak), written sorted and compact. Allowed: FormatError.
"""

import functools
import json
import os

from harness import Target, instrumented, main, scratch, structured

with instrumented("m3db.package.manifest", "m3db.package.store", "m3db.storage.segment", "m3db.storage.spec"):
    from m3db.errors import FormatError
    from m3db.package import manifest as mf
    from m3db.package.store import Package

import samples  # noqa: E402

DIRECTORY = scratch("package")
PATH = os.path.join(DIRECTORY, "fuzz.m3kb")
MAX_SECTION_AREA = 1 << 30  # zero pages before the manifest, sparse: nothing is written for them


@functools.cache
def seed_manifest() -> dict:
    seed = os.path.join(DIRECTORY, "seed.m3kb")
    with open(seed, "wb") as f:
        f.write(samples.package_file())
    with open(seed, "rb") as f:
        return mf.Frame(f, "seed").manifest


def manifest_offset(raw: bytes) -> int:
    """Where a manifest goes: after the sections it lists, as far as they can be read."""
    end = mf.HEADER_PAGE
    try:
        for s in json.loads(raw)["sections"]:
            end = max(end, int(s["offset"]) + int(s["length"]))
    except Exception:
        pass
    return min(mf.align(end), MAX_SECTION_AREA)


def manifest_of(data: bytes) -> bytes:
    """The manifest that input `data` (of mode 1, 2 or 3) stands for."""
    mode, body = data[0] & 3, data[1:]
    if mode == 2:
        try:
            return mf.dump_manifest(json.loads(body))
        except Exception:
            return body
    if mode == 3:
        value = structured([seed_manifest()], body, json=True)
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return body


def write_package(data: bytes) -> None:
    if data[0] & 3 == 0:
        with open(PATH, "wb") as f:
            f.write(data[1:])
        return
    body = manifest_of(data)
    offset = manifest_offset(body)
    with open(PATH, "wb") as f:
        f.write(mf.pack_header(offset, body))
        f.truncate(offset)
        f.seek(offset)
        f.write(body)


def one_input(data: bytes) -> None:
    if not data:
        return
    write_package(data)
    package = Package(PATH)
    frame = package.frame
    assert set(frame.sections) >= {"catalog", "index"}
    assert package.spec.to_dict() is not None
    info = mf.describe(PATH)
    assert info["manifest_sha256"] == frame.manifest_sha256
    with open(PATH, "rb") as f:
        mm = mf.open_map(f)
        try:
            for name, (offset, length, _) in frame.sections.items():
                if name.startswith("segment/"):
                    mf.check_segment_section(mm, offset, length, mf.segment_number(name), name)
        finally:
            mm.close()


def as_raw(data: bytes) -> bytes:
    """The input of mode 0 or 1 (a manifest as it is) that opens as `data` does: what the
    committed corpus keeps, so that it means the same whatever harness.tweak becomes."""
    return data if data[0] & 3 == 0 else b"\x01" + manifest_of(data)


def seeds():
    package = samples.package_file()
    raw = bytes(package[int.from_bytes(package[16:24], "little") :])  # the manifest: the file's last bytes
    yield b"\x00" + package
    yield b"\x01" + raw
    yield b"\x02" + raw
    yield b"\x03"


TARGET = Target("package", one_input, (FormatError,), seeds, max_len=20000)

if __name__ == "__main__":
    main(TARGET)
