"""The JSON an engine's answers take: ``/predict`` and ``tfb predict --json``, and ``/info``.

    predict(engine, inputs, ...)          format, check, forward, then respond: what the CLI prints
    respond(engine, sample_probs, ...)    (B, N, C) per-sample probabilities -> the response body
    info(engine), pool_info(pool)         what /info says of each adapter

The one place the API's shapes are built (the server adds prediction ids and its own fields in
:mod:`app.predictor`); the probabilities' summary, the prediction sets and the abstention are the
decide package's (:mod:`tfb_core.decide`), applied with the engine's calibration.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tfb_core import __version__
from tfb_core.data.tasks import Record
from tfb_core.decide.conformal import sets_at
from tfb_core.decide.online import Served
from tfb_core.decide.uncertainty import summarize
from tfb_core.serving.engine import NO_CALIBRATION, TFBEngine
from tfb_core.serving.pool import AdapterPool


def predict(engine: TFBEngine, inputs: Sequence[str | Record], n_samples: int | None = None, seed: int | None = None,
            return_samples: bool = False, alpha: float | None = None, max_risk: float | None = None) -> dict[str, Any]:
    """Predictions for inputs (prompt strings, or records with the task's fields), as JSON-able data."""
    n = n_samples or engine.cfg.n_samples
    seed = engine.cfg.seed if seed is None else seed
    engine.check_conformal(alpha, max_risk, n, seed)  # before the forward
    probs = engine.sample(engine.format_inputs(inputs), n, seed)  # (B, N, C)
    return respond(engine, probs, return_samples, alpha, max_risk, seed=seed)


def respond(engine: TFBEngine, sample_probs: torch.Tensor, return_samples: bool = False, alpha: float | None = None,
            max_risk: float | None = None, labels: Sequence[str] | None = None,
            seed: int | None = None, online: tuple[Served, dict[str, Any]] | None = None) -> dict[str, Any]:
    """(B, N, C) per-sample probabilities (drawn with ``seed``, None: the configured one) -> the
    JSON shape of ``tfb predict`` and ``/predict``; with ``alpha`` each prediction gets its
    conformal ``prediction_set``, with ``max_risk`` its ``abstain`` flag (post-processing with
    the calibration: no other forward). ``labels``: the request's own label set the C classes
    are (None: the task's). ``online``: the thresholds of online quantile tracking in force for
    this alpha and what they promise (the server's, moved by /feedback): the sets are theirs, and
    ``conformal.guarantee`` says so; else split conformal's, and it says that."""
    cfg, cal = engine.cfg, engine.calibration
    u = summarize(sample_probs)
    labels = list(engine.task.labels if labels is None else labels)
    if len(labels) != sample_probs.shape[-1]:
        raise ValueError(f"{sample_probs.shape[-1]} class probabilities for {len(labels)} labels {labels}")
    engine.check_conformal(alpha, max_risk, int(sample_probs.shape[1]), cfg.seed if seed is None else seed, labels)
    extra: dict[str, Any] = {}
    sets = abstain = None
    if alpha is not None and cal is not None and online is not None:
        served, said = online
        sets = sets_at(u.probs, served.thresholds, cfg.conformal_score)
        extra["conformal"] = {"alpha": alpha, "score": cfg.conformal_score, "mondrian": cfg.conformal_mondrian,
                              "supported": True, **said}
    elif alpha is not None and cal is not None:
        res = cal.prediction_sets(u.probs, alpha, cfg.conformal_score, cfg.conformal_mondrian)
        sets = res.sets
        extra["conformal"] = {"alpha": alpha, "score": cfg.conformal_score, "mondrian": cfg.conformal_mondrian,
                              "supported": res.supported, "guarantee": SPLIT, "promise": split_promise(cal.n)}
        if not res.supported:
            extra["conformal"]["detail"] = _unsupported_detail(engine, alpha, labels)
    if max_risk is not None and cal is not None:
        abstain, th = cal.abstain(u.confidence, max_risk, cfg.risk_delta)
        extra["abstention"] = {"max_risk": max_risk, "delta": cfg.risk_delta,
                               "threshold": th.threshold if th.supported else None, "supported": th.supported,
                               "calibration_answered_fraction": th.answered_fraction}
        if not th.supported:
            extra["abstention"]["detail"] = (f"no confidence threshold certifies max_risk {max_risk} at delta "
                                             f"{cfg.risk_delta} on {cal.n} calibration inputs: abstaining on everything")
    preds = []
    for b in range(sample_probs.shape[0]):
        item = {
            "label": labels[int(u.index[b])], "index": int(u.index[b]),
            "probs": [float(x) for x in u.probs[b]], "confidence": float(u.confidence[b]),
            "predictive_entropy": float(u.predictive_entropy[b]),
            "expected_entropy": float(u.expected_entropy[b]),
            "mutual_information": float(u.mutual_information[b]),
        }
        if sets is not None:
            item["prediction_set"] = [labels[c] for c in sets[b]]
        if abstain is not None:
            item["abstain"] = abstain[b]
        if return_samples:
            item["samples"] = [[float(x) for x in row] for row in sample_probs[b]]
        preds.append(item)
    return {"labels": labels, "sigma": engine.sigma, "n_samples": int(sample_probs.shape[1]), "predictions": preds,
            **extra}


#: what a split-conformal set promises (``conformal.guarantee``; online sets say ``online_long_run``)
SPLIT = "split_conformal"


def split_promise(n: int) -> str:
    return (f"P(true label in set) >= 1 - alpha, on average over inputs exchangeable with the {n} calibration "
            "inputs (split conformal); nothing under distribution shift")


def _unsupported_detail(engine: TFBEngine, alpha: float, labels: Sequence[str]) -> str:
    """Why some (or all) prediction sets hold labels regardless of the input, and which."""
    cal, score, mondrian = engine.calibration, engine.cfg.conformal_score, engine.cfg.conformal_mondrian
    assert cal is not None
    if not mondrian:
        return (f"alpha {alpha} is below 1/(n+1) for {cal.n} calibration inputs: the sets hold every label")
    classes = cal.unsupported_classes(alpha, score, mondrian)
    counts = {labels[y]: len(cal.class_scores[score][y]) for y in classes}
    return (f"alpha {alpha} is below 1/(n_y+1) for the calibration inputs of classes {list(counts)} "
            f"(Mondrian, per class: n_y = {counts}): every set holds those labels")


def info(engine: TFBEngine) -> dict[str, Any]:
    """What /info says of one adapter: model, adapter, task, sigma and its search, calibration."""
    cfg, m = engine.cfg, engine.cfg.model
    return {
        "published": cfg.published, "model": m.model, "model_revision": m.model_revision, "adapter": m.adapter,
        "adapter_subfolder": m.adapter_subfolder, "dtype": m.dtype, "device": m.device,
        "kind": "generation" if engine.task.generative else "classification",
        "task": engine.task.name, "labels": list(engine.task.labels), "input_fields": list(engine.task.fields),
        "sigma": engine.sigma, "sigma_source": engine.sigma_source, "anchor": cfg.anchor,
        "n_samples": cfg.n_samples,
        "seed": cfg.seed, "lora_modules": len(engine.classifier.posterior.modules),
        "search": engine.search_result.to_dict() if engine.search_result else None,
        "calibration": calibration_info(engine),
        "memory": engine.memory(),
        "version": __version__,
    }


def calibration_info(engine: TFBEngine) -> dict[str, Any]:
    """/info's calibration: where it came from and what it certifies; or its progress; or why there is none."""
    cal, cfg = engine.calibration, engine.cfg
    if (risk := engine.risk_calibration) is not None:  # a generative adapter's, for max_risk
        return {"state": "ready", "n": risk.n, "source": risk.source, "score": risk.score, "risk_delta": cfg.risk_delta,
                "n_samples": risk.n_samples, "seed": risk.seed, "sigma": risk.sigma, "max_tokens": risk.max_tokens,
                "accuracy": risk.accuracy, "confidence_temperature": risk.confidence_temperature,
                "abstention": "Learn-then-Test on exp(-score), exact binomial p-values; exact match"}
    if cal is None:
        if engine.calibration_run is not None:
            return engine.calibration_run.info()
        if engine.task.generative:
            return {"state": "off", "n": 0, "detail": "no labelled calibration questions (TFB_CALIBRATION, or the "
                                                       "adapter folder's calibration.jsonl): max_risk is off"}
        return {"state": "off", "n": 0, "detail": NO_CALIBRATION}
    return {"state": "ready", "n": cal.n, "source": cal.source, "score": cfg.conformal_score,
            "mondrian": cfg.conformal_mondrian, "risk_delta": cfg.risk_delta,
            # the guarantees hold for requests at these (others asking alpha or max_risk: 422)
            "n_samples": cal.n_samples, "seed": cal.seed,
            "abstention": "Learn-then-Test on confidence, exact binomial p-values",
            "mean_predictive_entropy": cal.mean_predictive_entropy,
            "mean_mutual_information": cal.mean_mutual_information}


def pool_info(pool: AdapterPool) -> dict[str, Any]:
    """The default adapter's :func:`info`, and every adapter's under ``adapters``."""
    return {**info(pool.default), "default_adapter": pool.default.name,
            "adapters": [{"name": name, "state": "ready", **info(e)} for name, e in pool.engines.items()]
            + [p.info() for p in pool.pending.values()]}
