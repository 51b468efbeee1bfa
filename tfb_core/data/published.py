"""The published TFB adapters (``FlyLee/bayesian-peft``), named by method, data set and seed.

The reference code's scripts load ``--load-lora-huggingface-repo FlyLee/bayesian-peft
--load-lora-path {method}/meta-llama/Meta-Llama-3.1-8B/{dataset}/{method}-{dataset}-sample10-eps0.05-
kllr0.0075-beta0.15-seed{seed}`` on ``meta-llama/Meta-Llama-3.1-8B``. ``parse("mle/winogrande_s/1")``
gives that repository, subfolder, base model and our task name.

The reference anchor set of a data set is its training split shuffled as ``datasets`` does with
seed 42, first 500 records (the reference's ``loader(split="train", subset_size=500,
subset_seed=42)``). :func:`reference_anchor` reads it with ``datasets`` once and caches it as
JSON Lines in the cache folder; offline and not cached, it says which file to give instead.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = "FlyLee/bayesian-peft"
BASE_MODEL = "meta-llama/Meta-Llama-3.1-8B"
METHODS = ("mle", "map", "blob")
SEEDS = (1, 2, 3)
#: data set (the reference's name) -> our task
DATASET_TASKS = {"winogrande_s": "winogrande", "winogrande_m": "winogrande", "ARC-Challenge": "arc_challenge",
                 "ARC-Easy": "arc_easy", "obqa": "openbookqa", "boolq": "boolq"}
#: data set -> (hub data set, config): the ids the reference's ``load_dataset`` names
#: ("winogrande", "ai2_arc", "openbookqa", "boolq") now redirect to
HUB_DATASETS: dict[str, tuple[str, str | None]] = {
    "winogrande_s": ("allenai/winogrande", "winogrande_s"), "winogrande_m": ("allenai/winogrande", "winogrande_m"),
    "ARC-Challenge": ("allenai/ai2_arc", "ARC-Challenge"), "ARC-Easy": ("allenai/ai2_arc", "ARC-Easy"),
    "obqa": ("allenai/openbookqa", "main"), "boolq": ("google/boolq", None),
}
ANCHOR_SIZE = 500
ANCHOR_SEED = 42
ANCHOR_SPLIT = "train"


class PublishedError(ValueError):
    """An unknown method, data set or seed, or a reference anchor that cannot be had."""


@dataclass(frozen=True)
class Published:
    """One published adapter: where it is, what it runs on, which task and anchor go with it."""

    method: str
    dataset: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}/{self.dataset}/{self.seed}"

    @property
    def repo(self) -> str:
        return REPO

    @property
    def subfolder(self) -> str:
        return (f"{self.method}/{BASE_MODEL}/{self.dataset}/{self.method}-{self.dataset}-sample10-eps0.05-kllr0.0075"
                f"-beta0.15-seed{self.seed}")

    @property
    def base_model(self) -> str:
        return BASE_MODEL

    @property
    def task(self) -> str:
        return DATASET_TASKS[self.dataset]


def _pick(kind: str, given: str, valid: tuple[str, ...]) -> str:
    for v in valid:
        if v.lower() == given.strip().lower():
            return v
    raise PublishedError(f"unknown {kind} {given!r} in the published adapter; valid: {', '.join(valid)} "
                         f"(write method/dataset/seed, e.g. mle/winogrande_s/1)")


def parse(spec: str) -> Published:
    """``method/dataset/seed`` (case-insensitive), e.g. ``blob/ARC-Challenge/2``."""
    parts = str(spec).strip().split("/")
    if len(parts) != 3:
        raise PublishedError(f"published adapter {spec!r}: write method/dataset/seed, e.g. mle/winogrande_s/1 "
                             f"(methods {', '.join(METHODS)}; data sets {', '.join(DATASET_TASKS)}; "
                             f"seeds {', '.join(map(str, SEEDS))})")
    method = _pick("method", parts[0], METHODS)
    dataset = _pick("data set", parts[1], tuple(DATASET_TASKS))
    seed = _pick("seed", parts[2], tuple(map(str, SEEDS)))
    return Published(method, dataset, int(seed))


# --- the reference anchor ----------------------------------------------------------------------
def reference_indices(n: int, size: int = ANCHOR_SIZE, seed: int = ANCHOR_SEED) -> list[int]:
    """Rows of ``dataset.shuffle(seed=seed).select(range(min(size, n)))`` for a data set of ``n`` rows.

    ``datasets`` shuffles with ``np.random.default_rng(seed).permutation(n)`` (its
    ``Dataset.shuffle``); pinned here so the anchor does not depend on the installed version.
    """
    import numpy as np

    return [int(i) for i in np.random.default_rng(seed).permutation(n)[:min(size, n)]]


def anchor_cache_path(dataset: str, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / "anchors" / f"{dataset}-{ANCHOR_SPLIT}-shuffle{ANCHOR_SEED}-{ANCHOR_SIZE}.jsonl"


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            for rec in records:
                f.write(json.dumps({k: _jsonable(v) for k, v in rec.items()}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # the commit point: never a half-written anchor file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def reference_anchor(dataset: str, cache_dir: str | Path) -> Path:
    """The JSON Lines file of ``dataset``'s reference anchor set, read with ``datasets`` on first use.

    Raises :class:`PublishedError` naming the file to give with ``--anchor`` when it is not cached
    and cannot be read (offline, ``datasets`` missing, hub unreachable).
    """
    if dataset not in HUB_DATASETS:
        raise PublishedError(f"no reference anchor for data set {dataset!r}; known: {', '.join(HUB_DATASETS)}")
    path = anchor_cache_path(dataset, cache_dir)
    if path.is_file():
        return path
    hub_id, config = HUB_DATASETS[dataset]
    what = (f"the reference anchor of {dataset} ({ANCHOR_SIZE} records of {hub_id}"
            f"{'/' + config if config else ''} {ANCHOR_SPLIT}, shuffled with seed {ANCHOR_SEED})")
    hint = (f"give --anchor FILE.jsonl (TFB_ANCHOR) with records of the data set's fields, or put that file at "
            f"{path}")
    if _offline():
        raise PublishedError(f"{what} is not cached and the hub is offline (HF_HUB_OFFLINE): {hint}")
    try:
        import datasets
    except ImportError as exc:
        raise PublishedError(f"{what} is read with the 'datasets' package, which is not installed "
                             f"(pip install 'tfb-serve[hub]'); or {hint}") from exc
    try:
        ds = datasets.load_dataset(hub_id, config, split=ANCHOR_SPLIT, cache_dir=str(Path(cache_dir) / "datasets"))
    except Exception as exc:  # network, auth, a renamed data set: all mean "not from the hub"
        raise PublishedError(f"cannot read {what}: {type(exc).__name__}: {str(exc)[:200]}; {hint}") from exc
    records = [dict(r) for r in ds.select(reference_indices(len(ds)))]
    _write_jsonl(path, records)
    log.info("cached %s at %s", what, path)
    return path


def task_dataset(task: str) -> str | None:
    """The one data set whose reference anchor a named task uses without a published adapter (None:
    no reference data set, or several, as WinoGrande's sizes S and M)."""
    found = [d for d, t in DATASET_TASKS.items() if t == task]
    return found[0] if len(found) == 1 else None
