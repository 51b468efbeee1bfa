"""What ``tfb eval`` makes of the probabilities it computed: differences, OOD AUROC, plot, table.

Pure: per-method mean probabilities (and the result dict of :func:`tfb_core.evaluation.classification.evaluate`) in;
paired bootstrap intervals, AUROCs, the reliability diagram and the plain-text table out. No model,
no data loading: that is :mod:`tfb_core.evaluation.classification`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tfb_core.decide import selective
from tfb_core.decide.uncertainty import brier, classification_metrics, ece, nll, reliability_bins

METRICS = ("accuracy", "ece", "nll", "brier")
METHODS = ("mle", "tfb", "temperature", "tfb+temperature")
_METRIC_FNS: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {
    "accuracy": lambda p, y: float((p.argmax(1) == y).double().mean()), "ece": ece, "nll": nll, "brier": brier}


def bootstrap_differences(probs: dict[str, torch.Tensor], target: torch.Tensor, baseline: str = "mle",
                          n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, dict[str, Any]]:
    """Paired bootstrap of metric(method) - metric(baseline) over test examples.

    probs: method -> (B, C) mean probabilities on the same B examples. Returns, per method and
    metric, the observed difference and the percentile interval of ``level``.
    """
    gen = torch.Generator().manual_seed(seed)
    n = target.shape[0]
    idx = torch.randint(0, n, (n_boot, n), generator=gen)  # (n_boot, B)
    alpha = (1.0 - level) / 2
    out: dict[str, dict[str, Any]] = {}
    for name, p in probs.items():
        if name == baseline:
            continue
        rows: dict[str, Any] = {}
        for metric, fn in _METRIC_FNS.items():
            diff = fn(p, target) - fn(probs[baseline], target)
            if n_boot:
                d = torch.tensor([fn(p[i], target[i]) - fn(probs[baseline][i], target[i]) for i in idx])
                lo, hi = torch.quantile(d.double(), torch.tensor([alpha, 1 - alpha], dtype=torch.double)).tolist()
            else:
                lo = hi = float("nan")
            rows[metric] = {"diff": diff, "lo": lo, "hi": hi, "excludes_zero": bool(lo > 0 or hi < 0)}
        out[f"{name}-{baseline}"] = rows
    return out


def ood_auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float | None:
    """AUROC of a score (higher = more uncertain) separating OOD (positive) from in-distribution
    (:func:`tfb_core.decide.selective.auroc`)."""
    positive = torch.cat([torch.zeros(len(in_scores)), torch.ones(len(out_scores))]).bool()
    return selective.auroc(torch.cat([in_scores, out_scores]), positive)


def plot_reliability(probs: dict[str, torch.Tensor], target: torch.Tensor, path: str | Path,
                     title: str = "", n_bins: int = 15) -> Path:
    """Reliability diagrams (top) and confidence histograms (bottom), one column per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(probs)
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 6.0), sharex=True,
                             gridspec_kw={"height_ratios": [3, 1.3]}, squeeze=False)
    width = 1.0 / n_bins
    for j, name in enumerate(names):
        bins = reliability_bins(probs[name], target, n_bins)
        centers = [e + width / 2 for e in bins["edges"][:-1]]
        acc = [a if a == a else 0.0 for a in bins["accuracy"]]
        ax = axes[0][j]
        ax.bar(centers, acc, width=width, edgecolor="black", color="#4C72B0", label="accuracy")
        gap = [(c if c == c else 0.0) - a for c, a in zip(bins["confidence"], acc, strict=True)]
        ax.bar(centers, gap, bottom=acc, width=width, edgecolor="#C44E52", color="#C44E52", alpha=0.35,
               hatch="//", label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        m = classification_metrics(probs[name], target)
        ax.set_title(f"{name}\nACC {m['accuracy']:.3f}  ECE {m['ece']:.3f}  NLL {m['nll']:.3f}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        if j == 0:
            ax.set_ylabel("accuracy in bin")
            ax.legend(loc="upper left", fontsize=7)
        h = axes[1][j]
        h.bar(centers, [c / max(1.0, float(target.shape[0])) for c in bins["count"]], width=width,
              color="#55A868", edgecolor="black")
        h.set_xlabel("confidence")
        h.set_yscale("log")
        h.set_ylim(1e-3, 1.0)
        if j == 0:
            h.set_ylabel("fraction of examples")
    return selective.save_figure(fig, path, title)


def format_selective(sel: dict[str, Any]) -> list[str]:
    """Table lines of :func:`selective_metrics`."""
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [f"acting on uncertainty: sets and thresholds fitted on {sel['calibration']}, measured on "
             f"{sel['n_measured']} records ({sel['conformal_score']}{', Mondrian' if sel['mondrian'] else ''}, "
             f"delta {sel['risk_delta']})"]
    for name, m in sel["methods"].items():
        lines.append(f"  {name:<16} AURC " + ", ".join(f"{s} {v:.4f}" for s, v in m["aurc"].items())
                     + f" (optimal {m['aurc_optimal']:.4f}); error AUROC "
                     + ", ".join(f"{s} {f(v)}" for s, v in m["error_auroc"].items()))
        if "conformal" in m:
            lines.append(f"  {'':<16} coverage/set size " + ", ".join(
                f"alpha {a}: {r['coverage']:.3f}/{r['mean_set_size']:.2f}{'' if r['supported'] else ' (unsupported)'}"
                for a, r in m["conformal"].items()))
            for score, rows in m["abstention"].items():
                lines.append(f"  {'':<16} answered by {score:<18} " + ", ".join(
                    f"max_risk {r}: {f(v['coverage'])} (risk {f(v['selective_risk'])})" for r, v in rows.items()))
    return lines


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of the methods and the bootstrap intervals of their differences to MLE."""
    lines = [f"{result['task']}: n_test={result['n_test']} n_anchor={result['n_anchor']} sigma={result['sigma']:.5g} "
             f"N={result['n_samples']}  T(mle)={result['temperature']['mle']:.3f} T(tfb)={result['temperature']['tfb']:.3f}",
             f"{'method':<16}" + "".join(f"{m:>10}" for m in (*METRICS, "mean_mi"))]
    for name, m in result["methods"].items():
        lines.append(f"{name:<16}" + "".join(f"{m[k]:>10.4f}" for k in (*METRICS, "mean_mi")))
    if result.get("n_boot"):
        lines.append(f"differences to mle, {result['n_boot']} paired bootstrap resamples, 95% interval:")
        for pair, rows in result["differences"].items():
            lines.append(f"  {pair:<22}" + "  ".join(
                f"{k} {r['diff']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]{'*' if r['excludes_zero'] else ''}"
                for k, r in rows.items()))
    if "ood" in result:
        o = result["ood"]
        lines.append(f"OOD ({o['n_ood']}): AUROC confidence mle {o['auroc_confidence_mle']:.3f}, tfb "
                     f"{o['auroc_confidence_tfb']:.3f}; entropy mle {o['auroc_entropy_mle']:.3f}, tfb "
                     f"{o['auroc_entropy_tfb']:.3f}; MI tfb {o['auroc_mi_tfb']:.3f}")
    if result.get("selective"):
        lines += format_selective(result["selective"])
    return "\n".join(lines)
