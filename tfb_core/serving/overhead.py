"""A forward's fixed cost, measured once for a model on a machine and cached beside sigma.

    warm-up:  key = code + base model + dtype, device + machine + the measured forward's shape
              cache.load_json(key, "forward_overhead")  -> tokens        (a warm restart: no forward)
              else measure (forwards of 1 and up to 8 inputs, timed)  -> cache.save_json

The fixed cost (kernel launches, Python; in prompt tokens) plans a batch's forwards by length
(:func:`tfb_core.forward.planning.plan_chunks`). Timing it takes seconds on an idle machine and a
minute on a loaded one, which is when a restart happens; it depends on the hardware and the code,
not on the adapter's weights, so the key is the machine (CPU model, cores and torch's threads, GPU
name, torch's version), not the host name: a container moved to like hardware reuses it.
"""

from __future__ import annotations

import logging
import math
import os
import platform
from functools import cache as memoized
from pathlib import Path
from typing import Any

import torch

from tfb_core.config import ModelConfig
from tfb_core.data.loading import default_cache_dir
from tfb_core.forward.classifier import BayesianClassifier
from tfb_core.forward.layout import Job
from tfb_core.search import cache

log = logging.getLogger(__name__)

KIND = "forward_overhead"
#: the code the measured value depends on: the forward and its timing (forward.planning), with their
#: import closure (:func:`tfb_core.search.cache.code_sha256`)
CODE = ("tfb_core.forward.classifier",)


@memoized
def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(device: torch.device) -> dict[str, Any]:
    """The hardware and library a forward's speed depends on."""
    return {"cpu": _cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def overhead_key(m: ModelConfig, clf: BayesianClassifier, job: Job, sigma: float, max_rows: int,
                 prefix: int | None) -> dict[str, Any]:
    """Everything the measured fixed cost depends on: the code, the base model, its dtype and device,
    the machine, and the forwards timed (tokens, rows and copies of ``job``, the shared prefix)."""
    return {
        "code_sha256": cache.code_sha256(CODE), **cache.model_key(m, clf.model),
        "dtype": m.dtype, "device": str(clf.device), "load_in_8bit": m.load_in_8bit,
        "machine": machine_key(clf.device),
        "forward": {"tokens": len(job.tokens), "n_samples": job.n_samples, "sigma_zero": sigma == 0.0,
                    "max_rows": max_rows, "prefix": prefix},
    }


def forward_overhead(m: ModelConfig, clf: BayesianClassifier, job: Job, sigma: float, max_rows: int,
                     prefix: int | None) -> float | None:
    """The fixed cost of ``clf``'s forward in tokens, from the cache or measured now
    (:meth:`BayesianClassifier.measure_forward_overhead`, then cached); sets
    ``clf.forward_overhead_tokens``. None (nothing set or cached) when the timings do not resolve it."""
    key = overhead_key(m, clf, job, sigma, max_rows, prefix)
    folder = default_cache_dir(m.cache_dir)
    data = cache.load_json(folder, key, KIND)
    tokens = data.get("tokens") if data is not None else None
    if isinstance(tokens, (int, float)) and math.isfinite(tokens) and tokens >= 0:
        clf.forward_overhead_tokens = float(tokens)
        log.info("a forward's fixed cost: %.0f tokens (cached)", tokens)
        return float(tokens)
    if data is not None:
        log.warning("forward overhead cache holds %r; measuring again", data)
    overhead = clf.measure_forward_overhead(job, sigma, max_rows, prefix)
    if overhead is None:
        return None
    log.info("a forward's fixed cost: %.0f tokens (measured)", overhead)
    try:
        cache.save_json(folder, key, {"tokens": overhead}, KIND)
    except OSError as exc:  # a read-only cache: measured again at the next start, served all the same
        log.warning("forward overhead not cached (%s)", exc)
    return overhead
