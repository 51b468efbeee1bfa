"""tfb_core: Training-Free Bayesianization of LoRA adapters (no web imports).

    from tfb_core import BayesianModel      # the library in a few lines: tfb_core.model
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["BayesianModel", "__version__"]


def __getattr__(name: str) -> Any:
    # a lazy export (PEP 562): every module of the package runs this file first, and BayesianModel
    # brings the whole serving stack; only a reader of the name imports it. The import readers
    # (tfb_core.imports: the cache keys' closures, scripts/check_imports.py) do not count it as an
    # import of the package, since importing the package does not run it
    if name == "BayesianModel":
        from tfb_core.model import BayesianModel

        return BayesianModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
