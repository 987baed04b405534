"""The package's import graph: no cycle, and the lower layers never import the upper ones.

The graph is read from the source with `ast`, not from what Python happened to import: an import inside a
function or under TYPE_CHECKING counts as much as one at the top. A lazy import keeps a cycle from failing
at run time, not from tying the two modules together.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path

import langfuse_poller

PACKAGE = "langfuse_poller"
ROOT = Path(langfuse_poller.__file__).parent

Graph = dict[str, set[str]]


def modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package under `root` by its dotted name; a package is its `__init__`."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported(name: str, path: Path, known: Iterable[str], package: str) -> set[str]:
    """The modules of the package that module `name` imports anywhere in its source (relative imports
    resolved; `from a import b` is an import of module `a.b` when there is one, else of `a`)."""
    known = set(known)
    # a relative import starts from the module's package: the module itself when it is an __init__
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == package)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != package:
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    found.discard(name)
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> Graph:
    """Module -> the modules of the package it imports."""
    found = modules(root, package)
    return {name: imported(name, path, found, package) for name, path in found.items()}


def shortest_cycle(graph: Mapping[str, set[str]], start: str) -> list[str] | None:
    """The shortest chain of imports from `start` back to itself, if there is one."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for target in sorted(graph.get(module, ())):
            if target == start:
                cycle = [module]
                while cycle[-1] != start:
                    cycle.append(came_from[cycle[-1]])
                return [*reversed(cycle), start]
            if target not in came_from:
                came_from[target] = module
                queue.append(target)
    return None


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Every shortest cycle through some module, each once, the shortest first."""
    found: set[tuple[str, ...]] = set()
    for module in graph:
        cycle = shortest_cycle(graph, module)
        if cycle:
            # the same cycle, found from each module in it, is written once: from its first name
            ring = cycle[:-1]
            first = ring.index(min(ring))
            found.add((*ring[first:], *ring[:first], ring[first]))
    return [list(c) for c in sorted(found, key=lambda c: (len(c), c))]


def describe(cycle: Iterable[str]) -> str:
    return " -> ".join(name.removeprefix(f"{PACKAGE}.") for name in cycle)


def test_the_package_has_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(describe(cycle) for cycle in found)


def within(module: str, *parts: str) -> bool:
    """Whether `module` is one of the package's `parts` (a module or a subpackage) or inside one."""
    return any(module == f"{PACKAGE}.{part}" or module.startswith(f"{PACKAGE}.{part}.") for part in parts)


def reachable(graph: Mapping[str, set[str]], start: str) -> set[str]:
    """Every module that importing `start` may import, directly or through others."""
    seen: set[str] = set()
    stack = [start]
    while stack:
        for target in graph.get(stack.pop(), ()):
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def test_lower_layers_never_import_upper_ones() -> None:
    graph = import_graph()
    wrong = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            # the command line is the top: only `python -m langfuse_poller` starts it
            if within(target, "cli") and not within(module, "__main__"):
                wrong.append(f"{module} imports the command line")
            # the daemon and its operations wire the library together; the library never calls them
            if within(target, "service") and not within(module, "service", "cli"):
                wrong.append(f"{module} imports the service layer ({target})")
            # util/ is the bottom: the project's errors and util itself, nothing else
            if within(module, "util") and not within(target, "util", "errors"):
                wrong.append(f"{module} (util) imports {target}")
        if within(module, "notifiers") and f"{PACKAGE}.poller" in reachable(graph, module):
            wrong.append(f"{module} reaches the poller")
    assert not wrong, "\n".join(wrong)


def test_the_graph_sees_lazy_type_checking_and_relative_imports(tmp_path: Path) -> None:
    # a check that misses an import passes for the wrong reason: the reader is tried on a package made for it
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("from .top import VERSION\n")
    (root / "top.py").write_text("VERSION = 1\n")
    (root / "spine.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub.leaf import Leaf\n"
    )
    (root / "sub" / "__init__.py").write_text("from . import leaf\n")
    (root / "sub" / "leaf.py").write_text(
        "import os\nimport pkg.top\ndef later():\n    from ..spine import thing\n    from .. import VERSION\n"
    )
    graph = import_graph(root, "pkg")
    assert graph == {
        "pkg": {"pkg.top"},
        "pkg.top": set(),
        "pkg.spine": {"pkg.sub.leaf"},
        "pkg.sub": {"pkg.sub.leaf"},
        "pkg.sub.leaf": {"pkg", "pkg.top", "pkg.spine"},
    }
    assert cycles(graph) == [["pkg.spine", "pkg.sub.leaf", "pkg.spine"]]
