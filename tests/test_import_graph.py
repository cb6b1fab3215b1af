"""The import graph points one way: data → model → backend → kernels, the programs and tools above
(docs/DESIGN.md §2). Imports are read with ``ast`` from the sources, never executed; every import counts,
a lazy one inside a function as much as one at the top of a module (it is the same dependency, paid later).

- a backend (``lenet_gpu.backends.*``) imports nothing above the backends: not the model, the programs,
  the data, the recipe or the self-test;
- the CPU harness for CUDA C (``lenet_gpu.harness``) imports no backend (the backends sit on top of it);
- the benchmarks (``bench``) import neither the training program nor ``scripts``;
- the package (``lenet_gpu``) imports neither ``bench`` nor ``scripts``;
- no two modules import each other, directly or round a longer circle.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TREES = ("lenet_gpu", "bench", "scripts")
#: what a backend may import from the package: itself, what it stands on, and the shared definitions below it
BACKEND_MAY_IMPORT = ("lenet_gpu.backends", "lenet_gpu.harness", "lenet_gpu.kernels", "lenet_gpu.errors",
                      "lenet_gpu.stepstate", "lenet_gpu.reference", "lenet_gpu.spec", "lenet_gpu.parity")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    mods = {}
    for tree in TREES:
        for path in sorted((ROOT / tree).rglob("*.py")):
            mods[module_name(path)] = path
    return mods


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of this project that ``name`` (the file ``path``) imports, resolved to module names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        while target and target not in known:  # lenet_gpu.model.LeNet5 → lenet_gpu.model
            target = target.rpartition(".")[0]
        if target:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                add(f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in known else origin)
    found.discard(name)
    return found


@functools.cache
def graph() -> dict[str, set[str]]:
    mods = all_modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def _in(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def arrows(g: dict[str, set[str]]) -> list[str]:
    """Every import that points the wrong way, as 'a -> b'."""
    bad = []
    for a, targets in sorted(g.items()):
        for b in sorted(targets):
            wrong = (
                (_in(a, "lenet_gpu.backends") and _in(b, "lenet_gpu")
                 and not any(_in(b, ok) for ok in BACKEND_MAY_IMPORT))
                or (_in(a, "lenet_gpu.harness") and _in(b, "lenet_gpu.backends"))
                or (_in(a, "bench") and (_in(b, "lenet_gpu.train") or _in(b, "scripts")))
                or (_in(a, "lenet_gpu") and (_in(b, "bench") or _in(b, "scripts")))
            )
            if wrong:
                bad.append(f"{a} -> {b}")
    return bad


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(g):
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(g.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_no_import_points_the_wrong_way():
    assert arrows(graph()) == []


def test_no_import_cycle():
    assert cycles(graph()) == []


@pytest.mark.parametrize("source, expect", [
    ({"lenet_gpu.backends.x": "from ..model import LeNet5"}, ["lenet_gpu.backends.x -> lenet_gpu.model"]),
    ({"lenet_gpu.backends.x": "from lenet_gpu import train"}, ["lenet_gpu.backends.x -> lenet_gpu.train"]),
    ({"lenet_gpu.harness.x": "def f():\n    from ..backends.base import Backend"},
     ["lenet_gpu.harness.x -> lenet_gpu.backends.base"]),
    ({"bench.x": "import lenet_gpu.train"}, ["bench.x -> lenet_gpu.train"]),
    ({"lenet_gpu.x": "from bench import peer"}, ["lenet_gpu.x -> bench.peer"]),
    ({"lenet_gpu.backends.x": "from ..stepstate import STEP\nfrom ..errors import BackendUnavailable"}, []),
])
def test_the_checks_can_fail(tmp_path, source, expect):
    """The checks on a made-up tree: each wrong arrow is found, and a right one is not."""
    files = {"lenet_gpu.model": "", "lenet_gpu.train": "", "lenet_gpu.stepstate": "", "lenet_gpu.errors": "",
             "lenet_gpu.backends.base": "", "bench.peer": "", **source}
    mods = {}
    for name, text in files.items():
        path = tmp_path / (name.replace(".", "/") + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        mods[name] = path
    known = set(mods) | {"lenet_gpu", "lenet_gpu.backends", "lenet_gpu.harness", "bench"}
    g = {name: imports_of(name, path, known) for name, path in mods.items()}
    assert arrows(g) == expect


def test_a_cycle_is_found():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
