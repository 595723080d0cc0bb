"""The layers of docs/architecture.md, read from the source (ast) and enforced.

- each engine module imports only the layers its own may use (function-level imports too);
- bindings import only the engine's public API (`m3db`, `m3db.errors`, `m3db.extend`), the
  model and their own binding's package, and one binding never imports another's modules
  except through that binding's package (its __init__);
- no import cycles among m3db's modules (module-level imports: what runs at import time);
- no module imports another module's underscore names (m3db, model/ and bindings/);
- only storage/catalog.py (and sql/, which runs users' statements) imports duckdb, only
  storage/index.py imports usearch, and no engine module imports torch at module level.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = {"m3db": ROOT / "m3db", "m3db.model": ROOT / "model", "m3db.bindings": ROOT / "bindings"}
BASE = {"errors", "progress", "version"}  # every layer may use these
# layer -> the layers it may import (besides itself and BASE); "model" is m3db.model, lazily
ALLOWED = {
    "base": set(),
    "storage": set(),
    "search": {"storage"},
    "sql": {"storage", "search"},
    "package": {"storage", "search"},
    "knowledge": {"storage", "model"},
    "testing": {"storage"},
    # the facade: database.py, and beside it what composes databases (opening, package_set)
    "database": {"storage", "search", "sql", "package", "knowledge", "facade"},
    "facade": {"storage", "search", "sql", "package", "knowledge"},
    "extend": {"storage", "search", "sql", "package", "knowledge", "testing"},
    "cli": {"storage", "search", "sql", "package", "knowledge", "database", "facade", "model", "bindings"},
    "init": {"storage", "search", "sql", "package", "knowledge", "database", "facade", "cli", "testing"},
}
FACADE = {"opening", "package_set"}  # modules beside database.py: the facade's parts
# what a binding may import of the engine: the public API, on purpose (m3db/extend.py)
PUBLIC = {"m3db", "m3db.errors", "m3db.extend"}


def modules():
    """{dotted name: path} of every module of m3db, m3db.model and m3db.bindings."""
    out = {}
    for package, directory in PACKAGES.items():
        for path in directory.rglob("*.py"):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package] + parts)] = path
    return out


def imports(name, path):
    """[(imported module or name, level: 'module' or 'function', names imported, line)]."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found = []

    def visit(node, depth):
        for child in ast.iter_child_nodes(node):
            inner = depth or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((alias.name, "function" if depth else "module", [], child.lineno))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module
                found.append((target, "function" if depth else "module", [a.name for a in child.names], child.lineno))
            visit(child, inner)

    visit(tree, False)
    return found


def layer(name):
    parts = name.split(".")
    if parts[:2] in (["m3db", "model"], ["m3db", "bindings"]):
        return parts[1]
    if len(parts) == 1:
        return "init"
    if parts[1] in BASE:
        return "base"
    if parts[1] in FACADE:
        return "facade"
    return parts[1]


def resolve(target, names, known):
    """The m3db modules an import statement loads: the module, or for `from pkg import mod`, mod."""
    out = []
    if target in known:
        out.append(target)
    for n in names:
        if f"{target}.{n}" in known:
            out.append(f"{target}.{n}")
    return out


def test_layers_import_only_what_they_may():
    known = modules()
    bad = []
    for name, path in known.items():
        mine = layer(name)
        if mine in ("model", "bindings"):
            continue
        for target, _, names, line in imports(name, path):
            for module in resolve(target, names, known):
                theirs = layer(module)
                if theirs in (mine, "base") or theirs in ALLOWED[mine]:
                    continue
                bad.append(f"{path.relative_to(ROOT)}:{line}: the {mine} layer imports {module} ({theirs})")
    assert not bad, "\n".join(bad)


def test_bindings_use_only_the_public_api():
    known = modules()
    bad = []
    for name, path in known.items():
        if layer(name) != "bindings":
            continue
        room = ".".join(name.split(".")[:3])  # m3db.bindings.server, .transformers, .ray
        for target, _, names, line in imports(name, path):
            for module in resolve(target, names, known):
                if module in PUBLIC or layer(module) == "model":
                    continue
                if layer(module) == "bindings" and (module == room or module.startswith(room + ".")):
                    continue  # its own room
                if layer(module) == "bindings" and module.count(".") == 2:
                    continue  # another binding, through its package (the Ray build loads your transformers model)
                bad.append(f"{path.relative_to(ROOT)}:{line}: {name} imports {module}, not the public API")
    assert not bad, "\n".join(bad)


def test_the_bindings_have_their_rooms():
    known = modules()
    for room in ("server", "transformers", "ray", "mcp", "langchain", "llamaindex"):
        assert f"m3db.bindings.{room}" in known and (ROOT / "bindings" / room / "__init__.py").exists()
    flat = [p.name for p in (ROOT / "bindings").glob("*.py") if p.name != "__init__.py"]
    assert not flat, f"bindings/ holds rooms, not files: {flat}"


def test_no_module_is_over_600_lines():
    long = []
    for name, path in modules().items():
        n = len(path.read_text().splitlines())
        if n > 600:
            long.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not long, "split by concept (docs/architecture.md): " + "; ".join(long)


def test_the_model_and_bindings_do_not_import_the_engine():
    known = modules()
    bad = []
    for name, path in known.items():
        if layer(name) != "model":
            continue
        for target, _, names, line in imports(name, path):
            for module in resolve(target, names, known):
                if layer(module) not in ("model",):
                    bad.append(f"{path.relative_to(ROOT)}:{line}: m3db.model imports {module}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    known = modules()
    graph = {name: set() for name in known}
    for name, path in known.items():
        for target, level, names, _ in imports(name, path):
            if level == "module":
                graph[name].update(m for m in resolve(target, names, known) if m != name)
    # a package imports its own submodules at import time only through its __init__; an edge
    # from a submodule to its own package is how Python runs the package first: not a cycle
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    state, stack, cycles = {}, [], []

    def walk(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node)
    assert not cycles, "\n".join(cycles)


def test_no_underscore_names_across_modules():
    known = modules()
    bad = []
    for name, path in known.items():
        for target, _, names, line in imports(name, path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != name:
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {private} from {target}")
    assert not bad, "\n".join(bad)


def test_each_library_has_one_home():
    homes = {"duckdb": ("m3db.storage.catalog", "m3db.sql."), "usearch": ("m3db.storage.index",)}
    known = modules()
    bad = []
    for name, path in known.items():
        for target, level, _, line in imports(name, path):
            root = (target or "").split(".")[0]
            if root in homes and not any(name == h or (h.endswith(".") and name.startswith(h)) for h in homes[root]):
                bad.append(f"{path.relative_to(ROOT)}:{line}: imports {root}, whose home is {homes[root]}")
            if root == "torch" and level == "module" and layer(name) not in ("model", "bindings"):
                bad.append(f"{path.relative_to(ROOT)}:{line}: the engine imports torch at module level")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_the_layout():
    # the rules above are only worth something if they read the real tree
    known = modules()
    for expected in (
        "m3db.storage.catalog",
        "m3db.storage.writer",
        "m3db.search.plan",
        "m3db.sql.run",
        "m3db.package.store",
        "m3db.knowledge.ingest",
        "m3db.cli.main",
        "m3db.model.decoder",
    ):
        assert expected in known
    assert any(t == "m3db.storage.catalog" for t, *_ in imports("m3db.package.store", known["m3db.package.store"]))
    assert any(lvl == "function" for _, lvl, *_ in imports("m3db.knowledge.bundled", known["m3db.knowledge.bundled"]))
    assert layer("m3db.storage.catalog") == "storage" and layer("m3db.errors") == "base" and layer("m3db") == "init"
