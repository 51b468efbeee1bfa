"""``tfb eval`` for generation: which answers should a human check? Exact-match accuracy and, per
uncertainty score, how well it ranks the wrong answers first (AUROC, AURC, bootstrap 95% intervals),
with the cost of each score in forwards and tokens.

Per question (a record ``{"prompt", "answers": [aliases]}``), four decodes of a
:class:`~tfb_core.forward.generator.BayesianGenerator` (each batched over ``batch`` questions):

- ``mle``: the sigma = 0 model (the MLE adapter), greedy: its answer, and the MLE scores
  ``mle_nll`` (-log p(y), the same ranking as the maximum sequence probability, also given as
  ``mle_msp`` = 1 - p(y)), ``mle_mean_nll`` (per token) and ``mle_mean_entropy`` (mean token entropy);
- ``mle_samples``: the classical semantic-entropy baseline, K answers of the MLE at temperature 1
  (per-sample mode at sigma = 0 and temperature 1: K independent samples, one decode of K rows),
  clustered by :func:`~tfb_core.decide.generation.normalize_answer`: ``mle_semantic_entropy``. It
  ranks the MLE's greedy answer (the one served);
- ``tfb``: Bayesian model averaging over N posterior samples at ``sigma``, greedy from p̄: its answer,
  and ``tfb_nll`` (-log p̄(y)), ``tfb_mean_mi`` / ``tfb_max_mi`` (token mutual information),
  ``tfb_mean_entropy`` (mean token entropy of p̄);
- ``tfb_samples``: per-sample mode at ``sigma`` (each posterior sample greedy under its own p_n, N
  rows in one decode): ``tfb_semantic_entropy``, the posterior's own disagreement. It ranks the
  BMA answer (the one served).

Every score is "higher = more likely wrong". Its AUROC for detecting wrong answers and its AURC are
measured on the answers its configuration serves (``mle`` scores on the MLE greedy answers, ``tfb``
scores on the BMA answers) and, for a like-for-like ranking of one answer set, on the MLE's answers
too (``on_mle_answers``). Intervals: percentile bootstrap over questions (paired: one resample of
questions for every score), and the paired difference of each TFB score's AUROC to each MLE score's.

Cost, per decode (so per score: the decodes it needs): ``rows`` sequences decoded side by side,
``forwards`` the sequential forwards (prefill + decode steps, the longest stream), ``row_tokens``
the tokens computed over all rows (prompt tokens per row + tokens fed back), ``seconds`` wall time.

Calibration of the answer's confidence p(answer) = exp(-nll) as the probability that it is right
(:func:`confidence_calibration`): TFB's p̄ against the MLE's, ECE / Brier / NLL with paired
bootstrap intervals, and (given calibration questions' rows) against the MLE with temperature
scaling fitted on them.

:func:`evaluate_generation` runs the model; :func:`summarize` is pure (per-question rows in,
table out) and :func:`format_generation_table` prints it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tfb_core.data.generation import encode_prompt
from tfb_core.decide import selective
from tfb_core.decide.answers import exact_match
from tfb_core.forward.completion import GenerationRequest, GenerationResult

#: score -> (the decodes it needs, the answers it ranks: "mle" or "tfb")
SCORES: dict[str, tuple[tuple[str, ...], str]] = {
    "mle_nll": (("mle",), "mle"),
    "mle_msp": (("mle",), "mle"),
    "mle_mean_nll": (("mle",), "mle"),
    "mle_mean_entropy": (("mle",), "mle"),
    "mle_semantic_entropy": (("mle", "mle_samples"), "mle"),
    "tfb_nll": (("tfb",), "tfb"),
    "tfb_mean_mi": (("tfb",), "tfb"),
    "tfb_max_mi": (("tfb",), "tfb"),
    "tfb_mean_entropy": (("tfb",), "tfb"),
    "tfb_semantic_entropy": (("tfb", "tfb_samples"), "tfb"),
}
DECODES = ("mle", "mle_samples", "tfb", "tfb_samples")


@dataclass(frozen=True)
class GenEvalOptions:
    """Settings of a generation evaluation (N posterior samples, K baseline samples, ...)."""

    n_samples: int = 10
    k_samples: int = 10
    max_tokens: int = 8
    seed: int = 0  # the posterior draw
    sampling_seed: int = 0  # the baseline's temperature-1 draws (question i: sampling_seed * 1_000_003 + i)
    temperature: float = 1.0  # the baseline's
    chat: bool = True
    batch: int = 16  # questions per decode
    n_boot: int = 1000
    boot_seed: int = 0
    adapter: int = 0

    def __post_init__(self) -> None:
        for name in ("n_samples", "k_samples", "max_tokens", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_boot < 0:
            raise ValueError(f"n_boot must be >= 0, got {self.n_boot}")
        if not self.temperature > 0:
            raise ValueError(f"the baseline samples at a temperature > 0, got {self.temperature}")


def decode_cost(results: Sequence[GenerationResult], mean_rows: int) -> dict[str, float]:
    """rows, forwards, row_tokens of one decode's results, summed over its questions. A mean-mode
    answer is decoded by ``mean_rows`` rows (N; 1 at sigma = 0), a per-sample answer by one row each.
    A stream of m tokens costs its prompt (prefill) and m - 1 fed-back tokens per row, and m
    sequential forwards."""
    rows = forwards = row_tokens = 0
    for r in results:
        lengths = [len(c.token_ids) for c in r.completions]
        if r.mode == "mean":
            lengths = lengths * mean_rows
        rows += len(lengths)
        forwards += max(lengths)
        row_tokens += len(lengths) * r.prompt_tokens + sum(m - 1 for m in lengths)
    return {"rows": rows, "forwards": forwards, "row_tokens": row_tokens}


def _decode(gen: Any, requests: list[GenerationRequest], cost: dict[str, float], mean_rows: int = 1) -> list[GenerationResult]:
    start = time.perf_counter()
    results = gen.generate(requests)
    cost["seconds"] = cost.get("seconds", 0.0) + time.perf_counter() - start
    for k, v in decode_cost(results, mean_rows).items():
        cost[k] = cost.get(k, 0) + v
    return results


def evaluate_generation(gen: Any, records: Sequence[Mapping[str, Any]], sigma: float,
                        opts: GenEvalOptions = GenEvalOptions(), progress: Any = None,
                        checkpoint: Any = None) -> dict[str, Any]:
    """Decode ``records`` four ways (see the module doc) and score them: :func:`summarize`'s dict,
    plus ``rows`` (per question: the answers, their correctness and every score).

    ``progress(done, total)`` and ``checkpoint(rows, costs)`` are called after each batch (the rows
    and costs so far: :func:`summarize` makes a partial run's table from them)."""
    if not records:
        raise ValueError("no records to evaluate")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 to evaluate the posterior, got {sigma}")
    tokens = [encode_prompt(gen.tokenizer, r["prompt"], opts.chat) for r in records]
    costs: dict[str, dict[str, float]] = {d: {} for d in DECODES}
    rows: list[dict[str, Any]] = []
    for b0 in range(0, len(records), opts.batch):
        idx = range(b0, min(len(records), b0 + opts.batch))
        common = dict(max_tokens=opts.max_tokens, adapter=opts.adapter)
        mle = _decode(gen, [GenerationRequest(tokens[i], n_samples=1, **common) for i in idx], costs["mle"])
        mle_s = _decode(gen, [GenerationRequest(tokens[i], n_samples=opts.k_samples, temperature=opts.temperature,
                                                mode="per_sample", sampling_seed=opts.sampling_seed * 1_000_003 + i,
                                                **common) for i in idx], costs["mle_samples"])
        tfb = _decode(gen, [GenerationRequest(tokens[i], n_samples=opts.n_samples, sigma=sigma, seed=opts.seed,
                                              **common) for i in idx], costs["tfb"], opts.n_samples)
        tfb_s = _decode(gen, [GenerationRequest(tokens[i], n_samples=opts.n_samples, sigma=sigma, seed=opts.seed,
                                                mode="per_sample", **common) for i in idx], costs["tfb_samples"])
        for j, i in enumerate(idx):
            rows.append(question_row(records[i], mle[j], mle_s[j], tfb[j], tfb_s[j]))
        if progress is not None:
            progress(len(rows), len(records))
        if checkpoint is not None:
            checkpoint(rows, costs)
    out = summarize(rows, costs, opts)
    out["sigma"] = sigma
    out["rows"] = rows
    return out


def question_row(record: Mapping[str, Any], mle: GenerationResult, mle_samples: GenerationResult,
                 tfb: GenerationResult, tfb_samples: GenerationResult) -> dict[str, Any]:
    """One question's answers, their exact match and every score (higher = more likely wrong)."""
    answers = list(record["answers"])
    m, t = mle.completion, tfb.completion
    s_m, s_t = m.sequence, t.sequence
    entropy_m = [tok.predictive_entropy for tok in m.tokens]
    return {
        "id": record.get("id"), "prompt": record["prompt"], "answers": answers[:5],
        "mle_answer": m.text, "mle_correct": exact_match(m.text, answers),
        "tfb_answer": t.text, "tfb_correct": exact_match(t.text, answers),
        "tfb_majority": tfb_samples.answers.majority, "tfb_majority_correct": exact_match(tfb_samples.answers.majority, answers),
        "mle_samples_majority": mle_samples.answers.majority,
        "mle_samples_majority_correct": exact_match(mle_samples.answers.majority, answers),
        "scores": {
            "mle_nll": s_m.nll, "mle_msp": 1.0 - math.exp(-s_m.nll), "mle_mean_nll": s_m.mean_nll,
            "mle_mean_entropy": sum(entropy_m) / max(1, len(entropy_m)),
            "mle_semantic_entropy": mle_samples.answers.semantic_entropy,
            "tfb_nll": s_t.nll, "tfb_mean_mi": s_t.mean_mutual_information, "tfb_max_mi": s_t.max_mutual_information,
            "tfb_mean_entropy": s_t.mean_predictive_entropy,
            "tfb_semantic_entropy": tfb_samples.answers.semantic_entropy,
        },
    }


def _aurc(u: torch.Tensor, correct: torch.Tensor) -> float:
    return selective.risk_coverage(-u.double(), correct)["aurc"]


def _quantiles(values: list[float], level: float) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    a = (1.0 - level) / 2
    lo, hi = torch.quantile(torch.tensor(values, dtype=torch.float64), torch.tensor([a, 1 - a], dtype=torch.float64))
    return float(lo), float(hi)


def rank_scores(scores: Mapping[str, torch.Tensor], correct: Mapping[str, torch.Tensor], n_boot: int = 1000,
                seed: int = 0, level: float = 0.95,
                pairs: Sequence[tuple[str, str]] = ()) -> dict[str, dict[str, Any]]:
    """Per score (B,) "higher = more likely wrong", against the correctness (B,) bool of the answers
    it ranks (``correct[name]``): AUROC for detecting wrong answers
    (:func:`tfb_core.decide.selective.auroc`; None when all are right or all wrong), AURC
    (:func:`~tfb_core.decide.selective.risk_coverage`) and its floor at this accuracy, each with a
    percentile bootstrap interval over the B questions (one resample shared by every score: paired).
    ``pairs`` (a, b): also AUROC(a) - AUROC(b) with its paired interval, under ``"a-b"``."""
    names = list(scores)
    n = next(iter(scores.values())).shape[0] if names else 0
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=gen) if n_boot and n else torch.empty((0, n), dtype=torch.long)
    boot: dict[str, list[float | None]] = {k: [] for k in names}
    boot_aurc: dict[str, list[float]] = {k: [] for k in names}
    for i in idx:
        for k in names:
            boot[k].append(selective.auroc(scores[k][i], ~correct[k][i].bool()))
            boot_aurc[k].append(_aurc(scores[k][i], correct[k][i]))
    out: dict[str, dict[str, Any]] = {}
    for k in names:
        u, ok = scores[k], correct[k].bool()
        a = selective.auroc(u, ~ok)
        lo, hi = _quantiles([v for v in boot[k] if v is not None], level)
        alo, ahi = _quantiles(boot_aurc[k], level)
        out[k] = {"auroc": a, "auroc_lo": lo, "auroc_hi": hi, "aurc": _aurc(u, ok), "aurc_lo": alo, "aurc_hi": ahi,
                  "aurc_optimal": selective.aurc_optimal(ok), "n": int(n), "n_wrong": int((~ok).sum()),
                  "accuracy": float(ok.double().mean()) if n else float("nan")}
    for a, b in pairs:
        obs = (None if out[a]["auroc"] is None or out[b]["auroc"] is None else out[a]["auroc"] - out[b]["auroc"])
        diffs = [x - y for x, y in zip(boot[a], boot[b], strict=True) if x is not None and y is not None]
        lo, hi = _quantiles(diffs, level)
        out[f"{a}-{b}"] = {"diff": obs, "lo": lo, "hi": hi, "excludes_zero": bool(lo > 0 or hi < 0)}
    return out


def summarize(rows: Sequence[Mapping[str, Any]], costs: Mapping[str, Mapping[str, float]],
              opts: GenEvalOptions = GenEvalOptions()) -> dict[str, Any]:
    """The table of a generation evaluation from its per-question rows (pure)."""
    n = len(rows)
    flag = lambda key: torch.tensor([bool(r[key]) for r in rows], dtype=torch.bool)  # noqa: E731
    correct = {"mle": flag("mle_correct"), "tfb": flag("tfb_correct")}
    scores = {k: torch.tensor([float(r["scores"][k]) for r in rows], dtype=torch.float64) for k in SCORES}
    tfb_names = [k for k in SCORES if k.startswith("tfb")]
    mle_names = [k for k in SCORES if k.startswith("mle")]
    pairs = [(a, b) for a in tfb_names for b in mle_names]
    own = rank_scores(scores, {k: correct[SCORES[k][1]] for k in SCORES}, opts.n_boot, opts.boot_seed, pairs=pairs)
    on_mle = rank_scores(scores, {k: correct["mle"] for k in SCORES}, opts.n_boot, opts.boot_seed,
                         pairs=[(a, b) for a in tfb_names for b in mle_names])
    per_q = {d: {k: v / max(1, n) for k, v in c.items()} for d, c in costs.items()}
    score_cost = {k: {m: sum(per_q[d].get(m, 0.0) for d in SCORES[k][0]) for m in ("rows", "forwards", "row_tokens", "seconds")}
                  for k in SCORES}
    accuracy = {"mle": float(correct["mle"].double().mean()), "tfb": float(correct["tfb"].double().mean()),
                "tfb_majority": float(flag("tfb_majority_correct").double().mean()),
                "mle_samples_majority": float(flag("mle_samples_majority_correct").double().mean())}
    return {"n": n, "options": asdict(opts), "accuracy": accuracy,
            "confidence": confidence_calibration(rows, None, opts.n_boot, opts.boot_seed),
            "scores": {k: {**own[k], "answers": SCORES[k][1], "decodes": list(SCORES[k][0]), "cost": score_cost[k],
                           "on_mle_answers": {x: on_mle[k][x] for x in ("auroc", "auroc_lo", "auroc_hi", "aurc")}}
                       for k in SCORES},
            "differences": {p: own[p] for p in own if p not in SCORES},
            "differences_on_mle_answers": {p: on_mle[p] for p in on_mle if p not in SCORES},
            "cost_per_question": per_q}


def confidence_calibration(rows: Sequence[Mapping[str, Any]], calibration_rows: Sequence[Mapping[str, Any]] | None = None,
                           n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """How well each answer's confidence p(answer) = exp(-nll), read as the probability that it is
    right, is calibrated: TFB's p̄ (``tfb``) and the MLE's (``mle``, sigma = 0), each against the
    exact match of its own answers; with ``calibration_rows`` also each with temperature scaling
    fitted there (``mle+temperature``, ``tfb+temperature``: sigmoid(logit(c) / T), T by NLL). ECE
    (torchmetrics, 15 bins), Brier, NLL (:func:`tfb_core.decide.generation_risk.confidence_metrics`)
    and every method's paired bootstrap differences to ``mle`` and to ``mle+temperature``."""
    from tfb_core.decide.generation_risk import (
        answer_confidence,
        confidence_report,
        fit_confidence_temperature,
        scale_confidence,
    )

    def read(rs: Sequence[Mapping[str, Any]], m: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (answer_confidence(torch.tensor([float(r["scores"][f"{m}_nll"]) for r in rs], dtype=torch.float64)),
                torch.tensor([bool(r[f"{m}_correct"]) for r in rs], dtype=torch.bool))

    conf: dict[str, torch.Tensor] = {}
    correct: dict[str, torch.Tensor] = {}
    temperature: dict[str, float] = {}
    for m in ("tfb", "mle"):
        conf[m], correct[m] = read(rows, m)
    if calibration_rows:
        for m in ("tfb", "mle"):
            temperature[m] = fit_confidence_temperature(*read(calibration_rows, m))
            conf[f"{m}+temperature"] = scale_confidence(conf[m], temperature[m])
            correct[f"{m}+temperature"] = correct[m]
    baselines = [b for b in ("mle", "mle+temperature") if b in conf]
    return {"temperature": temperature, "n_calibration": len(calibration_rows or ()),
            **confidence_report(conf, correct, baselines, n_boot, seed)}


def format_confidence(result: Mapping[str, Any]) -> list[str]:
    """Table lines of :func:`confidence_calibration`."""
    t = result["temperature"]
    lines = ["answer confidence exp(-nll) as P(right)" + (f", temperature fitted on {result['n_calibration']} "
             "calibration questions (" + ", ".join(f"T {k} {v:.3f}" for k, v in t.items()) + ")" if t else "")]
    for k, m in result["metrics"].items():
        lines.append(f"  {k:<16} ECE {m['ece']:.4f}  Brier {m['brier']:.4f}  NLL {m['nll']:.4f}  mean conf "
                     f"{m['mean_confidence']:.3f}  accuracy {m['accuracy']:.3f}")
    for k, d in result["differences"].items():
        lines.append(f"  {k:<32}" + "  ".join(f"{m} {x['diff']:+.4f} [{x['lo']:+.4f}, {x['hi']:+.4f}]"
                                             f"{'*' if x['excludes_zero'] else ''}" for m, x in d.items()))
    return lines


def shift_auroc(in_rows: Sequence[Mapping[str, Any]], out_rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Per score, the AUROC of telling shifted questions (positive) from in-domain ones
    (:func:`tfb_core.evaluation.report.ood_auroc`): where the shifted set is nearly all wrong, the
    wrong-answer AUROC has nothing to rank, and this is what is left to measure."""
    from tfb_core.evaluation.report import ood_auroc

    return {k: ood_auroc(torch.tensor([float(r["scores"][k]) for r in in_rows], dtype=torch.float64),
                         torch.tensor([float(r["scores"][k]) for r in out_rows], dtype=torch.float64))
            for k in SCORES}


def format_generation_table(name: str, result: Mapping[str, Any]) -> str:
    """A plain-text table of one :func:`summarize` result."""
    f = lambda x: "  -  " if x is None or x != x else f"{x:.3f}"  # noqa: E731
    acc = result["accuracy"]
    lines = [f"{name}: n={result['n']} sigma={result.get('sigma', float('nan')):.5g} "
             f"N={result['options']['n_samples']} K={result['options']['k_samples']}  exact match: "
             + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()),
             f"{'score':<22}{'answers':>8}{'AUROC [95% CI]':>24}{'AURC [95% CI]':>24}{'on MLE ans.':>12}"
             f"{'rows':>6}{'fwd':>6}{'row_tok':>9}{'s/q':>7}"]
    for k, s in result["scores"].items():
        c = s["cost"]
        lines.append(f"{k:<22}{s['answers']:>8}{f(s['auroc']):>8} [{f(s['auroc_lo'])}, {f(s['auroc_hi'])}]"
                     f"{f(s['aurc']):>8} [{f(s['aurc_lo'])}, {f(s['aurc_hi'])}]{f(s['on_mle_answers']['auroc']):>12}"
                     f"{c['rows']:>6.0f}{c['forwards']:>6.1f}{c['row_tokens']:>9.0f}{c['seconds']:>7.3f}")
    best_t = max((k for k in result["scores"] if k.startswith("tfb")), key=lambda k: result["scores"][k]["auroc"] or 0)
    best_m = max((k for k in result["scores"] if k.startswith("mle")), key=lambda k: result["scores"][k]["auroc"] or 0)
    d = result["differences"][f"{best_t}-{best_m}"]
    lines.append(f"best TFB {best_t} - best MLE {best_m}: AUROC {f(d['diff'])} [{f(d['lo'])}, {f(d['hi'])}]"
                 f"{' (interval excludes 0)' if d['excludes_zero'] else ''}")
    if "confidence" in result:
        lines += format_confidence(result["confidence"])
    return "\n".join(lines)
