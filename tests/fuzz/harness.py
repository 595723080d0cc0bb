"""The shared harness of the atheris fuzz targets (tests/fuzz/fuzz_*.py; docs/fuzzing.md).

A target module defines `TARGET = Target(name, one_input, allowed, seeds)`: `one_input(data)`
parses `data` the way m3db parses those bytes from a user, `allowed` are the only exceptions it
may raise (m3db's documented errors, docs/errors.md), `seeds()` the valid inputs the run starts
from. It imports what it fuzzes in an `instrumented(...)` block (coverage for those modules)
and ends with `if __name__ == "__main__": main(TARGET)`.

    python tests/fuzz/fuzz_record.py [libFuzzer flags] [corpus dirs]   # fuzz (atheris)
    python tests/fuzz/fuzz_record.py --replay [files or dirs]          # each input once

Fuzzing starts from the generated seeds and the committed corpus (tests/fuzz/corpus/<name>/);
new inputs go to the first corpus directory given, or a temporary one (the committed corpus
only changes by hand); a crashing input is written under $TMPDIR/m3db-fuzz-findings/<name>/
unless -artifact_prefix says where. M3DB_FUZZ_COLLECT=DIR records every distinct finding in
DIR and goes on (a long run) instead of stopping at the first. The address space is capped
(RLIMIT_AS: MEMORY_HEADROOM over what the process maps after its imports), so a length field
that makes a parser allocate gigabytes is a MemoryError: a finding, as is any exception outside
`allowed`, a failed assertion of what a parse promises, a crash or a hang (libFuzzer's -timeout).
"""

import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import os
import re
import resource
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterable

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
MEMORY_HEADROOM = 1 << 30  # bytes of address space a parser may add to what the imports took
TIMEOUT_S = 10  # libFuzzer's -timeout: one input that runs longer is a hang


@dataclasses.dataclass
class Target:
    name: str
    one_input: Callable[[bytes], None]
    allowed: tuple
    seeds: Callable[[], Iterable[bytes]]
    max_len: int = 4096

    def run_one(self, data: bytes) -> None:
        """Parse one input; an exception outside `allowed` propagates (a finding)."""
        with contextlib.suppress(*self.allowed):
            self.one_input(data)

    def collecting(self, directory: str) -> Callable[[bytes], None]:
        """run_one that records each distinct finding (exception type and where it was raised)
        in `directory`, its input and traceback, and goes on fuzzing (M3DB_FUZZ_COLLECT)."""
        seen = set()

        def run(data: bytes) -> None:
            try:
                self.run_one(data)
            except Exception as e:
                frame = traceback.extract_tb(e.__traceback__)[-1]
                key = f"{type(e).__name__}-{os.path.basename(frame.filename)}-{frame.lineno}"
                if key not in seen:
                    seen.add(key)
                    with open(os.path.join(directory, key), "wb") as f:
                        f.write(data)
                    with open(os.path.join(directory, key + ".txt"), "w") as f:
                        f.write(traceback.format_exc())
                    print(f"FINDING {key}", file=sys.stderr, flush=True)

        return run


# values that break parsers that trust a field's type or range: a structured input replaces
# fields of a valid one with these (tweak)
INTERESTING = (
    0,
    1,
    -1,
    255,
    256,
    2**31,
    2**32,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    0.5,
    -0.0,
    float("inf"),
    float("-inf"),
    float("nan"),
    1e300,
    "",
    "0",
    "x",
    "\u0663",  # an Arabic-Indic digit: str.isdigit() says yes, int() reads it
    "\u00b2",  # a superscript two: str.isdigit() says yes, int() refuses it
    None,
    True,
    False,
    [],
    {},
    [0, 1, 2, 3],
    {"a": 1},
    b"",
    b"\x00" * 8,
)
_INTERESTING = list(INTERESTING)
_JSON_INTERESTING = [v for v in INTERESTING if not isinstance(v, bytes)]
# op codes of tweak: most keep the node (and tweak its children), the rest change it
_KEEP, _PICK, _INT, _FLOAT, _DROP, _NEST = range(6)
_OPS = [_KEEP] * 10 + [_PICK, _PICK, _INT, _FLOAT, _DROP, _NEST]


def tweak(value, fdp, depth=0, interesting=_INTERESTING):
    """`value` (a tree of dicts, lists and scalars, such as a seed's parsed fields) with some
    nodes replaced as the fuzz bytes in `fdp` (an atheris.FuzzedDataProvider) say: by an
    INTERESTING value, any 64-bit integer or float, a deeper nesting, or dropped from its dict
    or list. Structure-aware fuzzing: a field reaches its parser with any type and value even
    when a checksum guards the bytes it is written in (the target writes it back and fixes the
    checksum)."""
    if not fdp.remaining_bytes():
        return value
    op = fdp.PickValueInList(_OPS)
    if op == _PICK:
        return copy.deepcopy(fdp.PickValueInList(interesting))
    if op == _INT:
        return fdp.ConsumeInt(8)
    if op == _FLOAT:
        return fdp.ConsumeFloat()
    if op == _NEST:
        return [value] if fdp.ConsumeBool() else {"a": value}
    if op == _DROP:
        return _DROPPED
    if depth > 16:
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            v = tweak(v, fdp, depth + 1, interesting)
            if v is not _DROPPED:
                out[k] = v
        return out
    if isinstance(value, list):
        return [x for x in (tweak(v, fdp, depth + 1, interesting) for v in value) if x is not _DROPPED]
    return value


_DROPPED = object()


def structured(seed_values, data, *, json=False):
    """One of `seed_values` (picked by the first byte) tweaked by the rest of `data`; the top
    level is never dropped. json: only values JSON can hold (no bytes)."""
    import atheris

    fdp = atheris.FuzzedDataProvider(data)
    value = tweak(fdp.PickValueInList(list(seed_values)), fdp, 0, _JSON_INTERESTING if json else _INTERESTING)
    return None if value is _DROPPED else value


def fuzzing() -> bool:
    """Whether this process runs a target to fuzz it (a script of this folder, not --replay)."""
    script = getattr(sys.modules["__main__"], "__file__", None) or ""
    return os.path.dirname(os.path.abspath(script)) == HERE and sys.argv[1:2] != ["--replay"]


def instrumented(*modules):
    """The block to import the fuzzed modules in: those named (modules, or packages: a name
    covers what lies under it) get atheris's coverage hooks when fuzzing; the rest of their
    packages, imported with them, does not (instrumenting all of m3db, or of sqlglot, costs
    seconds of every start). A replay, or a pytest run that imports a target, instruments nothing."""
    if not fuzzing():
        return contextlib.nullcontext()
    import atheris

    def named(module):
        return any(module == m or module.startswith(m + ".") for m in modules)

    packages = sorted({m.split(".")[0] for m in modules} | {"m3db"})
    others = [m for p in packages for m in _modules_of(p) if not named(m)]
    return atheris.instrument_imports(include=packages, exclude=others)


def _modules_of(package: str) -> list[str]:
    """Every module name of a package, from its source folders, without importing it (m3db's
    package-dir puts m3db.model in model/ and m3db.bindings in bindings/)."""
    if package == "m3db":
        root = os.path.dirname(os.path.dirname(HERE))
        folders = [(p, os.path.join(root, f)) for p, f in (("m3db", "m3db"), ("m3db.model", "model"))]
        folders.append(("m3db.bindings", os.path.join(root, "bindings")))
    else:
        folders = [(package, d) for d in importlib.util.find_spec(package).submodule_search_locations]
    names = []
    for name, folder in folders:
        for directory, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            parts = [p for p in os.path.relpath(directory, folder).split(os.sep) if p != "."]
            prefix = ".".join([name, *parts])
            names += [prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}" for f in files if f.endswith(".py")]
    return names


def scratch(name: str) -> str:
    """A temporary directory for a target's files: under $M3DB_FUZZ_TMP when set, else in RAM
    where /dev/shm is. libFuzzer ends the process without running atexit, so each name carries
    the process id and the next run removes those of processes that are gone."""
    base = os.environ.get("M3DB_FUZZ_TMP") or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    for entry in os.listdir(base):
        match = re.match(r"m3db-fuzz-(\d+)-", entry)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(os.path.join(base, entry), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"m3db-fuzz-{os.getpid()}-{name}-", dir=base)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def corpus_files(paths) -> list[str]:
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(os.path.join(p, f) for f in os.listdir(p) if not f.startswith("."))
        else:
            out.append(p)
    return out


def replay(target: Target, paths=None) -> list[tuple[str, str]]:
    """Run every file of `paths` (default: the committed corpus) once; [(file, traceback)] of
    those that raised something outside `allowed`."""
    paths = paths or [os.path.join(CORPUS, target.name)]
    failures = []
    for path in corpus_files(p for p in paths if os.path.exists(p)):
        with open(path, "rb") as f:
            data = f.read()
        try:
            target.run_one(data)
        except Exception:
            failures.append((path, traceback.format_exc()))
    return failures


def write_seeds(target: Target, directory: str) -> None:
    for data in target.seeds():
        name = hashlib.sha1(data).hexdigest()
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)


def cap_memory() -> None:
    """Cap the address space at what the process maps now plus MEMORY_HEADROOM."""
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = size + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(target: Target) -> None:
    args = sys.argv[1:]
    if args[:1] == ["--replay"]:
        failures = replay(target, args[1:])
        for path, tb in failures:
            print(f"{path}:\n{tb}", file=sys.stderr)
        sys.exit(1 if failures else 0)
    import atheris

    flags = [a for a in args if a.startswith("-")]
    dirs = [a for a in args if not a.startswith("-")]
    seeds = scratch(f"{target.name}-seeds")
    write_seeds(target, seeds)
    committed = os.path.join(CORPUS, target.name)
    if not dirs:
        dirs = [scratch(f"{target.name}-new")]
    dirs += [seeds] + ([committed] if os.path.isdir(committed) else [])
    findings = os.path.join(tempfile.gettempdir(), "m3db-fuzz-findings", target.name)
    os.makedirs(findings, exist_ok=True)
    defaults = {"-timeout": TIMEOUT_S, "-max_len": target.max_len, "-artifact_prefix": findings + os.sep}
    flags += [f"{k}={v}" for k, v in defaults.items() if not any(f.startswith(k + "=") for f in flags)]
    collect = os.environ.get("M3DB_FUZZ_COLLECT")
    if collect:
        os.makedirs(collect, exist_ok=True)
    cap_memory()
    atheris.Setup([sys.argv[0], *flags, *dirs], target.collecting(collect) if collect else target.run_one)
    atheris.Fuzz()
