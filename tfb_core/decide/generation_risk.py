"""Risk-controlled generation and the confidence of an answer: what the completion routes decide.

* risk control (``max_risk``): answer only where a score's certainty clears a threshold that
  Learn-then-Test certifies on labelled calibration questions: the error rate among answered
  questions is <= max_risk with probability >= 1 - delta over the calibration draw, for questions
  exchangeable with the calibration set, decoded as the calibration was (the same N, posterior
  seed, answer mode, temperature 0). The procedure is classification's, once
  (:func:`tfb_core.decide.conformal.ltt_threshold`: exact binomial tails, the fallback procedure
  over a fixed grid); only the certainty differs: exp(-u) of a score u (higher = more likely
  wrong), which orders answers as u does and maps every score into (0, 1] (for the sequence NLL it
  is p̄(answer) itself). Correctness is ``tfb eval``'s exact match
  (:func:`tfb_core.decide.answers.exact_match`).
* the scores (:data:`RISK_SCORES`): the answer's sequence NLL under p̄ (``nll``), the NLL of the
  answer decoded at sigma = 0, i.e. by the plain adapter (``mle_nll``: the MLE's answer and score),
  the semantic entropy of the N posterior samples' own answers (``semantic_entropy``: per-sample
  mode, the majority answer), the largest token mutual information (``max_mi``).
* confidence: p̄(answer) = exp(-nll), read as the probability that the answer is right; its ECE
  (torchmetrics' binary calibration error, 15 equal-width bins), Brier and NLL against the
  correctness of the answers, and temperature scaling of it: sigmoid(logit(c) / T), which is
  temperature scaling of the two-class classifier "right / wrong" (the same
  :func:`~tfb_core.decide.uncertainty.fit_temperature`, on (1 - c, c)).

Functions over floats and tensors only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import torch

from tfb_core.decide.conformal import Threshold, confidence_grid, grid_counts, ltt_threshold
from tfb_core.decide.uncertainty import apply_temperature, fit_temperature


@dataclass(frozen=True)
class RiskScore:
    """How a served answer is decoded and read for one score."""

    name: str
    mode: Literal["mean", "per_sample"]  # the answer mode it needs (the request's ``answers``)
    mle: bool  # decoded at sigma = 0 (one row: the plain adapter), not under the posterior
    description: str


#: the scores' names (a settings type)
RiskScoreName = Literal["nll", "mle_nll", "semantic_entropy", "max_mi"]
RISK_SCORES: dict[str, RiskScore] = {s.name: s for s in (
    RiskScore("nll", "mean", False, "the answer's sequence NLL under p̄ (-sum_t log p̄(y_t))"),
    RiskScore("mle_nll", "mean", True, "the NLL of the answer decoded at sigma = 0 (the plain adapter's answer)"),
    RiskScore("semantic_entropy", "per_sample", False, "the semantic entropy of the N posterior samples' own "
              "greedy answers (the majority answer is served)"),
    RiskScore("max_mi", "mean", False, "the largest token mutual information of the answer"),
)}
assert set(get_args(RiskScoreName)) == set(RISK_SCORES)
#: the score a generative adapter's max_risk uses unless configured: the one that answered most at
#: the same guarantee on the demo's held-out questions (benchmarks/generation_risk.py: the MLE's
#: NLL, 0.12 answered at max_risk 0.1 against TFB's 0.05; at 0.2 0.41 both, within noise)
DEFAULT_RISK_SCORE = "mle_nll"
#: Learn-then-Test's thresholds on the certainty exp(-u), high to low, fixed before any data:
#: classification's grid, down to 0.01
GRID = confidence_grid(100)


def risk_score(name: str) -> RiskScore:
    """The score named ``name``; ``ValueError`` listing the known ones."""
    try:
        return RISK_SCORES[name]
    except KeyError:
        raise ValueError(f"unknown risk score {name!r}, expected one of {sorted(RISK_SCORES)}") from None


def score_value(score: str, info: Mapping[str, Any]) -> float:
    """The score u (higher = more likely wrong) of one served answer, from its result
    (:meth:`tfb_core.serving.generation.GenerationService.result_info`)."""
    if score == "semantic_entropy":
        return float(info["answers"]["semantic_entropy"])
    seq = info["completion"]["sequence"]
    return float(seq["max_mutual_information"] if score == "max_mi" else seq["nll"])


def certainty(u: float | torch.Tensor) -> Any:
    """exp(-u): the certainty Learn-then-Test thresholds (in (0, 1], decreasing in u)."""
    if isinstance(u, torch.Tensor):
        return torch.exp(-u.double())
    return math.exp(-u)


@dataclass(frozen=True)
class RiskCalibration:
    """A score's Learn-then-Test counts on labelled calibration questions (JSON-able for the cache),
    and the decode they hold for."""

    score: str
    n: int
    source: str
    grid: tuple[float, ...]
    answered: tuple[int, ...]  # per threshold, questions with certainty >= it
    errors: tuple[int, ...]  # per threshold, wrong answers among those
    accuracy: float  # of the calibration answers
    #: temperature of the answers' confidence exp(-nll) fitted on the calibration questions (by NLL)
    confidence_temperature: float
    n_samples: int
    seed: int
    sigma: float
    max_tokens: int

    @classmethod
    def fit(cls, score: str, u: torch.Tensor, wrong: torch.Tensor, nll: torch.Tensor, source: str = "",
            n_samples: int = 1, seed: int = 0, sigma: float = 0.0, max_tokens: int = 0) -> RiskCalibration:
        """From per-question scores ``u`` (n,), errors ``wrong`` (n,) bool and answer NLLs (n,)."""
        risk_score(score)
        n = int(u.shape[0])
        if n == 0 or wrong.shape[0] != n or nll.shape[0] != n:
            raise ValueError(f"need one score, error flag and NLL per calibration question, got {n}, "
                             f"{wrong.shape[0]}, {nll.shape[0]}")
        answered, errors = grid_counts(certainty(u), wrong, GRID)
        ok = ~wrong.bool()
        return cls(score, n, source, GRID, answered, errors, float(ok.double().mean()),
                   fit_confidence_temperature(answer_confidence(nll), ok), n_samples, seed, sigma, max_tokens)

    def threshold(self, max_risk: float, delta: float) -> Threshold:
        """The lowest certainty threshold certified for selective error <= max_risk w.p. >= 1 - delta."""
        if not 0.0 < max_risk < 1.0:
            raise ValueError(f"max_risk must be in (0, 1), got {max_risk}")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        return ltt_threshold(self.grid, self.answered, self.errors, self.n, max_risk, delta)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RiskCalibration:
        return cls(**{**d, "grid": tuple(d["grid"]), "answered": tuple(d["answered"]), "errors": tuple(d["errors"])})


def certified(u: torch.Tensor, wrong: torch.Tensor, max_risk: float, delta: float) -> Threshold:
    """The certified threshold of calibration scores ``u`` (n,) with errors ``wrong`` (n,)."""
    answered, errors = grid_counts(certainty(u), wrong, GRID)
    return ltt_threshold(GRID, answered, errors, int(u.shape[0]), max_risk, delta)


# --- confidence ----------------------------------------------------------------------------------
def answer_confidence(nll: torch.Tensor | float) -> Any:
    """p̄(answer) = exp(-nll): the probability the model gives its answer, read as that of being right."""
    return certainty(nll)


def _two_class(confidence: torch.Tensor) -> torch.Tensor:
    c = confidence.double().clamp(1e-12, 1.0 - 1e-12)
    return torch.stack([1.0 - c, c], dim=1)  # (B, 2): wrong, right


def fit_confidence_temperature(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """T minimising the NLL of sigmoid(logit(c) / T) against ``correct`` (temperature scaling of the
    two-class "right / wrong" probabilities); 1.0 when the answers are all right or all wrong."""
    ok = correct.bool()
    if bool(ok.all()) or not bool(ok.any()):
        return 1.0
    return fit_temperature(_two_class(confidence), ok.long())


def scale_confidence(confidence: torch.Tensor, temperature: float) -> torch.Tensor:
    """sigmoid(logit(c) / T) of confidences (B,)."""
    return apply_temperature(_two_class(confidence), temperature)[:, 1]


def confidence_metrics(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> dict[str, float]:
    """ECE (torchmetrics' binary calibration error, L1, ``n_bins`` equal-width bins), Brier
    mean (c - y)^2 and NLL mean -[y log c + (1 - y) log(1 - c)] of confidences (B,) that answers
    are right, against their correctness (B,); with the mean confidence and the accuracy."""
    from torchmetrics.functional.classification import binary_calibration_error

    c, y = confidence.double(), correct.bool()
    if c.shape[0] == 0 or y.shape[0] != c.shape[0]:
        raise ValueError(f"need one correctness flag per confidence (> 0), got {c.shape[0]} and {y.shape[0]}")
    yf = y.double()
    cc = c.clamp(1e-12, 1.0 - 1e-12)
    return {"ece": float(binary_calibration_error(c.float(), y.long(), n_bins=n_bins, norm="l1")),
            "brier": float(((c - yf) ** 2).mean()),
            "nll": float(-(yf * cc.log() + (1.0 - yf) * (1.0 - cc).log()).mean()),
            "mean_confidence": float(c.mean()), "accuracy": float(yf.mean())}


def confidence_report(confidence: Mapping[str, torch.Tensor], correct: Mapping[str, torch.Tensor],
                      baselines: Sequence[str], n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> dict[str, Any]:
    """Per method (confidences (B,) and the correctness (B,) of its own answers, the same B questions):
    :func:`confidence_metrics`; and per method and baseline, each metric's difference method -
    baseline with a paired percentile bootstrap interval (one resample of questions for all)."""
    names = list(confidence)
    n = int(next(iter(confidence.values())).shape[0])
    metrics = {k: confidence_metrics(confidence[k], correct[k]) for k in names}
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=gen)
    boot = {k: [confidence_metrics(confidence[k][i], correct[k][i]) for i in idx] for k in names}
    a = (1.0 - level) / 2
    diffs: dict[str, Any] = {}
    for b in baselines:
        for k in names:
            if k == b:
                continue
            rows = {}
            for m in ("ece", "brier", "nll"):
                d = torch.tensor([x[m] - y[m] for x, y in zip(boot[k], boot[b], strict=True)], dtype=torch.float64)
                lo, hi = (torch.quantile(d, torch.tensor([a, 1 - a], dtype=torch.float64)).tolist() if n_boot
                          else (math.nan, math.nan))
                rows[m] = {"diff": metrics[k][m] - metrics[b][m], "lo": lo, "hi": hi,
                           "excludes_zero": bool(lo > 0 or hi < 0)}
            diffs[f"{k}-{b}"] = rows
    return {"metrics": metrics, "differences": diffs, "n": n, "n_boot": n_boot}
