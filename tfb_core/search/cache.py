"""The sigma cache: one small JSON file per search, keyed by everything the result depends on.

The file name is the SHA-256 of the canonical key; the key itself is stored too and compared on
load, so a corrupt, truncated or mismatching file is ignored (with a warning) and recomputed,
never trusted. Files are written to a temporary name and renamed: a crash leaves no half file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from tfb_core.imports import closure, module_files
from tfb_core.search.strategy import SearchResult, check_result

log = logging.getLogger(__name__)

CACHE_FORMAT = 1

#: Where the computing code starts; a key hashes the source of every module of ``tfb_core`` these
#: import, directly or not, function-level imports included (:func:`code_sha256`), so an edit to any
#: of them computes again, where the package version (unchanged across commits) would serve a
#: result the new code would not give. Start-up's own glue (which files, splits and settings it
#: passes) is not hashed: what it hands the computation is in the key by value (anchor, labels,
#: search settings, sigma, N, seed, the adapter's weights).
#: A classifier's sigma search: the objective on the anchor set (its closure holds the search, the
#: classifier's N-sample forward, the posterior, the loading, the task's prompts).
CLASSIFIER_SEARCH = ("tfb_core.search.classifier",)
#: A generative adapter's: its objective, and the generator (built on the classifier) it decodes with.
#: Neither this nor :data:`CLASSIFIER_SEARCH` reaches the other's objective: an edit to the decoder
#: does not search every classifier's sigma again, nor an edit to the classification objective a
#: generative adapter's.
GENERATION_SEARCH = ("tfb_core.search.generation", "tfb_core.forward.generator", "tfb_core.forward.classifier")
#: The calibration (a classifier's; its key also holds the sigma key): the run in steps and the
#: engine whose ``sample`` is its forward. The engine imports the generator (a generative
#: adapter's warm-up), so an edit to the decoder calibrates a classifier again (not its sigma).
CALIBRATION = ("tfb_core.serving.calibrate", "tfb_core.serving.engine")
#: the folder of the package whose source is hashed (the tests point it at an edited copy)
PACKAGE_DIR = Path(__file__).resolve().parent.parent


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\x00")
    return h.hexdigest()


def code_sha256(roots: Sequence[str]) -> str:
    """SHA-256 of the source of every module in the import closure of ``roots`` within the package
    (:func:`hashed_modules`); read once per process per ``roots``."""
    return _code_sha256(tuple(roots), PACKAGE_DIR)


def hashed_modules(roots: Sequence[str]) -> list[str]:
    """The modules whose source :func:`code_sha256` of ``roots`` hashes, sorted."""
    return [name for name, _ in _closure(tuple(roots), PACKAGE_DIR)]


@functools.cache
def _closure(roots: tuple[str, ...], package_dir: Path) -> tuple[tuple[str, Path], ...]:
    known = module_files(package_dir.parent, [package_dir.name])
    return tuple((name, known[name]) for name in sorted(closure(roots, known)))


@functools.cache
def _code_sha256(roots: tuple[str, ...], package_dir: Path) -> str:
    h = hashlib.sha256()
    for name, path in _closure(roots, package_dir):
        h.update(name.encode() + b"\x00" + path.read_bytes() + b"\x00")
    return h.hexdigest()


def model_key(m: Any, model: Any) -> dict[str, Any]:
    """What identifies the base model in a key: ``m`` its :class:`~tfb_core.config.ModelConfig`, ``model``
    the loaded model (its config's JSON, so that another model under the same name is another key)."""
    model_config = getattr(model, "config", None)
    return {
        "base_model": m.model, "model_revision": m.model_revision, "model_subfolder": m.model_subfolder,
        "gguf_file": m.gguf_file,
        "base_config": sha256_text([model_config.to_json_string()]) if model_config is not None else None,
    }


def cache_path(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(canonical(key).encode()).hexdigest()[:32]
    return Path(cache_dir) / "sigma" / f"{digest}.json"


def load(cache_dir: str | Path, key: dict[str, Any],
         check: Callable[[SearchResult], None] | None = None) -> SearchResult | None:
    """The cached result for ``key``, or None (missing, corrupt, for another key, or refused by
    ``check``, a ``ValueError`` naming what is implausible: warned)."""
    path = cache_path(cache_dir, key)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != CACHE_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {CACHE_FORMAT}")
        if canonical(data["key"]) != canonical(key):
            log.warning("sigma cache %s holds another key; recomputing", path)
            return None
        result = SearchResult.from_dict(data["result"])
        if not (isinstance(result.sigma, (int, float)) and 0.0 <= result.sigma < float("inf")):
            raise ValueError(f"sigma {result.sigma!r}")
        if check is not None:
            check(result)
        return result
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("sigma cache %s is unreadable or implausible (%s); recomputing", path, exc)
        return None


def cached_sigma(cache_dir: str | Path, key: dict[str, Any], cfg: Any) -> SearchResult | None:
    """The sigma search cached for ``key``, if one a search with ``cfg`` (a
    :class:`~tfb_core.config.SearchConfig`) could have produced (:func:`tfb_core.search.check_result`),
    else None: the one read of a cached sigma, for the server's start-up and the library."""
    result = load(cache_dir, key, check=lambda r: check_result(r, cfg))
    if result is not None:
        log.info("sigma=%.6g from cache %s", result.sigma, cache_path(cache_dir, key))
    return result


def save(cache_dir: str | Path, key: dict[str, Any], result: SearchResult) -> Path:
    """Write atomically: a temporary file in the same folder, fsynced, then renamed into place."""
    path = cache_path(cache_dir, key)
    payload = json.dumps({"format": CACHE_FORMAT, "key": key, "result": result.to_dict()}, indent=1, sort_keys=True)
    return _write_atomic(path, payload)


def load_json(cache_dir: str | Path, key: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """Another cached result (e.g. ``kind="calibration"``) for ``key``, or None (missing, corrupt, other key)."""
    path = cache_path(cache_dir, key).parent.parent / kind / cache_path(cache_dir, key).name
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != CACHE_FORMAT or canonical(data["key"]) != canonical(key):
            log.warning("%s cache %s holds another key or format; recomputing", kind, path)
            return None
        return dict(data["result"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("%s cache %s is unreadable (%s); recomputing", kind, path, exc)
        return None


def save_json(cache_dir: str | Path, key: dict[str, Any], result: dict[str, Any], kind: str) -> Path:
    """Write ``result`` for ``key`` under ``kind/``, atomically as :func:`save`."""
    path = cache_path(cache_dir, key).parent.parent / kind / cache_path(cache_dir, key).name
    payload = json.dumps({"format": CACHE_FORMAT, "key": key, "result": result}, sort_keys=True)
    return _write_atomic(path, payload)


def _write_atomic(path: Path, payload: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
