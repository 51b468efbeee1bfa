"""Finding sigma: the largest sigma whose change on an anchor set stays within a tolerance.

The criterion is measured against the sigma = 0 model's own predictions (its argmax are the
pseudo-labels), with *common random numbers*: one fixed standard-normal draw Z, scaled by sigma,
so the criterion is a smooth, deterministic function of sigma and bisection is well posed.

Two strategies over an objective passed in as a function (sigmas -> criterion values): this
module knows no model, classifier or data, so it is testable on any function:
- :func:`bisect` -- geometric bisection, after expanding the bracket until it brackets the root;
- :func:`grid` -- the paper's parallel variant: K sigmas evaluated together (one batched pass on
  the model), then interpolation of the crossing (log-log), verified, up to 3 times.

The objective on a classifier's anchor set, and the search run on it, are
:mod:`tfb_core.search.classifier`'s; a generative adapter's, :mod:`tfb_core.search.generation`'s. The default
search of each kind is here (:func:`default_search`); a searched sigma is cached by
:func:`tfb_core.search.cache.cached_sigma` / :func:`tfb_core.search.cache.save`, for the server and the library alike.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tfb_core.config import PosteriorConfig, SearchConfig

log = logging.getLogger(__name__)

Objective = Callable[[Sequence[float]], list[float]]  # sigmas -> criterion values
GRID_REFINEMENTS = 3  # sequential single evaluations after the parallel grid

#: The search of a classifier unless one is configured: :class:`SearchConfig`'s defaults (``nll`` <=
#: 1.5, the reference's tolerance).
CLASSIFIER_SEARCH = SearchConfig()
#: The search of a generative adapter unless one is configured: the relative NLL change of the
#: sigma = 0 model's own greedy answers to the anchor prompts within 10 %. The classification default
#: (1.5, the reference's) flips a third of the demo's greedy answers and halves its accuracy; see
#: docs/results-generation.md for the measurement behind 0.1.
GENERATION_SEARCH = SearchConfig(criterion="nll", tolerance=0.1)


def default_search(generative: bool) -> SearchConfig:
    """The search of an adapter of this kind unless one is configured (the server's, the CLI's and
    the library's: :meth:`tfb_core.serving.config.EngineConfig.with_defaults` applies it)."""
    return GENERATION_SEARCH if generative else CLASSIFIER_SEARCH


@dataclass
class SearchPoint:
    sigma: float
    value: float
    ok: bool


@dataclass
class SearchResult:
    """The outcome of a sigma search; ``satisfied`` is False when even the smallest sigma tried broke
    the tolerance (then ``sigma`` is 0: no Bayesianization is the only safe answer)."""

    sigma: float
    value: float
    criterion: str
    tolerance: float
    satisfied: bool
    method: str
    history: list[SearchPoint] = field(default_factory=list)
    seconds: float = 0.0
    n_evaluations: int = 0
    reference: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchResult:
        d = dict(d)
        d["history"] = [SearchPoint(**p) for p in d.get("history", [])]
        return cls(**d)


class _Recorder:
    """Evaluates the objective, remembering every point."""

    def __init__(self, objective: Objective, tolerance: float) -> None:
        self.objective = objective
        self.tolerance = tolerance
        self.history: list[SearchPoint] = []

    def __call__(self, sigmas: Sequence[float]) -> list[SearchPoint]:
        values = self.objective(list(sigmas))
        if len(values) != len(sigmas):
            raise ValueError(f"objective returned {len(values)} values for {len(sigmas)} sigmas")
        points = [SearchPoint(float(s), float(v), bool(v <= self.tolerance)) for s, v in zip(sigmas, values, strict=True)]
        for p in points:
            log.info("sigma=%.6g criterion=%.6g %s", p.sigma, p.value, "ok" if p.ok else "over")
        self.history += points
        return points

    def one(self, sigma: float) -> SearchPoint:
        return self([sigma])[0]


def _bracket(rec: _Recorder, low: float, high: float, max_expansions: int) -> tuple[SearchPoint | None, SearchPoint | None]:
    """(largest known ok point, smallest known violating point), expanding the bracket as needed."""
    hi = rec.one(high)
    ok: SearchPoint | None = None
    for _ in range(max_expansions):
        if not hi.ok:
            break
        ok, hi = hi, rec.one(hi.sigma * 2.0)
    if hi.ok:
        return hi, None  # still within tolerance at the top of the expanded bracket
    if ok is not None:  # expanded upwards: the last ok point is the lower end
        return ok, hi
    lo = rec.one(low)
    for _ in range(max_expansions):
        if lo.ok:
            break
        hi, lo = lo, rec.one(lo.sigma / 2.0)
    return (lo if lo.ok else None), hi


def reachable_range(cfg: SearchConfig) -> tuple[float, float]:
    """The smallest and largest sigma a search with ``cfg`` can return, besides 0 (its bracket,
    expanded ``max_expansions`` times each way: by 2 for bisection, by the bracket's ratio for the grid)."""
    factor = 2.0 if cfg.method == "bisect" else cfg.high / cfg.low
    return cfg.low / factor**cfg.max_expansions, cfg.high * factor**cfg.max_expansions


def check_result(result: SearchResult, cfg: SearchConfig) -> None:
    """``ValueError`` unless ``result`` is one a search with ``cfg`` could have produced: a finite
    sigma >= 0 (as a given sigma must be), 0 or within :func:`reachable_range`, a finite criterion."""
    PosteriorConfig(sigma=result.sigma)  # finite, >= 0
    lo, hi = reachable_range(cfg)
    if result.sigma != 0.0 and not lo * (1 - 1e-9) <= result.sigma <= hi * (1 + 1e-9):
        raise ValueError(f"sigma {result.sigma!r} is outside what the search reaches [{lo:.3g}, {hi:.3g}]")
    if not math.isfinite(result.value):
        raise ValueError(f"criterion value {result.value!r} is not finite")
    if result.criterion != cfg.criterion:
        raise ValueError(f"criterion {result.criterion!r}, expected {cfg.criterion!r}")


def bisect(objective: Objective, cfg: SearchConfig) -> SearchResult:
    """Largest sigma with objective(sigma) <= tolerance, for a monotone objective.

    Safeguarded regula falsi: each step tries the log-log interpolation of the crossing and, when the
    previous step moved the same end of the bracket (where plain interpolation stalls), the
    geometric midpoint. It stops after ``iters`` steps, or once an ok point's criterion is within
    ``rtol`` of the tolerance: sigma is then as large as the tolerance allows, to that precision.
    """
    rec = _Recorder(objective, cfg.tolerance)
    ok, bad = _bracket(rec, cfg.low, cfg.high, cfg.max_expansions)
    note = ""
    if ok is not None and bad is not None:
        moved_ok: list[bool] = []  # which end each step moved
        for _ in range(cfg.iters):
            if ok.value >= (1.0 - cfg.rtol) * cfg.tolerance:
                break
            stalled = len(moved_ok) >= 2 and moved_ok[-1] == moved_ok[-2]
            if stalled or not bad.value > ok.value:
                guess = math.sqrt(ok.sigma * bad.sigma)
            else:
                guess = _interpolate(ok, bad, cfg.tolerance)
            mid = rec.one(guess)
            if mid.ok:
                ok = mid
            else:
                bad = mid
            moved_ok.append(mid.ok)
    elif bad is None:
        note = "the tolerance held at the top of the expanded bracket: sigma may be larger"
    return _result(rec, ok, cfg, "bisect", note)


def grid(objective: Objective, cfg: SearchConfig) -> SearchResult:
    """The parallel variant: K geometric grid points at once, then interpolate the crossing."""
    rec = _Recorder(objective, cfg.tolerance)
    low, high = cfg.low, cfg.high
    for _ in range(cfg.max_expansions + 1):
        sigmas = [low * (high / low) ** (k / (cfg.grid_size - 1)) for k in range(cfg.grid_size)]
        points = rec(sigmas)
        if points[-1].ok:  # root above the grid: move it up
            low, high = high, high * (high / low)
            continue
        if not points[0].ok:  # root below the grid
            low, high = low * (low / high), low
            if points[0].sigma < 1e-9:
                break
            continue
        break
    oks = [p for p in rec.history if p.ok]
    bads = [p for p in rec.history if not p.ok]
    ok = max(oks, key=lambda p: p.sigma) if oks else None
    bad = min((p for p in bads if ok is None or p.sigma > ok.sigma), key=lambda p: p.sigma, default=None)
    note = ""
    for _ in range(GRID_REFINEMENTS):  # interpolate the crossing, verify, tighten the bracket
        if ok is None or bad is None or not bad.value > ok.value:
            break
        check = rec.one(_interpolate(ok, bad, cfg.tolerance))
        if check.ok:
            ok = check
        else:
            bad = check
    if ok is not None and bad is None:
        note = "the tolerance held at the top of the grid: sigma may be larger"
    return _result(rec, ok, cfg, "grid", note)


def _interpolate(ok: SearchPoint, bad: SearchPoint, tolerance: float) -> float:
    """Where the criterion crosses the tolerance between two points.

    Log-log (a power law c * sigma^p, which the NLL change follows near 0) when both values are
    positive, else linear; kept inside the inner 90% of the bracket so that it always tightens.
    """
    if ok.value > 0 and bad.value > 0 and tolerance > 0:
        t = (math.log(tolerance) - math.log(ok.value)) / (math.log(bad.value) - math.log(ok.value))
        guess = math.exp(math.log(ok.sigma) + t * (math.log(bad.sigma) - math.log(ok.sigma)))
    else:
        guess = ok.sigma + (tolerance - ok.value) / (bad.value - ok.value) * (bad.sigma - ok.sigma)
    lo, hi = ok.sigma + 0.05 * (bad.sigma - ok.sigma), bad.sigma - 0.05 * (bad.sigma - ok.sigma)
    return min(max(guess, lo), hi)


def _result(rec: _Recorder, ok: SearchPoint | None, cfg: SearchConfig, method: str, note: str) -> SearchResult:
    if ok is None:
        note = "even the smallest sigma tried broke the tolerance: serving sigma = 0"
        log.warning(note)
    return SearchResult(sigma=ok.sigma if ok else 0.0, value=ok.value if ok else 0.0, criterion=cfg.criterion,
                        tolerance=cfg.tolerance, satisfied=ok is not None, method=method, history=rec.history,
                        n_evaluations=len(rec.history), note=note)


def search(objective: Objective, cfg: SearchConfig,
           observe: Callable[[Sequence[float], list[float]], None] | None = None) -> SearchResult:
    """The search of ``cfg`` on ``objective``; ``observe(sigmas, values)`` after each evaluation
    (progress: a background search shows it in /info)."""
    start = time.perf_counter()
    if observe is not None:
        inner = objective

        def objective(sigmas: Sequence[float]) -> list[float]:
            values = inner(sigmas)
            observe(sigmas, values)
            return values

    result = (grid if cfg.method == "grid" else bisect)(objective, cfg)
    result.seconds = time.perf_counter() - start
    return result
