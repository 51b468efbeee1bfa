"""What a generation asks for and what it returns: requests, per-token uncertainty, completions.

Plain data, validated at construction (a ``ValueError`` names the bad value), and the stop rule of
one decoded stream (:class:`StopRule`). The decoding itself is :mod:`~tfb_core.forward.generator`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from tfb_core.bayes.posterior import SEED_LIMIT, NoiseDraw
from tfb_core.decide.generation import AnswerSummary, SequenceScores

#: "mean": Bayesian model averaging, one answer decoded from p̄; "per_sample": each of the N
#: posterior samples decodes its own answer under its own p_n (the answers' disagreement)
Mode = Literal["mean", "per_sample"]
MODES = ("mean", "per_sample")


@dataclass
class GenerationRequest:
    """One prompt to continue, with its posterior samples and decoding settings.

    ``seed`` draws the N posterior samples (as for classification; ``noise`` overrides it);
    ``sampling_seed`` the token draws at temperature > 0 (OpenAI's ``seed``). ``stop_token_ids``:
    tokens that end the answer (None: the generator's end-of-sequence tokens; () none); ``stop``:
    strings that end it (the text stops before the first one). ``top_logprobs``: how many of p̄'s
    most probable tokens each generated token reports (0: none).
    """

    tokens: list[int]
    n_samples: int = 10
    sigma: float = 0.0
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    sampling_seed: int = 0
    mode: Mode = "mean"
    adapter: int = 0
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] | None = None
    top_logprobs: int = 0
    noise: NoiseDraw | None = None

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("the prompt has no tokens: nothing to continue")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if not 0.0 <= self.sigma < math.inf:
            raise ValueError(f"sigma must be a finite number >= 0, got {self.sigma}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("seed", "sampling_seed"):  # torch's generators take a uint64
            if not 0 <= getattr(self, name) < SEED_LIMIT:
                raise ValueError(f"{name} must be in [0, 2**64), got {getattr(self, name)}")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        if any(not s for s in self.stop):
            raise ValueError("a stop string must not be empty")
        if self.noise is not None and self.noise.n_samples < self.n_samples:
            raise ValueError(f"noise has {self.noise.n_samples} samples, the request needs {self.n_samples}")

    @property
    def noisy(self) -> bool:
        """Whether the samples differ (sigma > 0): otherwise one row is every sample."""
        return self.sigma > 0.0

    def streams(self) -> list[list[int]]:
        """The streams this request decodes, each as the samples of its rows (-1: the posterior mean).

        Mean mode: one stream of N rows (one mean row at sigma = 0). Per-sample mode: one stream per
        sample; at sigma = 0 and temperature 0 the N answers are one answer, so one mean row.
        """
        if self.mode == "mean":
            return [list(range(self.n_samples))] if self.noisy else [[-1]]
        if self.noisy:
            return [[n] for n in range(self.n_samples)]
        return [[-1]] if self.temperature == 0.0 else [[-1] for _ in range(self.n_samples)]


@dataclass(frozen=True)
class TokenUncertainty:
    """One generated token and what p̄ said about it (nats)."""

    token_id: int
    logprob: float  # log p̄(token)
    predictive_entropy: float  # H[p̄]
    expected_entropy: float  # mean_n H[p_n]
    mutual_information: float  # H[p̄] - mean_n H[p_n], >= 0
    top_logprobs: tuple[tuple[int, float], ...] = ()  # p̄'s most probable (token id, log p̄), best first


@dataclass
class Completion:
    """One decoded answer.

    ``token_ids`` are every token generated, the one that ended it included (an end-of-sequence
    token, or the one that completed a stop string); ``text`` is their decoding without special
    tokens, cut before a stop string (as OpenAI's API returns it). ``stop_reason``: the stop token
    id or string that ended it, None for "length".
    """

    token_ids: list[int]
    text: str
    finish_reason: Literal["stop", "length", "cancelled"]  # cancelled: Decoding.cancel
    stop_reason: int | str | None
    tokens: list[TokenUncertainty]
    sequence: SequenceScores


@dataclass
class GenerationResult:
    """One request's answer: mean mode, one completion; per-sample mode, the N samples' completions
    (each under its own p_n: its tokens' MI is 0) and their clusters."""

    mode: Mode
    n_samples: int
    completions: list[Completion]
    answers: AnswerSummary | None = None
    prompt_tokens: int = 0

    @property
    def completion(self) -> Completion:
        """The answer (mean mode) or the first sample's (per-sample mode)."""
        return self.completions[0]


def complete_text(text: str) -> str:
    """``text`` without the characters still incomplete at its end. A byte-level (or byte-fallback)
    decode writes U+FFFD for the bytes of a character whose last bytes are still to come (an emoji
    split over tokens), and the next token turns it into the character: text up to there cannot
    change any more, the tail can."""
    return text.rstrip("\ufffd")


@dataclass
class StopRule:
    """When one stream ends: a stop token, a stop string in its text, or ``max_tokens`` tokens."""

    max_tokens: int
    stop_token_ids: frozenset[int]
    stop: tuple[str, ...] = ()
    _scanned: int = field(default=0, repr=False)  # text length already searched for stop strings

    def check(self, token_id: int, n_tokens: int, text: str | None) -> tuple[str, int | str | None, int] | None:
        """After a stream's ``n_tokens``-th token: (finish_reason, stop_reason, length of the text
        kept), or None to go on. ``text``: the decoding so far (needed only with stop strings); stop
        strings are searched in its complete characters (:func:`complete_text`)."""
        if token_id in self.stop_token_ids:
            return "stop", token_id, -1
        if self.stop and text is not None:
            # only complete text: an incomplete character can neither match (a stop string of
            # U+FFFD would meet the stand-in) nor be passed over (its character comes with the next token)
            text = complete_text(text)
            longest = max(len(s) for s in self.stop)
            start = max(0, self._scanned - longest + 1)  # a stop string may straddle the last token
            hits = [(i, s) for s in self.stop if (i := text.find(s, start)) >= 0]
            self._scanned = len(text)
            if hits:
                i, s = min(hits)
                return "stop", s, i
        if n_tokens >= self.max_tokens:
            return "length", None, -1
        return None
