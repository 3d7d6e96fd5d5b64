"""The package's shape, read from its source with `ast` (nothing is imported):

- no import circles between igpo_jax's modules (a lazy import inside a function counts: it is
  still a dependency, only a hidden one);
- no module imports another module's private (underscore) names, by `from m import _x` or `m._x`;
- the package root holds only the entry points, the run's wiring and the declared aliases;
- every package's `__init__.py` has a docstring (its job and what it may import), and a package
  imports only the packages it names there (MAY_IMPORT below).

Run alone (`python -m pytest tests/import_graph_test.py`) it also prints the graph's cycles: none.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import igpo_jax

PACKAGE_DIR = Path(igpo_jax.__file__).resolve().parent
ENTRY_POINTS = {"train", "evaluate", "export", "plan", "sweep", "report", "demo", "plot"}
WIRING = {"config_base", "components"}
# root modules that only forward a user-facing command to its module's new home
ALIASES = {"world": "igpo_jax.data.world"}
# package → the packages it may import (as its __init__.py docstring says); the entry points and
# the wiring at the root may import any package, no package imports the root
MAY_IMPORT = {
    "runtime": set(),
    "model": {"runtime"},
    "search": set(),
    "data": set(),
    "rollout": {"model", "search", "data", "runtime"},
    "igpo": {"model", "rollout", "data", "runtime"},
    "training": {"model", "igpo", "runtime"},
    "reporting": {"data", "rollout", "igpo"},
    "planning": {"model", "runtime", "rollout", "igpo", "training"},
}
# the documented exceptions: (importing module, imported module)
LAYER_EXCEPTIONS = {("igpo_jax.runtime.sharding", "igpo_jax.model.attention_mask")}


@dataclasses.dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module
    name: str | None  # the name taken from it (`from target import name`), None for the module
    line: int

    def site(self) -> str:
        taken = f"{self.target}.{self.name}" if self.name else self.target
        return f"{self.source}:{self.line} imports {taken}"


def modules(package_dir: Path, package: str) -> dict[str, Path]:
    """Dotted name → file, for every module of the package (a package is its __init__.py)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join((package,) + parts)] = path
    return out


def imports(package_dir: Path, package: str) -> list[Import]:
    """Every import of one of the package's modules by another, wherever it sits in the file."""
    known = modules(package_dir, package)
    found = []
    for source, path in known.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in known:
                        found.append(Import(source, alias.name, None, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(source, is_package, node.module, node.level)
                if base != package and not base.startswith(package + "."):
                    continue
                for alias in node.names:
                    if f"{base}.{alias.name}" in known:  # `from pkg import module`
                        found.append(Import(source, f"{base}.{alias.name}", None, node.lineno))
                    else:
                        found.append(Import(source, base, alias.name, node.lineno))
    return found


def _resolve(source: str, is_package: bool, module: str | None, level: int) -> str:
    if not level:
        return module or ""
    parts = source.split(".")
    base = parts if is_package else parts[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def private_imports(package_dir: Path, package: str) -> list[str]:
    """Sites where a module takes another's private name: `from m import _x`, or `m._x` on an
    imported module `m`."""
    found = []
    known = modules(package_dir, package)
    for imp in imports(package_dir, package):
        if imp.name and _private(imp.name) and imp.target != imp.source:
            found.append(imp.site())
    for source, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        bound = {}  # local name → module of the package
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(source, path.name == "__init__.py", node.module, node.level)
                for alias in node.names:
                    if f"{base}.{alias.name}" in known:
                        bound[alias.asname or alias.name] = f"{base}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in known and alias.asname:
                        bound[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and _private(node.attr)):
                found.append(f"{source}:{node.lineno} uses {bound[node.value.id]}.{node.attr}")
    return sorted(found)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def cycles(package_dir: Path, package: str) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected group
    of modules that import each other, directly or through others."""
    graph: dict[str, set[str]] = {m: set() for m in modules(package_dir, package)}
    for imp in imports(package_dir, package):
        if imp.target != imp.source:
            graph[imp.source].add(imp.target)
    out = []
    for group in _strongly_connected(graph):
        if len(group) > 1:
            out.append(_cycle_within(graph, group))
    return sorted(out)


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iteratively (no recursion limit to meet)."""
    index, low, on_stack, stack, groups, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                groups.append(group)
    return groups


def _cycle_within(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    parents, frontier = {}, [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & group):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return list(reversed(path)) + [start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle in {group}")  # unreachable for a strongly connected group


# ------------------------------------------------------------------------------------- the package


def test_no_import_cycles():
    found = cycles(PACKAGE_DIR, "igpo_jax")
    print(f"import cycles in igpo_jax: {len(found)}")
    assert not found, "import cycles:\n" + "\n".join(" → ".join(c) for c in found)


def test_no_module_imports_another_modules_private_names():
    found = private_imports(PACKAGE_DIR, "igpo_jax")
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_the_root_holds_entry_points_wiring_and_aliases():
    root = {p.stem for p in PACKAGE_DIR.glob("*.py")} - {"__init__"}
    allowed = ENTRY_POINTS | WIRING | set(ALIASES)
    assert root == allowed, f"unexpected at the package root: {sorted(root - allowed)}; missing: {sorted(allowed - root)}"


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_an_alias_only_forwards_to_its_module(alias):
    source = f"igpo_jax.{alias}"
    taken = {imp.target for imp in imports(PACKAGE_DIR, "igpo_jax") if imp.source == source}
    assert taken == {ALIASES[alias]}
    tree = ast.parse((PACKAGE_DIR / f"{alias}.py").read_text())
    assert ast.get_docstring(tree) and "alias" in ast.get_docstring(tree)
    definitions = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert not definitions, f"{source} defines {[d.name for d in definitions]}: an alias only forwards"


def test_each_package_imports_only_what_its_docstring_allows():
    packages = {p.parent.name for p in PACKAGE_DIR.glob("*/__init__.py")}
    assert packages == set(MAY_IMPORT), "a new package: say what it may import, here and in its docstring"
    package_of = lambda module: module.split(".")[1] if module.count(".") >= 2 else None  # None: the root
    found = []
    for imp in imports(PACKAGE_DIR, "igpo_jax"):
        source, target = package_of(imp.source), package_of(imp.target)
        if source is None or source == target or (imp.source, imp.target) in LAYER_EXCEPTIONS:
            continue
        if target is None or target not in MAY_IMPORT[source]:
            found.append(imp.site())
    assert not found, "imports across packages that their docstrings do not allow:\n" + "\n".join(found)


def test_every_package_says_its_job():
    for init in sorted(PACKAGE_DIR.rglob("__init__.py")):
        if init.parent == PACKAGE_DIR:
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc.split()) >= 15, f"{init.relative_to(PACKAGE_DIR.parent)}: a one-paragraph docstring " \
                                        f"saying the package's job and what it may import"


# --------------------------------------------------------------------------- the checks can fail


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_two_module_cycle_is_named(tmp_path):
    pkg = _write(tmp_path / "pkg", {
        "__init__.py": "",
        "a.py": "from pkg.sub import b\n",
        "sub/__init__.py": "",
        "sub/b.py": "def f():\n    from ..a import g  # lazy: still a dependency\n",
        "c.py": "import pkg.a as a_lib\n",  # into the cycle, not part of it
    })
    assert cycles(pkg, "pkg") == [["pkg.a", "pkg.sub.b", "pkg.a"]]


def test_a_longer_cycle_and_a_private_import_are_named(tmp_path):
    pkg = _write(tmp_path / "pkg", {
        "__init__.py": "",
        "a.py": "from pkg.b import run\n",
        "b.py": "from pkg.c import _helper, public\n",
        "c.py": "import pkg.a\nfrom pkg import d\nx = d._table\ny = d.__name__\n",
        "d.py": "_table = {}\n",
    })
    assert cycles(pkg, "pkg") == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert private_imports(pkg, "pkg") == ["pkg.b:1 imports pkg.c._helper", "pkg.c:3 uses pkg.d._table"]


def test_a_clean_package_passes(tmp_path):
    pkg = _write(tmp_path / "pkg", {
        "__init__.py": '"""Docstring."""\n',
        "a.py": "from pkg import b\nfrom pkg.b import run\n\ndef _mine():\n    return b.run\n",
        "b.py": "import json\n\ndef run():\n    return _local()\n\ndef _local():\n    return json\n",
    })
    assert cycles(pkg, "pkg") == [] and private_imports(pkg, "pkg") == []
