"""The imports between a package's own modules, read from their source (``ast``), never imported.

    known = module_files(root, ["tfb_core"])        # module name -> file
    closure(["tfb_core.search.classifier"], known)      # every module of tfb_core that one imports, transitively

Every import statement counts, wherever it stands: at the top, inside a function, under
``if TYPE_CHECKING:``; but one: the body of a module's own ``__getattr__`` (PEP 562), a lazy export
that runs when a caller reads that name, never when the module is imported (``tfb_core``'s
``BayesianModel``: every module imports the package first, and must not import the serving stack
with it, nor have it in its closure). Two readers: :mod:`tfb_core.search.cache` hashes the source of the closure of the
code that computes a cached result (so an edit to any of it recomputes), and
``scripts/check_imports.py`` checks that the imports between packages point one way.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Module name -> file of every module of ``packages`` (folders under ``root``; a package's
    ``__init__`` as the package itself)."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(path: Path, name: str, known: dict[str, Path]) -> Iterator[str]:
    """The modules of ``known`` that ``path`` (module ``name``) imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    statements = [s for s in tree.body if not (isinstance(s, ast.FunctionDef) and s.name == "__getattr__")]
    for node in (n for s in statements for n in ast.walk(s)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` the module mod
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ``import a.b.c`` of a module: its longest known prefix
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


def closure(roots: Iterable[str], known: dict[str, Path]) -> set[str]:
    """``roots`` and every module of ``known`` they import, directly or not, with the packages
    above each (importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        if name not in known:
            raise ValueError(f"no module {name!r} among {len(known)} modules")
        seen.add(name)
        todo.extend(imports(known[name], name, known))
        todo.extend(p for p in _parents(name) if p in known)
    return seen


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]
