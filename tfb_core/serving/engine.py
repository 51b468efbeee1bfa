"""One served adapter at run time: its noise draws, its forwards and what its calibration allows.

    engine = load_engine(EngineConfig(...))          # start-up: tfb_core.serving.startup
    probs = engine.sample(engine.format_inputs(inputs), n_samples=10, seed=0)  # (B, N, C)
    engine.run_batch(requests, max_rows=64)          # many callers' requests: tfb_core.serving.batch

A :class:`TFBEngine` holds what start-up settled (config, classifier, task, sigma and where it came
from, the calibration) and does the run-time work on it: the noise draws of recent seeds, forwards
of prompts, the warm-up, and the checks a request's ``alpha`` and ``max_risk`` must pass. It knows
nothing of JSON (:mod:`tfb_core.serving.response`) or of how it was built.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence

import torch
from torch import nn

from tfb_core.bayes.posterior import NoiseDraw
from tfb_core.data.tasks import Record, Task, TaskError
from tfb_core.decide.conformal import Calibration
from tfb_core.decide.generation_risk import RiskCalibration
from tfb_core.forward.classifier import BayesianClassifier, Prompt
from tfb_core.forward.layout import Job, rows_of
from tfb_core.search.strategy import SearchResult
from tfb_core.serving.batch import BatchRequest, ForwardHook, Labels, run_batch
from tfb_core.serving.calibrate import CalibrationRun
from tfb_core.serving.config import EngineConfig
from tfb_core.serving.overhead import forward_overhead

log = logging.getLogger(__name__)

NO_CALIBRATION = ("no labelled calibration data: set TFB_CALIBRATION (or TFB_CALIBRATION_SPLIT, to hold out part "
                  "of a labelled anchor)")


class ClassIds:
    """Class-token ids per label set (a request's own, other than the task's), the last ``size`` kept."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._ids: OrderedDict[Labels, torch.Tensor] = OrderedDict()

    def get(self, classifier: BayesianClassifier, labels: Labels) -> torch.Tensor:
        ids = self._ids.get(labels)
        if ids is None:
            ids = classifier.class_ids_for(labels)  # TaskError: a label that is not one token
            self._ids[labels] = ids
            while len(self._ids) > self.size:
                self._ids.popitem(last=False)
        self._ids.move_to_end(labels)
        return ids


class TFBEngine:
    """A Bayesianized classifier with its task, sigma, calibration and default Monte Carlo noise."""

    NOISE_CACHE = 3  # draws kept for reuse

    def __init__(self, cfg: EngineConfig, classifier: BayesianClassifier, task: Task, sigma: float,
                 sigma_source: str, search_result: SearchResult | None = None) -> None:
        self.cfg = cfg
        self.classifier = classifier
        self.task = task
        self.sigma = sigma
        self.sigma_source = sigma_source
        self.search_result = search_result
        #: the adapter's name where several are served on one base model
        self.name = "default"
        classifier.truncate = task.truncate
        #: conformal sets and abstention thresholds' data (None: no labelled calibration data, or
        #: not yet: see calibration_run)
        self.calibration: Calibration | None = None
        #: the calibration still to compute, when it was left to run in the background
        self.calibration_run: CalibrationRun | None = None
        #: a generative adapter's max_risk calibration (:mod:`tfb_core.serving.risk`; None: none, or not yet)
        self.risk_calibration: RiskCalibration | None = None
        self._noise: OrderedDict[int, NoiseDraw] = OrderedDict()
        #: class-token ids of request label sets other than the task's (generic task)
        self._class_ids = ClassIds()
        #: tokens of the task's instruction (what the prompts of any two inputs share; 0: none), run
        #: once per posterior sample and reused by every forward
        self.prompt_prefix = classifier.shared_prefix(
            classifier.tokenize([task.format(task.placeholder(t)) for t in ("alpha", "omega")]))

    # --- noise --------------------------------------------------------------------------------
    def noise(self, seed: int, n_samples: int) -> NoiseDraw | None:
        """The standard-normal draw of ``seed`` with at least ``n_samples`` samples.

        The last few draws are kept (the configured seed's always): a draw is
        N x sum(r x in) numbers, about 0.3 GB in bf16 for N = 64 on Llama-3.1-8B with 65 modules.
        """
        if self.sigma == 0.0:
            return None
        draw = self._noise.get(seed)
        if draw is None or draw.n_samples < n_samples:
            draw = self.classifier.posterior.draw(seed, max(n_samples, self.cfg.n_samples))
            self._noise[seed] = draw
            while len(self._noise) > self.NOISE_CACHE:  # evict the oldest, never the configured seed's
                del self._noise[next(k for k in self._noise if k != self.cfg.seed)]
        self._noise.move_to_end(seed)
        return draw

    def clear_noise(self) -> None:
        """Drop the kept noise draws (an unloaded adapter's memory)."""
        self._noise.clear()

    def memory(self) -> dict[str, int]:
        """Bytes this adapter holds: its A', B', d tensors and its kept noise draws (/info)."""
        weights = sum(t.numel() * t.element_size() for m in self.classifier.posterior.modules for t in m.buffers(recurse=False))
        noise = sum(draw.nbytes() for draw in list(self._noise.values()))
        return {"weights_bytes": weights, "noise_bytes": noise, "total_bytes": weights + noise}

    def rows(self, n_inputs: int, n_samples: int) -> int:
        """Rows of a forward that ``n_inputs`` inputs of N samples take (N each, 1 at sigma = 0)."""
        return n_inputs * rows_of(n_samples, self.sigma)

    # --- what a batch needs of an adapter (tfb_core.serving.batch.Adapter) ----------------------
    @property
    def adapter(self) -> int:
        """This adapter's index among its base model's (the forward's routing of rows)."""
        return self.classifier.adapter

    @property
    def base_model(self) -> nn.Module:
        return self.classifier.model

    def tokenize(self, prompts: Sequence[Prompt], keep_last: int | None = None) -> list[list[int]]:
        return self.classifier.tokenize(prompts, keep_last)

    def class_ids_for(self, labels: Labels | None) -> torch.Tensor:
        """Class-token ids of ``labels`` (None or the task's: the classifier's own); ``TaskError``
        for a label that is not one token."""
        clf = self.classifier
        if labels is None or list(labels) == clf.labels:
            return clf.class_ids
        return self._class_ids.get(clf, tuple(labels))

    def prefix_for(self, tokens: Sequence[list[int]]) -> int:
        """The prefix a forward of ``tokens`` shares: the task's instruction, else what they share."""
        return self.prompt_prefix or self.classifier.shared_prefix(tokens)

    def run_planned(self, units: Sequence[Sequence[Job]], max_rows: int, prefix: Mapping[int, int] | int | None,
                    keys: Sequence[Hashable] | None = None, on_chunk: Callable[[int, int], None] | None = None,
                    skip: Callable[[int], bool] | None = None) -> list[list[torch.Tensor]]:
        """Forwards planned by length on this adapter's base model (jobs of other adapters of it too)."""
        return self.classifier.run_planned(units, max_rows, self.sigma, prefix=prefix, keys=keys, on_chunk=on_chunk,
                                           skip=skip)

    def run_batch(self, requests: Sequence[BatchRequest], max_rows: int,
                  on_forward: ForwardHook | None = None) -> list[torch.Tensor | Exception]:
        """Many callers' requests in shared forwards of at most ``max_rows`` rows: per request its
        (B_i, N_i, C) per-sample probabilities, or the error it alone gets
        (:func:`tfb_core.serving.batch.run_batch`)."""
        return run_batch(self, requests, max_rows, on_forward)

    # --- forwards -----------------------------------------------------------------------------
    def format_inputs(self, inputs: Sequence[str | Record]) -> list[str]:
        """Prompts of the inputs; raises ``TaskError`` naming the bad input's position."""
        prompts = []
        for i, x in enumerate(inputs):
            try:
                prompts.append(self.task.format(x))
            except TaskError as exc:
                raise TaskError(f"input {i}: {exc}", param="inputs") from exc
        return prompts

    def sample(self, prompts: Sequence[str], n_samples: int, seed: int) -> torch.Tensor:
        """(B, N, C) per-sample probabilities of ``prompts`` at this engine's sigma, with the draw of ``seed``."""
        return self.classifier.sample_probs(prompts, n_samples, sigma=self.sigma, noise=self.noise(seed, n_samples),
                                            max_rows=self.cfg.max_rows, prefix=self.prompt_prefix or None)

    def first_forward(self) -> tuple[Job, int | None]:
        """One forward of one placeholder input at the configured N and seed (the first forward of
        an adapter pays for kernels and its prefix); returns its job and prefix. A generative
        adapter's is a one-token generation (it has no classes to read)."""
        tokens = self.tokenize([self.task.format(self.task.placeholder("warm-up"))])[0]
        n = self.cfg.n_samples
        job = Job(tokens, n, self.noise(self.cfg.seed, n))
        prefix = self.prompt_prefix or None
        if self.task.generative:
            from tfb_core.forward.completion import GenerationRequest
            from tfb_core.forward.generator import BayesianGenerator

            BayesianGenerator.from_classifier(self.classifier).generate([GenerationRequest(
                tokens, n_samples=n, sigma=self.sigma, max_tokens=1, adapter=self.adapter, noise=job.noise)])
        else:
            self.classifier.run_jobs([job], self.sigma, prefix=prefix)
        return job, prefix

    def warm_up(self, max_rows: int) -> float | None:
        """:meth:`first_forward`; on a GPU also one forward of a full batch (``max_rows`` rows), so
        that the first real batch does not pay for loading kernels and growing the allocator's pool.
        Unless the config fixes it, the fixed cost of a forward for planning batches by length is
        then read from the cache, else measured (forwards of 1 and up to 8 inputs) and cached
        (:mod:`tfb_core.serving.overhead`); returns it (None: not measured)."""
        t0 = time.perf_counter()
        clf = self.classifier
        job, prefix = self.first_forward()
        if self.task.generative:  # the classification forwards' planning is not a generative adapter's
            return None
        inputs = max_rows // rows_of(job.n_samples, self.sigma)
        if clf.device.type != "cpu" and inputs > 1:
            clf.run_jobs([job] * inputs, self.sigma, prefix=prefix)
        overhead = None
        if self.cfg.forward_overhead_tokens is None:
            overhead = forward_overhead(self.cfg.model, clf, job, self.sigma, max_rows, prefix)
        log.info("warm-up forwards (N=%d) in %.2fs", job.n_samples, time.perf_counter() - t0)
        return overhead

    # --- what the calibration allows ----------------------------------------------------------
    def check_conformal(self, alpha: float | None, max_risk: float | None, n_samples: int | None = None,
                        seed: int | None = None, labels: Sequence[str] | None = None) -> None:
        """Raise ``TaskError`` (a 4xx, its ``param`` the field asked) if a request asks for sets or
        abstention without calibration data (:class:`CalibrationPendingError`, a 503, while it is still
        being computed), at posterior samples ``n_samples`` or a ``seed`` (None: the calibration's)
        other than those the calibration was computed at, or for ``labels`` other than the task's
        (None: the task's; the calibration is for them).

        N and the seed are part of the score function (the mean of N sampled probabilities): the
        calibration's quantiles and Learn-then-Test counts are valid for that function only (at
        N = 1, sets calibrated at N = 10 cover less than 1 - alpha). At sigma = 0 every sample is
        the mean, so neither changes the scores and any is accepted.
        """
        if alpha is None and max_risk is None:
            return
        asked = "alpha" if alpha is not None else "max_risk"
        cal = self.calibration
        if cal is None:
            if self.calibration_run is not None:
                raise self.calibration_run.pending_error(asked)
            raise TaskError(f"{asked}: prediction sets and abstention are off ({NO_CALIBRATION})", param=asked)
        if self.sigma != 0.0:
            other = ([f"n_samples={n_samples}"] if n_samples is not None and n_samples != cal.n_samples else []) + (
                [f"seed={seed}"] if seed is not None and seed != cal.seed else [])
            if other:
                raise TaskError(f"{asked}: the calibration was computed at n_samples={cal.n_samples}, seed={cal.seed} "
                                f"(TFB_N_SAMPLES, TFB_SEED); this request asks {' and '.join(other)}: no guarantee "
                                "holds for another score function; omit n_samples and seed, or set them to the "
                                "calibration's", param=asked)
        if labels is not None and list(labels) != list(self.task.labels):
            raise TaskError("alpha and max_risk need the configured labels (the calibration is for them), "
                            f"got labels {list(labels)}", param="labels")
