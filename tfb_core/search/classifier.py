"""Sigma on a classifier: the anchor-set objective the search (:mod:`tfb_core.search.strategy`) runs on.

The criterion compares the sigma = 0 model's own predictions on the anchor prompts (its argmax are
the pseudo-labels; with labels, its accuracy) with the mean of N posterior samples at each sigma.
All sigmas use one fixed standard-normal draw Z, scaled by sigma (common random numbers), so the
criterion is a smooth, deterministic function of sigma; several sigmas share batched forwards (each
job carries its own scaled draw). :func:`search_sigma` runs the search of a
:class:`~tfb_core.config.SearchConfig` on it: what start-up (:mod:`tfb_core.serving.startup`) and
``tfb eval`` call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tfb_core.bayes.posterior import NoiseDraw
from tfb_core.config import SearchConfig
from tfb_core.decide.uncertainty import accuracy, nll
from tfb_core.forward.classifier import BayesianClassifier
from tfb_core.forward.layout import Job
from tfb_core.search.strategy import Objective, SearchResult, search

log = logging.getLogger(__name__)


def anchor_objective(clf: BayesianClassifier, prompts: Sequence[str], cfg: SearchConfig, targets: torch.Tensor | None = None,
                     max_rows: int = 64, progress: bool = False) -> tuple[Objective, dict[str, float]]:
    """(objective over sigmas, reference figures of the sigma = 0 model) on an anchor set.

    All sigmas share one noise draw (common random numbers); a list of sigmas is evaluated in shared
    batched forwards.
    """
    if cfg.criterion == "accuracy" and targets is None:
        raise ValueError("criterion 'accuracy' needs a labelled anchor set")
    if not prompts:
        raise ValueError("the anchor set is empty")
    tokens = clf.tokenize(prompts)
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))  # similar lengths share a forward
    tokens, prompts = [tokens[i] for i in order], [prompts[i] for i in order]
    if targets is not None:
        targets = targets[order]
    ref = clf.sample_probs(prompts, 1, sigma=0.0, max_rows=max_rows)[:, 0]  # (B, C)
    pseudo = ref.argmax(-1)  # (B,)
    nll0 = nll(ref, pseudo)
    acc0 = accuracy(ref, targets) if targets is not None else float("nan")
    reference = {"nll_pseudo": nll0, "accuracy": acc0, "n_anchor": float(len(prompts))}
    draw = clf.posterior.draw(cfg.seed, cfg.n_samples)

    def criterion(mean_probs: torch.Tensor) -> float:  # (B, C)
        if cfg.criterion == "nll":
            return abs(nll(mean_probs, pseudo) - nll0) / max(nll0, 1e-12)
        if cfg.criterion == "flip":
            return float((mean_probs.argmax(-1) != pseudo).float().mean())
        return acc0 - accuracy(mean_probs, targets)

    def objective(sigmas: Sequence[float]) -> list[float]:
        # sigma is folded into each job's own draw so that several sigmas can share one forward:
        # per forward, the same prompts under each of up to max_rows // N sigmas (one shared-prefix
        # forward: every draw has as many rows)
        draws = [NoiseDraw(draw.seed, [z * s for z in draw.z]) for s in sigmas]
        per_sigma = max(1, max_rows // cfg.n_samples)
        bar = _progress(len(draws) * len(tokens), f"sigma search {', '.join(f'{s:.4g}' for s in sigmas)}", progress)
        means = torch.empty((len(sigmas), len(tokens), len(clf.labels)))  # (K, B, C)
        prefix = clf.shared_prefix(tokens)
        for k0 in range(0, len(draws), per_sigma):
            part = draws[k0:k0 + per_sigma]
            # a unit: one prompt under each sigma of this part, in one forward
            units = [[Job(t, cfg.n_samples, d) for d in part] for t in tokens]
            per_unit = len(part)
            results = clf.run_planned(units, max_rows, sigma=1.0, prefix=prefix,
                                      on_chunk=lambda n, _rows, k=per_unit: bar.update(n * k))
            for i, unit in enumerate(results):
                for k, r in enumerate(unit):
                    means[k0 + k, i] = r.mean(0)  # (C,)
        bar.close()
        return [criterion(means[k]) if s > 0 else 0.0 for k, s in enumerate(sigmas)]

    return objective, reference


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, unit="prompt")


def search_sigma(clf: BayesianClassifier, prompts: Sequence[str], cfg: SearchConfig, targets: torch.Tensor | None = None,
                 progress: bool = True, max_rows: int = 64,
                 observe: Callable[[Sequence[float], list[float]], None] | None = None) -> SearchResult:
    """Run the search of ``cfg`` on a model's anchor prompts (optionally labelled by ``targets``);
    ``observe(sigmas, values)`` after each evaluation of the objective (progress)."""
    objective, reference = anchor_objective(clf, prompts, cfg, targets, max_rows=max_rows, progress=progress)
    result = search(objective, cfg, observe)
    result.reference = reference
    log.info("sigma search (%s, %s <= %g): sigma=%.6g in %.1fs, %d evaluations", cfg.method, cfg.criterion,
             cfg.tolerance, result.sigma, result.seconds, result.n_evaluations)
    return result
