"""Check that imports between tfb_core's packages point one way, with no circle.

    python scripts/check_imports.py          # prints the package graph; exit status 1 on a violation

Every import statement counts, wherever it stands: at the top, inside a function, under
``if TYPE_CHECKING:`` (:mod:`tfb_core.imports` reads them). The rules (docs/architecture.md):

* no circle between modules of ``tfb_core`` or ``app``;
* ``tfb_core`` never imports ``app``;
* ``evaluation`` → ``serving`` → ``search`` → ``forward`` → ``bayes``; each of them → ``data`` and
  ``decide`` (the generation decode mixes its rows and picks tokens with ``decide.generation``'s pure
  functions); ``decide``, ``data`` and ``bayes`` import none of the others (and no other package
  imports ``serving`` but ``evaluation``, ``tfb_core.cli``, ``tfb_core.model`` and ``app``).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tfb_core.imports import imports, module_files  # noqa: E402  (the same reading as the cache keys')

PACKAGES = ("tfb_core", "app")
#: which of tfb_core's sub-packages each one may import (besides itself and tfb_core's top-level modules)
ALLOWED = {
    "bayes": set(),
    "data": set(),
    "decide": set(),
    "forward": {"bayes", "data", "decide"},
    "search": {"bayes", "data", "decide", "forward"},
    "serving": {"bayes", "data", "decide", "forward", "search"},
    "evaluation": {"bayes", "data", "decide", "forward", "search", "serving"},
}
#: top-level modules that may import ``serving`` (``app`` and the ``evaluation`` package may too): the
#: command line and the library's front (``tfb_core.model``: a served adapter's start-up and answers,
#: without a server)
SERVING_CLIENTS = {"tfb_core.cli", "tfb_core.model"}


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file of every module of :data:`PACKAGES` (a package's ``__init__`` as the package)."""
    return module_files(root, PACKAGES)


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(root)
    return {name: set(imports(path, name, known)) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def sub_package(module: str) -> str | None:
    """``bayes`` of ``tfb_core.bayes.posterior``; None for tfb_core's top-level modules and for app."""
    parts = module.split(".")
    return parts[1] if parts[0] == "tfb_core" and len(parts) > 2 or module in (
        f"tfb_core.{p}" for p in ALLOWED) else None


def violations(edges: dict[str, set[str]]) -> list[str]:
    out = [f"import circle: {' <-> '.join(c)}" for c in cycles(edges)]
    for src, targets in sorted(edges.items()):
        for dst in sorted(targets):
            if src.startswith("tfb_core") and dst.split(".")[0] == "app":
                out.append(f"{src} imports {dst}: tfb_core never imports app")
            a, b = sub_package(src), sub_package(dst)
            if (b == "serving" and a not in ("serving", "evaluation") and not src.startswith("app")
                    and src not in SERVING_CLIENTS):
                out.append(f"{src} imports {dst}: only {sorted(SERVING_CLIENTS)}, evaluation and app import serving")
            if a is not None and a in ALLOWED and b is not None and b != a and b not in ALLOWED[a]:
                out.append(f"{src} imports {dst}: {a} may import {sorted(ALLOWED[a]) or 'none of the others'}")
    return out


def package_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph folded onto sub-packages (tfb_core's top-level modules and app's by name)."""
    def fold(m: str) -> str:
        sub = sub_package(m)
        return f"tfb_core.{sub}" if sub else ("app" if m.startswith("app") else m)

    out: dict[str, set[str]] = {}
    for src, targets in edges.items():
        out.setdefault(fold(src), set()).update(fold(t) for t in targets if fold(t) != fold(src))
    return out


def main() -> int:
    edges = graph()
    for src, targets in sorted(package_edges(edges).items()):
        print(f"{src:<22} -> {', '.join(sorted(targets)) or '-'}")
    bad = violations(edges)
    for line in bad:
        print(f"VIOLATION: {line}")
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports, "
          f"{'no violations' if not bad else f'{len(bad)} violations'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
