"""Hostile packages: crafted files that are truncated, damaged, or lie with consistent hashes.

Each must give a clear FormatError (or, from verify, a report naming the problem) before
anything large is allocated, and nothing outside the cache directory may be written.
The lying files are assembled by `assemble`, which recomputes every hash and the header, so
that the lie itself is the only fault and the deeper checks, not the hashes, must catch it."""

import copy
import hashlib
import io
import json
import os
import re
import tracemalloc
import zlib

import msgpack
import numpy as np
import pytest
from conftest import make_memory, small_spec

import m3db
from m3db.package.manifest import HEADER, HEADER_CRC, HEADER_PAGE, MAGIC, align, dump_manifest, pack_header

ALLOC_LIMIT = 24 << 20  # bytes of Python/numpy memory an open of a hostile file may peak at


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small intact package, and its manifest and sections as plain bytes."""
    root = tmp_path_factory.mktemp("base")
    with m3db.connect(root / "kb", spec=small_spec()) as db:
        db.add_memories(
            [
                make_memory(i, metadata={"lang": "en" if i % 2 else "fr", "info": {"i": i}}, document=f"d{i % 3}")
                for i in range(24)
            ]
        )
        db.pack(root / "kb.m3kb")
    data = open(root / "kb.m3kb", "rb").read()
    _, _, _, _, m_off, m_len, _ = HEADER.unpack_from(data)
    manifest = json.loads(data[m_off : m_off + m_len])
    sections = {s["name"]: data[s["offset"] : s["offset"] + s["length"]] for s in manifest["sections"]}
    return data, manifest, sections


def assemble(manifest, sections, *, lie=None, raw_manifest=None):
    """A package file: sections laid out aligned with true offsets and hashes, then `lie(m)`
    changes the manifest, which is framed by a header whose hash and crc agree with it."""
    out = bytearray(HEADER_PAGE)
    entries = []
    for s in manifest["sections"]:
        body = sections[s["name"]]
        out += bytes(align(len(out)) - len(out))
        entries.append(
            {"name": s["name"], "offset": len(out), "length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        )
        out += body
    m = copy.deepcopy(manifest)
    m["sections"] = entries
    if lie:
        lie(m)
    raw = raw_manifest if raw_manifest is not None else dump_manifest(m)
    out += bytes(align(len(out)) - len(out))
    m_off = len(out)
    out += raw
    out[:HEADER_PAGE] = pack_header(m_off, raw)
    return bytes(out)


def catalog_objects(sections):
    return list(msgpack.Unpacker(io.BytesIO(sections["catalog"]), raw=False))


def with_catalog(sections, objects=None, raw=None):
    out = dict(sections)
    out["catalog"] = raw if raw is not None else b"".join(msgpack.packb(o, use_bin_type=True) for o in objects)
    return out


def header_with(data, **fields):
    """The file with header fields replaced and the header crc recomputed (a consistent lie)."""
    names = ("magic", "version", "flags", "reserved", "m_off", "m_len", "m_hash")
    values = dict(zip(names, HEADER.unpack_from(data)))
    values.update(fields)
    head = HEADER.pack(*(values[n] for n in names))
    head += HEADER_CRC.pack(zlib.crc32(head))
    return head + data[len(head) :]


def tree(root, skip):
    out = {}
    for d, _, files in os.walk(root):
        if os.path.abspath(d).startswith(os.path.abspath(skip)):
            continue
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), root)] = (st.st_size, st.st_mtime_ns)
    return out


def refuse(tmp_path, data, match, *, verify_match=None):
    """Write `data` as a package; opening it must raise FormatError matching `match` with little
    memory allocated and nothing written outside the cache (which must hold no entry), and
    verify must report it."""
    path = tmp_path / "hostile.m3kb"
    path.write_bytes(data)
    cache = tmp_path / "cache"
    before = tree(tmp_path, cache)
    tracemalloc.start()
    try:
        with pytest.raises(m3db.FormatError, match=match):
            m3db.connect(path, config={"cache_dir": str(cache)})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < ALLOC_LIMIT, f"opening a hostile file allocated {peak} bytes"
    assert tree(tmp_path, cache) == before
    if cache.exists():
        assert os.listdir(cache / "packages") == [], "a failed open left a cache entry or a temporary directory"
    report = m3db.verify(path)
    assert not report.ok
    if verify_match:
        assert any(re.search(verify_match, p) for p in report.problems), report.problems
    return report


def test_the_assembler_makes_intact_packages(base, tmp_path):
    data, manifest, sections = base
    assert assemble(manifest, sections) == data  # so every lie below is the only fault
    path = tmp_path / "ok.m3kb"
    path.write_bytes(data)
    assert m3db.verify(path).ok


# -- truncation and flipped bytes ---------------------------------------------------------------


def test_truncated_anywhere(base, tmp_path):
    data = base[0]
    rng = np.random.default_rng(1)
    cuts = [0, 7, 8, 60, 100, 4095, 4096, 5000, len(data) - 1] + rng.integers(1, len(data), 6).tolist()
    for cut in cuts:
        refuse(tmp_path, data[:cut], "too short|truncated|not an m3db package|manifest")


@pytest.mark.parametrize("region", ["magic", "header", "header padding", "catalog", "index", "manifest", "padding"])
def test_flipped_byte_in_every_region(base, tmp_path, region):
    data, manifest, _ = base
    sec = {s["name"]: s for s in manifest["sections"]}
    if region in ("catalog", "index"):
        pos = sec[region]["offset"] + sec[region]["length"] // 2
    else:
        pos = {
            "magic": 2,
            "header": 20,
            "header padding": 1000,
            "manifest": len(data) - 10,
            "padding": sec["catalog"]["offset"] - 1,
        }[region]
    bad = bytearray(data)
    bad[pos] ^= 0x10
    bad = bytes(bad)
    if region == "padding":  # harmless to readers, but verify must say the file is not intact
        path = tmp_path / "pad.m3kb"
        path.write_bytes(bad)
        assert any("zero padding" in p for p in m3db.verify(path).problems)
        return
    match = {
        "magic": "not an m3db package",
        "header": "header is corrupt",
        "header padding": "stray bytes",
        "catalog": "catalog",
        "index": "index' fails its sha256",
        "manifest": "manifest's sha256",
    }[region]
    refuse(tmp_path, bad, match, verify_match="sha256" if region in ("catalog", "index") else match)


def test_flipped_bytes_in_the_segment_are_found_on_read_and_by_verify(base, tmp_path):
    data, manifest, _ = base
    seg = next(s for s in manifest["sections"] if s["name"] == "segment/000001")
    rng = np.random.default_rng(2)
    bad = bytearray(data)
    for pos in rng.integers(seg["offset"] + 16, seg["offset"] + seg["length"], 8):
        bad[pos] ^= 0xFF
    path = tmp_path / "seg.m3kb"
    path.write_bytes(bytes(bad))
    report = m3db.verify(path)
    assert any("segment/000001' [" in p and "sha256" in p for p in report.problems)
    assert any(p.startswith("memory ") for p in report.problems)
    damaged = 0
    with m3db.connect(path, config={"cache_dir": str(tmp_path / "cache")}) as p:
        for i in range(24):
            try:
                p.get(i)
            except m3db.FormatError as e:
                assert f"memory {i}" in str(e)
                damaged += 1
    assert damaged > 0


# -- a header or manifest that lies ---------------------------------------------------------------


def test_unknown_format_versions(base, tmp_path):
    data, manifest, sections = base
    refuse(tmp_path, header_with(data, version=2), "package format version 2; this m3db reads version 1")
    refuse(
        tmp_path,
        assemble(manifest, sections, lie=lambda m: m.update(format_version=2)),
        "manifest format version 2; this m3db reads version 1",
    )
    objects = catalog_objects(sections)
    objects[0]["version"] = 9
    refuse(tmp_path, assemble(manifest, with_catalog(sections, objects)), "catalog stream version 9")


def test_huge_declared_manifest(base, tmp_path):
    data = base[0]
    refuse(tmp_path, header_with(data, m_len=1 << 40), "manifest; the limit is")
    refuse(tmp_path, header_with(data, m_off=1 << 50), "declared at")


def lie_section(section, **fields):
    def lie(m):
        next(s for s in m["sections"] if s["name"] == section).update(fields)

    return lie


@pytest.mark.parametrize(
    "case,lie,match",
    [
        ("allocation bomb", lie_section("catalog", length=1 << 62), "outside the file's section area"),
        ("past the end", lie_section("index", length=10 << 20), "outside the file's section area"),
        ("unaligned", lie_section("catalog", offset=4097 + 4096), "not aligned"),
        ("into the header", lie_section("catalog", offset=0), "outside the file's section area"),
        ("negative", lie_section("catalog", offset=-4096), "non-negative"),
        ("overlap", lambda m: m["sections"][2].update(offset=m["sections"][1]["offset"]), "overlap"),
        ("duplicate", lambda m: m["sections"].append(dict(m["sections"][1])), "appears twice"),
        ("escape ../", lie_section("catalog", name="../../../outside/evil"), "never paths"),
        ("escape segment", lie_section("segment/000001", name="segment/../../x"), "never paths"),
        ("absolute", lie_section("index", name="/etc/passwd"), "never paths"),
        (
            "missing index",
            lambda m: m["sections"].remove(next(s for s in m["sections"] if s["name"] == "index")),
            "no 'index' section",
        ),
        ("segment gap", lie_section("segment/000001", name="segment/000002"), "numbered 1..1"),
        ("bad hash", lie_section("catalog", sha256="0" * 64), "catalog' fails its sha256"),
        ("bad index hash", lie_section("index", sha256="f" * 64), "index' fails its sha256"),
        ("hash not hex", lie_section("catalog", sha256="../x"), "64 lowercase hex"),
        ("count bomb", lambda m: m["counts"].update(memories=10**12), "segments hold only"),
        ("count lie", lambda m: m["counts"].update(memories=m["counts"]["memories"] - 1), "manifest counts 23"),
        ("documents lie", lambda m: m["counts"].update(documents=99), "manifest counts"),
        ("segments lie", lambda m: m["counts"].update(segments=3), "counts 3 segments"),
        ("record bytes lie", lambda m: m["counts"].update(record_bytes=m["counts"]["record_bytes"] - 1), None),
        ("unknown field", lambda m: m.update(plugin="import os"), "unknown \\['plugin'\\]"),
        ("about field", lambda m: m["about"].update(script="x"), "unknown manifest field about.script"),
        ("spec differs", lambda m: m["spec"].update(kv_heads=3), "spec differs from the manifest"),
        ("codec params", lambda m: m["codec"].update(params_sha256="a" * 64), "codec parameters"),
        ("too many sections", lambda m: m["sections"].extend([{}] * 70_000), "limit is 65536"),
    ],
)
def test_manifest_lies(base, tmp_path, case, lie, match):
    _, manifest, sections = base
    if match is None:  # harmless to a reader; verify must still say the package is not intact
        path = tmp_path / "lie.m3kb"
        path.write_bytes(assemble(manifest, sections, lie=lie))
        assert any("record bytes" in p for p in m3db.verify(path).problems)
        return
    refuse(tmp_path, assemble(manifest, sections, lie=lie), match, verify_match="sha256" if "hash" in case else match)


def test_manifest_that_is_not_canonical_json(base, tmp_path):
    _, manifest, sections = base
    refuse(tmp_path, assemble(manifest, sections, raw_manifest=json.dumps(manifest).encode()), "canonical")
    refuse(tmp_path, assemble(manifest, sections, raw_manifest=b"[" * 100_000 + b"]" * 100_000), "not valid JSON")
    refuse(tmp_path, assemble(manifest, sections, raw_manifest=b"\xff\xfe"), "not valid JSON")


# -- a catalog that lies --------------------------------------------------------------------------


def test_catalog_allocation_bombs(base, tmp_path):
    _, manifest, sections = base
    head = msgpack.packb(catalog_objects(sections)[0], use_bin_type=True)
    bombs = {
        "bin of 4 GB": b"\xc6\xff\xff\xff\xf0" + b"x" * 100,
        "array of 4G items": b"\xdd\xff\xff\xff\xff" + b"\x00" * 100,
        "map of 4G items": b"\xdf\xff\xff\xff\xff" + b"\x00" * 100,
        "str of 4 GB": b"\xdb\xff\xff\xff\xf0" + b"x" * 100,
    }
    for what, bomb in bombs.items():
        refuse(tmp_path, assemble(manifest, with_catalog(sections, raw=head + bomb)), "catalog", verify_match="catalog")
    # a chunk claiming a billion rows, and a chunk whose column claims more values than it has
    objects = catalog_objects(sections)
    chunk = next(o for o in objects if isinstance(o, dict) and o.get("t") == "memories")
    chunk["n"] = 10**9
    refuse(tmp_path, assemble(manifest, with_catalog(sections, objects)), "declares 1000000000 rows")


def mutate_chunk(sections, fn, table="memories"):
    objects = catalog_objects(sections)
    fn(objects[0], next(o for o in objects if isinstance(o, dict) and o.get("t") == table))
    return with_catalog(sections, objects)


@pytest.mark.parametrize(
    "case,fn,match",
    [
        ("count", lambda h, c: h.update(memories=25), "catalog declares 25 memories"),
        (
            "injection name",
            lambda h, c: h["memory_columns"].__setitem__(16, ['lang" VARCHAR); DROP TABLE meta; --', "VARCHAR"]),
            "column names are plain identifiers",
        ),
        (
            "injection type",
            lambda h, c: h["memory_columns"].__setitem__(16, ["lang", "VARCHAR); DROP TABLE meta; --"]),
            "allowed: BIGINT",
        ),
        ("builtin type", lambda h, c: h["memory_columns"].__setitem__(0, ["id", "VARCHAR"]), "built-in column id"),
        ("columns", lambda h, c: h["memory_columns"].pop(0), "do not start with m3db's built-in columns"),
        ("embedding size", lambda h, c: c.update(embedding=c["embedding"][:-4]), "embeddings are"),
        (
            "embedding nan",
            lambda h, c: c.update(embedding=np.full(len(c["embedding"]) // 4, np.nan, "<f4").tobytes()),
            "NaN",
        ),
        ("ids order", lambda h, c: c["columns"][0].reverse(), "ids must be unique and ascending"),
        ("id type", lambda h, c: c["columns"][0].__setitem__(0, "0"), "memories.id: values must be integers"),
        ("id range", lambda h, c: c["columns"][0].__setitem__(0, 2**64 - 1), "memories.id: values must be integers"),
        ("null text", lambda h, c: c["columns"][5].__setitem__(0, None), "NULL in a column"),
        (
            "ext type",
            lambda h, c: c["columns"][5].__setitem__(0, msgpack.ExtType(42, b"os.system")),
            "max_ext_len|ext|malformed",
        ),
        ("meta", lambda h, c: h["meta"].update(next_id="-1"), "next_id"),
        ("spec", lambda h, c: h["meta"].update(spec="{}"), "memory spec is invalid"),
        ("extra column", lambda h, c: c["columns"].append([1] * len(c["columns"][0])), "columns, its head declares"),
        ("header offset", lambda h, c: c["columns"][8].__setitem__(0, 3), "inside a segment header"),
        ("bad json", lambda h, c: c["columns"][14].__setitem__(0, "{not json"), "is not JSON"),
    ],
)
def test_catalog_lies(base, tmp_path, case, fn, match):
    _, manifest, sections = base
    objects = catalog_objects(sections)
    assert objects[0]["memory_columns"][15][0] == "info" and objects[0]["memory_columns"][16][0] == "lang"
    refuse(tmp_path, assemble(manifest, mutate_chunk(sections, fn)), match)


def test_catalog_stream_without_end_or_with_trailing_bytes(base, tmp_path):
    _, manifest, sections = base
    objects = catalog_objects(sections)
    refuse(tmp_path, assemble(manifest, with_catalog(sections, objects[:-1])), "without its end marker")
    refuse(tmp_path, assemble(manifest, with_catalog(sections, objects + [{"t": "end"}])), "follow the end")


def test_locations_that_lie_are_caught_on_read_and_by_verify(base, tmp_path):
    _, manifest, sections = base

    def swap(h, c):  # memory 0 points at memory 1's bytes and the other way round
        offsets = c["columns"][8]
        offsets[0], offsets[1] = offsets[1], offsets[0]
        lengths = c["columns"][9]
        lengths[0], lengths[1] = lengths[1], lengths[0]

    def far(h, c):
        c["columns"][8][2] = 1 << 40

    path = tmp_path / "lie.m3kb"
    path.write_bytes(assemble(manifest, mutate_chunk(sections, lambda h, c: (swap(h, c), far(h, c)))))
    with m3db.connect(path, config={"cache_dir": str(tmp_path / "cache")}) as p:
        with pytest.raises(m3db.FormatError, match="record holds memory 1, the catalog expected 0|checksum"):
            p.get(0)
        with pytest.raises(m3db.FormatError, match="lie outside the"):
            p.get(2)
        assert p.get(3).text == make_memory(3)["text"]
    problems = "\n".join(m3db.verify(path).problems)
    assert "memory 2" in problems and "outside" in problems and "memory 0" in problems


def test_an_index_that_does_not_fit_the_catalog(base, tmp_path):
    """An index section whose hash matches but which is not an index of this catalog: random
    bytes, or a real index of other ids."""
    _, manifest, sections = base
    bad = dict(sections)
    bad["index"] = np.random.default_rng(4).bytes(len(sections["index"]))
    refuse(
        tmp_path,
        assemble(manifest, bad),
        "section 'index' is not a USearch index of 24 vectors",
        verify_match="section 'index'",
    )
    from usearch.index import Index  # a well-formed index of the right size, with other keys

    other = Index(ndim=16, metric="cos", dtype="f16")
    other.add(
        np.arange(100, 124, dtype=np.uint64), np.random.default_rng(5).standard_normal((24, 16)).astype(np.float32)
    )
    bad["index"] = bytes(other.save())
    refuse(tmp_path, assemble(manifest, bad), "holds other ids than the catalog", verify_match="keys differ")


def test_magic_only_and_directories(tmp_path):
    (tmp_path / "magic.m3kb").write_bytes(MAGIC)
    with pytest.raises(m3db.FormatError, match="too short"):
        m3db.connect(tmp_path / "magic.m3kb", config={"cache_dir": str(tmp_path / "cache")})
    with pytest.raises(m3db.NotFoundError):
        m3db.verify(tmp_path / "missing.m3kb")
