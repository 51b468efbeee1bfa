"""``max_risk`` for a generative adapter: its calibration (in steps, cached) and what a request must match.

The calibration decodes every labelled calibration question as a request with ``max_risk`` is
decoded: the adapter's sigma, default N and posterior seed, temperature 0, the score's answer mode
(:data:`tfb_core.decide.generation_risk.RISK_SCORES`), at most ``anchor_max_tokens`` new tokens;
scores each answer and marks it right or wrong by ``tfb eval``'s exact match; and keeps the
Learn-then-Test counts (:class:`~tfb_core.decide.generation_risk.RiskCalibration`). It runs as a
classifier's calibration does (:class:`~tfb_core.serving.calibrate.CalibrationRun`: a few questions
per step between requests, 503 with Retry-After until it is done) and is cached by content (the
questions and answers, the adapter, sigma, N, seed, score, the code).

A request with ``max_risk`` is refused (``TaskError``: a 422 naming the field) where its decode
is not the calibrated one: another ``n_samples`` or ``posterior_seed``, a temperature above 0, the
other answer mode; streaming (the decision needs the whole answer).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from tfb_core.data.loading import default_cache_dir
from tfb_core.data.tasks import TaskError
from tfb_core.decide.answers import exact_match
from tfb_core.decide.generation_risk import DEFAULT_RISK_SCORE, RiskCalibration, RiskScore, risk_score, score_value
from tfb_core.forward.completion import GenerationRequest, GenerationResult
from tfb_core.search import cache
from tfb_core.search.generation import Anchor
from tfb_core.serving.calibrate import CalibrationData, CalibrationRun
from tfb_core.serving.engine import NO_CALIBRATION, TFBEngine

log = logging.getLogger(__name__)

#: the code a generative calibration's cache key hashes: this module and what it imports
RISK_CALIBRATION = ("tfb_core.serving.risk",)


def result_value(score: str, result: GenerationResult) -> tuple[float, str, float]:
    """(score u, the served answer's text, its sequence NLL) of one decoded request: per-sample mode
    serves the first answer of the largest cluster (:meth:`GenerationService.result_info`'s rule)."""
    if result.answers is not None:
        served = result.completions[result.answers.clusters[0].members[0]]
        info = {"completion": {"sequence": asdict(served.sequence)},
                "answers": {"semantic_entropy": result.answers.semantic_entropy}}
    else:
        served = result.completion
        info = {"completion": {"sequence": asdict(served.sequence)}}
    return score_value(score, info), served.text, served.sequence.nll


class RiskCalibrationRun(CalibrationRun):
    """A :class:`CalibrationRun` whose forward decodes questions: each step's part is (k, 3):
    score, wrong (0/1), NLL of the served answer."""

    def __init__(self, engine: TFBEngine, score: RiskScore, questions: Sequence[Anchor], source: str,
                 key: dict[str, Any], on_done: Any) -> None:
        cfg = engine.cfg
        self.engine, self.score, self.questions = engine, score, list(questions)
        n = 1 if score.mle else cfg.n_samples
        self.decode = dict(n_samples=n, sigma=0.0 if score.mle else engine.sigma, max_tokens=cfg.anchor_max_tokens,
                           seed=cfg.seed, mode=score.mode, adapter=engine.adapter)
        rows = 1 if score.mle or engine.sigma == 0.0 else n
        data = CalibrationData(self.questions, torch.zeros(len(self.questions)), source, cfg.n_samples, cfg.seed)
        super().__init__(data, self._forward, on_done, key, default_cache_dir(cfg.model.cache_dir),
                         chunk_inputs=max(1, cfg.max_rows // rows))

    def _forward(self, chunk: list[Anchor]) -> torch.Tensor:
        from tfb_core.forward.generator import BayesianGenerator

        e = self.engine
        noise = None if self.score.mle else e.noise(e.cfg.seed, e.cfg.n_samples)
        gen = BayesianGenerator.from_classifier(e.classifier)
        results = gen.generate([GenerationRequest(list(q.tokens), noise=noise, **self.decode) for q in chunk])
        out = []
        for q, r in zip(chunk, results, strict=True):
            u, text, nll = result_value(self.score.name, r)
            out.append([u, float(not exact_match(text, q.answers)), nll])
        return torch.tensor(out, dtype=torch.float64)

    def _finish(self) -> None:
        parts = torch.cat(self._parts)  # (n, 3)
        e, d = self.engine, self.data
        cal = RiskCalibration.fit(self.score.name, parts[:, 0], parts[:, 1].bool(), parts[:, 2], d.source,
                                  n_samples=self.decode["n_samples"], seed=d.seed, sigma=self.decode["sigma"],
                                  max_tokens=self.decode["max_tokens"])
        path = cache.save_json(self.cache_dir, self.key, cal.to_dict(), "risk-calibration")
        self._parts = []
        self.on_done(cal)
        self.state = "ready"
        log.info("adapter %s: max_risk calibration (%s) on %d questions (%s): accuracy %.3f, in %.1fs, cached at %s",
                 e.name, cal.score, cal.n, d.source, cal.accuracy, self._seconds, path)


def calibrate_generation(engine: TFBEngine, questions: Sequence[Anchor] | None, source: str,
                         sigma_key: dict[str, Any] | None, background: bool = False) -> None:
    """Set ``engine.risk_calibration`` from the cache, else compute it now, or (``background``) leave
    it to run as ``engine.calibration_run``. Nothing without questions."""
    if not questions:
        return
    cfg = engine.cfg
    score = risk_score(cfg.risk_score or DEFAULT_RISK_SCORE)
    key = {"sigma_key": sigma_key, "sigma": engine.sigma, "n_samples": cfg.n_samples, "seed": cfg.seed,
           "score": score.name, "max_tokens": cfg.anchor_max_tokens, "adapter_sha256": engine.classifier.posterior.weights_sha256,
           "calibration_sha256": cache.sha256_text([f"{q.tokens}\t{list(q.answers)}" for q in questions]),
           "code_sha256": cache.code_sha256(RISK_CALIBRATION)}
    data = cache.load_json(default_cache_dir(cfg.model.cache_dir), key, "risk-calibration")
    if data is not None:
        try:
            engine.risk_calibration = RiskCalibration.from_dict({**data, "source": source})
            return
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("max_risk calibration cache unreadable (%s); recomputing", exc)

    def done(cal: RiskCalibration) -> None:
        engine.risk_calibration = cal

    run = RiskCalibrationRun(engine, score, questions, source, key, done)
    if background:
        engine.calibration_run = run
        log.info("max_risk calibration on %d questions (%s) runs in the background", len(questions), source)
    else:
        run.run()


def check_risk(engine: TFBEngine, max_risk: float | None, *, n_samples: int | None, posterior_seed: int | None,
               temperature: float, mode: str, stream: bool) -> RiskCalibration | None:
    """The calibration a generation request with ``max_risk`` is decided by; ``TaskError`` (422,
    ``param`` the field) naming what differs from the calibrated decode, or why there is none
    (``CalibrationPendingError``, 503, while it runs). None without ``max_risk``."""
    if max_risk is None:
        return None
    cal = engine.risk_calibration
    if cal is None:
        run = engine.calibration_run
        if run is not None:
            raise run.pending_error("max_risk")
        raise TaskError(f"max_risk: risk-controlled generation is off for adapter {engine.name!r} ({NO_CALIBRATION}: "
                        "labelled questions, as the anchor's lines with 'answers')", param="max_risk")
    score = risk_score(cal.score)
    differs = []
    if not score.mle:
        if n_samples is not None and n_samples != cal.n_samples:
            differs.append(("n_samples", f"n_samples={n_samples}", f"n_samples={cal.n_samples}"))
        if posterior_seed is not None and posterior_seed != cal.seed:
            differs.append(("posterior_seed", f"posterior_seed={posterior_seed}", f"posterior_seed={cal.seed}"))
    if temperature != 0.0:
        differs.append(("temperature", f"temperature={temperature:g}", "temperature=0"))
    if mode != score.mode:
        differs.append(("answers", f"answers={mode!r}", f"answers={score.mode!r}"))
    if stream:
        differs.append(("stream", "stream=true", "stream=false (the decision needs the whole answer)"))
    if differs:
        raise TaskError(f"max_risk: the calibration (score {cal.score}) holds for {', '.join(d[2] for d in differs)}; "
                        f"this request asks {', '.join(d[1] for d in differs)}: no guarantee holds for another "
                        "decode", param=differs[0][0])
    return cal


def decide(cal: RiskCalibration, info: dict[str, Any], max_risk: float, delta: float) -> dict[str, Any]:
    """The decision on one served answer (its result info): ``abstained`` and why, JSON-ready."""
    from tfb_core.decide.generation_risk import certainty

    th = cal.threshold(max_risk, delta)
    c = certainty(score_value(cal.score, info))
    return {"max_risk": max_risk, "delta": delta, "score": cal.score, "certainty": c,
            "threshold": th.threshold if th.supported else None, "certified": th.supported,
            "calibration_answered_fraction": th.answered_fraction, "abstained": not c >= th.threshold}


def served_confidence(engine: TFBEngine, info: dict[str, Any], *, n_samples: int | None, posterior_seed: int | None,
                      temperature: float, mode: str, mle: bool) -> dict[str, Any]:
    """An answer's ``confidence`` that it is right: exp(-nll) (``confidence_raw``), recalibrated by the
    temperature fitted on the calibration questions where the request decodes as they were decoded
    (the same N, seed, answer mode, sigma, temperature 0: ``confidence_calibrated``); else raw."""
    from tfb_core.decide.generation_risk import answer_confidence, scale_confidence

    raw = answer_confidence(float(info["completion"]["sequence"]["nll"]))
    cal = engine.risk_calibration
    same = cal is not None and temperature == 0.0 and mode == risk_score(cal.score).mode and \
        mle == risk_score(cal.score).mle and (mle or (
            (n_samples is None or n_samples == cal.n_samples) and (posterior_seed is None or posterior_seed == cal.seed)))
    if not same:
        return {"confidence": raw, "confidence_raw": raw, "confidence_calibrated": False}
    assert cal is not None
    scaled = float(scale_confidence(torch.tensor([raw], dtype=torch.float64), cal.confidence_temperature)[0])
    return {"confidence": scaled, "confidence_raw": raw, "confidence_calibrated": True}
