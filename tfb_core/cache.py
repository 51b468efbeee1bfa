"""The sigma cache: one small JSON file per search, keyed by everything the result depends on.

The file name is the SHA-256 of the canonical key; the key itself is stored too and compared on
load, so a corrupt, truncated or mismatching file is ignored (with a warning) and recomputed,
never trusted. Files are written to a temporary name and renamed: a crash leaves no half file.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tfb_core.search import SearchResult

log = logging.getLogger(__name__)

CACHE_FORMAT = 1

#: The modules whose code computes what the sigma and calibration caches hold: their source is part
#: of the cache keys (:func:`code_sha256`), so a change to any of them recomputes, where the package
#: version (unchanged across commits) would serve a result the new code would not give.
COMPUTING_MODULES = (
    "tfb_core.search",  # the sigma search: bracket, bisection/grid, stopping rule
    "tfb_core.serving.sigma",  # the search's objective on the anchor set: criterion, common random numbers
    "tfb_core.bayes.posterior",  # the SVD re-parameterisation, the noise draws and the sigma / d scaling
    "tfb_core.bayes.routing",  # how each adapter's rows get its own LoRA and noise in a shared forward
    "tfb_core.bayes.lora",  # which modules carry LoRA and how A, B and the scaling are read from peft
    "tfb_core.data.loading",  # how the base model and adapter are loaded (dtype, attention, class tokens)
    "tfb_core.forward.classifier",  # the N-sample forward: padding, class-token logits, softmax
    "tfb_core.forward.layout",  # which rows and noise draws each input gets
    "tfb_core.forward.planning",  # how inputs are grouped into forwards (float order)
    "tfb_core.forward.prefix_cache",  # the shared instruction's keys/values reused by those forwards
    "tfb_core.data.tasks",  # prompt formats, truncation and labels: what the forward reads
    "tfb_core.decide.uncertainty",  # the summary (mean probabilities, mutual information) calibration fits
    "tfb_core.decide.conformal",  # the calibration itself: scores, Learn-then-Test grid and counts
    "tfb_core.serving.calibrate",  # the calibration's forward in steps, and what it fits on
)
#: what a generative adapter's search also runs (its key hashes both lists; a classifier's, the first
#: alone: an edit to the decoder does not search every classifier's sigma again)
GENERATION_MODULES = (
    "tfb_core.generation_sigma",  # a generative adapter's search objective: its greedy anchor answers, teacher-forced
    "tfb_core.forward.generator",  # the N-sample decode forward, its key/value cache
    "tfb_core.forward.decoding",  # greedy decoding from p-bar: the anchor answers
    "tfb_core.forward.decode_rows",  # which rows and noise each stream gets in a decode forward
    "tfb_core.forward.completion",  # a generation request: end of an answer (stop tokens)
    "tfb_core.data.generation",  # the chat rendering of anchor prompts, exact match (criterion 'accuracy')
)


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def sha256_text(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\x00")
    return h.hexdigest()


def code_sha256(generation: bool = False) -> str:
    """SHA-256 of the source of :data:`COMPUTING_MODULES` (and, for a generative adapter's search, of
    :data:`GENERATION_MODULES`; read once per process per list)."""
    return _sources_sha256(tuple(COMPUTING_MODULES) + (tuple(GENERATION_MODULES) if generation else ()))


@functools.cache
def _sources_sha256(modules: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for name in modules:
        # the file the import system would load, without importing it: a source checkout or a wheel's
        # installed copy alike
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ValueError(f"cache key: no source for module {name!r}")
        h.update(name.encode() + b"\x00" + Path(spec.origin).read_bytes() + b"\x00")
    return h.hexdigest()


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
