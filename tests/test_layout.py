"""The package layout: imports point one way with no circle (scripts/check_imports.py), on this tree
and on a synthetic one where each rule is broken once."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import check_imports  # noqa: E402


def test_this_tree_has_no_import_circle_and_imports_point_one_way():
    edges = check_imports.graph()
    assert "tfb_core.serving.batch" in edges and "tfb_core.serving.engine" not in edges["tfb_core.serving.batch"]
    assert check_imports.violations(edges) == []


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in {"tfb_core/__init__.py": "", "app/__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_each_rule_is_caught_even_under_type_checking_and_inside_functions(tmp_path):
    root = _tree(tmp_path, {
        "tfb_core/serving/__init__.py": "",
        "tfb_core/serving/engine.py": "from tfb_core.serving import batch\n",
        "tfb_core/serving/batch.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                     "    from tfb_core.serving.engine import TFBEngine\n",
        "tfb_core/decide/__init__.py": "",
        "tfb_core/decide/conformal.py": "def f():\n    from tfb_core.forward import classifier\n",
        "tfb_core/forward/__init__.py": "",
        "tfb_core/forward/classifier.py": "import tfb_core.serving.engine\n",
        "tfb_core/search/strategy.py": "from app import main\n",
        "app/main.py": "from tfb_core.serving.engine import TFBEngine\n",
    })
    found = check_imports.violations(check_imports.graph(root))
    assert any("circle" in v and "tfb_core.serving.batch" in v and "tfb_core.serving.engine" in v for v in found)
    assert any(v.startswith("tfb_core.decide.conformal imports tfb_core.forward.classifier") for v in found)
    assert any(v.startswith("tfb_core.forward.classifier imports tfb_core.serving.engine") for v in found)
    assert any(v.startswith("tfb_core.search.strategy imports app.main") for v in found)
    assert not any(v.startswith("app.main") for v in found)  # app may import serving


def test_a_lazy_export_in_a_modules_getattr_is_not_an_import_of_it(tmp_path):
    """``tfb_core``'s ``__getattr__`` (PEP 562: run when a caller reads the name, not when the package is
    imported) imports the library's front: neither a circle here nor in every cache key's closure; an
    import anywhere else in the package's file still counts."""
    from tfb_core.imports import closure, module_files

    lazy = "def __getattr__(name):\n    from tfb_core.model import BayesianModel\n    return BayesianModel\n"
    root = _tree(tmp_path, {
        "tfb_core/__init__.py": "__version__ = '0'\n" + lazy,
        "tfb_core/model.py": "from tfb_core.serving import response\n",
        "tfb_core/serving/__init__.py": "",
        "tfb_core/serving/response.py": "from tfb_core import __version__\n",
    })
    assert check_imports.violations(check_imports.graph(root)) == []
    known = module_files(root, ["tfb_core"])
    assert closure(["tfb_core.serving.response"], known) == {"tfb_core", "tfb_core.serving", "tfb_core.serving.response"}
    (root / "tfb_core/__init__.py").write_text("__version__ = '0'\n" + lazy.replace("__getattr__", "load"))
    assert any("circle" in v for v in check_imports.violations(check_imports.graph(root)))
    assert "tfb_core.model" in closure(["tfb_core.serving.response"], module_files(root, ["tfb_core"]))
