"""An engine's calibration forward, in steps: so that a server can answer requests while it runs.

The calibration (:class:`tfb_core.decide.conformal.Calibration`) is a forward of every labelled
calibration input at the engine's sigma, default N and seed: minutes on a CPU for a few hundred
inputs. ``tfb predict`` and ``tfb eval`` run it whole before they answer (:meth:`CalibrationRun.run`);
the server turns ready first and runs it a few inputs at a time between its batches
(:meth:`CalibrationRun.step`), and until it is done a request that asks for a guarantee
(``alpha``, ``max_risk``) is told to retry (:class:`CalibrationPendingError`, a 503 with
``Retry-After``). The result is cached like sigma, so a second start has it at once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tfb_core.data.loading import LoadError
from tfb_core.decide.conformal import Calibration
from tfb_core.decide.uncertainty import summarize
from tfb_core.search import cache

log = logging.getLogger(__name__)

State = Literal["running", "ready", "failed"]


class CalibrationPendingError(RuntimeError):
    """A request needs the calibration while it is still being computed (or after it failed)."""

    def __init__(self, message: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        #: seconds until the calibration is expected to be done (None: it failed, retrying will not help)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class CalibrationData:
    """Labelled prompts to calibrate on, and where they came from (shown in /info)."""

    prompts: Sequence[str]
    targets: torch.Tensor  # (n,) true classes
    source: str
    n_samples: int  # the posterior samples and seed of the forward: part of the score function
    seed: int


class CalibrationRun:
    """The calibration forward over ``data``, a chunk of inputs per :meth:`step`.

    ``forward(prompts)`` gives the (k, N, C) per-sample probabilities of k prompts at the engine's
    sigma, default N and seed; ``on_done(calibration)`` receives the result, which is also cached
    under ``key``.

    A step is what a request arriving during it waits for, so its size follows its measured time:
    the first step takes one input, each next one as many as fit in ``step_s`` at the pace so far
    (at most ``chunk_inputs``, one forward of the batch limit). On a GPU that is a full forward; on
    a loaded CPU, where one forward of 64 rows takes tens of seconds, one input. :meth:`run` (no
    requests to wait) always takes ``chunk_inputs``.
    """

    def __init__(self, data: CalibrationData, forward: Callable[[list[str]], torch.Tensor],
                 on_done: Callable[[Calibration], None], key: dict[str, Any], cache_dir: Path,
                 chunk_inputs: int, step_s: float = 0.5) -> None:
        self.data = data
        self.forward = forward
        self.on_done = on_done
        self.key = key
        self.cache_dir = cache_dir
        self.chunk_inputs = max(1, chunk_inputs)
        self.step_s = step_s
        self._next = 1 if math.isfinite(step_s) else self.chunk_inputs  # inputs of the next step
        self.state: State = "running"
        self.error: str | None = None
        self._parts: list[torch.Tensor] = []  # (k, N, C) per step
        self._seconds = 0.0

    @property
    def total(self) -> int:
        return len(self.data.prompts)

    @property
    def done(self) -> int:
        return sum(p.shape[0] for p in self._parts)

    def step(self) -> bool:
        """Run the next chunk of inputs; True once the calibration is finished (or failed)."""
        if self.state != "running":
            return True
        start = time.monotonic()
        chunk = list(self.data.prompts[self.done:self.done + self._next])
        try:
            probs = self.forward(chunk)  # (k, N, C)
        except Exception as exc:
            self.state, self.error = "failed", f"calibration data ({self.data.source}): {exc}"
            raise LoadError(self.error) from exc
        self._parts.append(probs)
        self._seconds += time.monotonic() - start
        per_input = self._seconds / self.done
        fit = self.step_s / per_input if per_input > 0 else math.inf
        self._next = max(1, min(self.chunk_inputs, int(fit) if math.isfinite(fit) else self.chunk_inputs))
        if self.done < self.total:
            return False
        self._finish()
        return True

    def run(self) -> None:
        """Every remaining step, now (the CLI's way): full chunks, nothing waits between them."""
        self.step_s, self._next = math.inf, self.chunk_inputs
        while not self.step():
            pass

    def _finish(self) -> None:
        u = summarize(torch.cat(self._parts))
        d = self.data
        cal = Calibration.fit(u.probs.double(), d.targets, d.source, u.mutual_information, n_samples=d.n_samples,
                              seed=d.seed)
        path = cache.save_json(self.cache_dir, self.key, cal.to_dict(), "calibration")
        self._parts = []
        self.on_done(cal)  # before the state: a reader that sees "ready" finds the calibration
        self.state = "ready"
        log.info("calibration on %d labelled inputs (%s) in %.1fs, cached at %s", cal.n, self.data.source,
                 self._seconds, path)

    def eta_s(self) -> float | None:
        """Seconds left at the pace so far (None before the first step)."""
        if not self.done:
            return None
        return self._seconds / self.done * (self.total - self.done)

    def pending_error(self, asked: str) -> CalibrationPendingError:
        """What a request that asked for ``asked`` (alpha, max_risk) is told while this run is not ready."""
        if self.state == "failed":
            return CalibrationPendingError(f"{asked}: prediction sets and abstention are off: {self.error}", None)
        eta = self.eta_s()
        when = f", about {math.ceil(eta)} s left" if eta is not None else ""
        return CalibrationPendingError(
            f"{asked}: the calibration for prediction sets and abstention is still running ({self.done} of "
            f"{self.total} inputs{when}): retry later; /info shows its progress", eta if eta is not None else 5.0)

    def info(self) -> dict[str, Any]:
        """The run's state for /info."""
        out: dict[str, Any] = {"state": self.state, "source": self.data.source, "n": self.total, "done": self.done}
        if self.state == "running" and (eta := self.eta_s()) is not None:
            out["eta_s"] = round(eta, 1)
        if self.error:
            out["detail"] = self.error
        return out
