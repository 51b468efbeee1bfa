"""Bayesian generation for the served adapters: requests in, a running decode stepped between other work.

    service = GenerationService(pool)                  # one generator over the pool's base model
    req = service.request(engine, service.encode_prompt("Q: 2 + 2 ="), GenerationSettings(max_tokens=8))
    batch = GenerationBatch(service)
    batch.submit(key, req)                              # joins the running decode at the next step
    for update in batch.step(): ...                     # one token per active stream per step
    batch.cancel(key)                                   # its rows leave the decode at once

The :class:`~tfb_core.forward.generator.BayesianGenerator` shares the classifier's base model,
posteriors and routing (``from_classifier``: nothing is copied); each request decodes with its
adapter's sigma and the adapter's cached noise draw of its posterior seed (the draw /predict uses
for the same seed). The chat template's head (what every chat prompt starts with) is computed once
per posterior sample and kept by the generator (:meth:`~tfb_core.forward.generator.BayesianGenerator.set_prefix`),
as classification keeps a task's instruction. Text is decoded here, on the thread that owns the model (the tokenizer is not
shared across threads): each token update carries the text that became safe to show (text that a
stop string might still cut, or an incomplete character, is held back). No web imports.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tfb_core.data.generation import GenerationInputError, encode_prompt, render_chat
from tfb_core.forward.completion import Completion, GenerationRequest, GenerationResult, Mode, TokenUncertainty, complete_text
from tfb_core.forward.decoding import Decoding
from tfb_core.forward.generator import BayesianGenerator, common_prefix
from tfb_core.serving.engine import TFBEngine
from tfb_core.serving.pool import AdapterPool

log = logging.getLogger(__name__)


def chat_head(tokenizer: Any) -> list[int] | None:
    """The tokens every chat prompt of ``tokenizer``'s template starts with (what two one-message
    conversations share), or None (no template, or nothing shared)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        a, b = (tokenizer(render_chat(tokenizer, [{"role": "user", "content": w}], ""), add_special_tokens=False)
                ["input_ids"] for w in ("alpha", "omega"))
    except GenerationInputError:
        return None
    return list(a[:common_prefix([a, b])]) or None


@dataclass(frozen=True)
class GenerationSettings:
    """What a request asks of the decode (the API's fields, already checked against the limits)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    sampling_seed: int = 0  # OpenAI's ``seed``: token draws at temperature > 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's end-of-sequence tokens
    top_logprobs: int = 0
    n_samples: int | None = None  # None: the adapter's configured N
    posterior_seed: int | None = None  # None: the adapter's configured seed
    mode: Mode = "mean"
    #: ``max_tokens`` is a default, not the client's: shortened to what the model's context leaves
    fit_context: bool = False
    #: decode at sigma = 0, one row (the plain adapter): max_risk with the ``mle_nll`` score
    mle: bool = False


class GenerationService:
    """The generator over the served adapters' base model, and what turns a request into its decode."""

    def __init__(self, served: TFBEngine | AdapterPool, max_length: int | None = None, max_rows: int = 64) -> None:
        self.adapters = served if isinstance(served, AdapterPool) else AdapterPool([served])
        self.generator = BayesianGenerator.from_classifier(self.adapters.default.classifier)
        self.tokenizer = self.generator.tokenizer
        #: the longest prompt in tokens (None: the classifier's max_length)
        self.max_length = max_length or self.adapters.default.classifier.max_length
        self._byte_decoder: dict[str, int] | None = None
        cfg = getattr(self.generator.model, "config", None)
        #: the model's context (prompt + answer), where its config says
        self.context = getattr(cfg, "max_position_embeddings", None)
        # every chat prompt starts with the template's head (SmolLM2's: its system line): computed once
        # per posterior sample and kept, as classification keeps a task's instruction
        self.generator.set_prefix(chat_head(self.tokenizer), rows=max_rows)
        # an unloaded adapter's kept rows go with it (tfb_core.serving.lifecycle frees them)
        self.adapters.lifecycle.generators.append(self.generator)

    # --- prompts (on the model's thread) ----------------------------------------------------------
    def encode_prompt(self, prompt: str, param: str = "prompt") -> list[int]:
        return self._check_length(encode_prompt(self.tokenizer, prompt, chat=False), param)

    def encode_chat(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """The chat template's rendering of ``messages`` with the generation prompt, tokenized."""
        ids = encode_prompt(self.tokenizer, messages, chat=True, instead="use /v1/completions with a prompt")
        return self._check_length(ids, "messages")

    def _check_length(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise GenerationInputError("the prompt has no tokens: nothing to continue", param=param)
        if len(ids) > self.max_length:
            raise GenerationInputError(f"the prompt has {len(ids)} tokens, over the limit of {self.max_length} "
                                       "(TFB_MAX_LENGTH)", param=param)
        return ids

    def request(self, engine: TFBEngine, tokens: list[int], settings: GenerationSettings) -> GenerationRequest:
        """The decode of ``tokens`` for adapter ``engine``: its sigma, its N and seed unless asked."""
        n = engine.cfg.n_samples if settings.n_samples is None else settings.n_samples
        seed = engine.cfg.seed if settings.posterior_seed is None else settings.posterior_seed
        if self.context is not None and settings.fit_context and len(tokens) < self.context:
            settings = replace(settings, max_tokens=min(settings.max_tokens, self.context - len(tokens)))
        if self.context is not None and len(tokens) + settings.max_tokens > self.context:
            raise GenerationInputError(f"the prompt's {len(tokens)} tokens and max_tokens {settings.max_tokens} are "
                                       f"over the model's context of {self.context} tokens", param="max_tokens")
        if settings.mle:
            n, sigma, noise = 1, 0.0, None
        else:
            sigma, noise = engine.sigma, engine.noise(seed, n)
        return GenerationRequest(
            list(tokens), n_samples=n, sigma=sigma, max_tokens=settings.max_tokens,
            temperature=settings.temperature, top_p=settings.top_p, seed=seed, sampling_seed=settings.sampling_seed,
            mode=settings.mode, adapter=engine.adapter, stop=settings.stop, stop_token_ids=settings.stop_token_ids,
            top_logprobs=settings.top_logprobs, noise=noise)

    # --- JSON-ready data (on the model's thread) --------------------------------------------------
    def piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def token_bytes(self, token_id: int) -> list[int]:
        """The token's own bytes (OpenAI's ``bytes``: a character split over tokens is whole only in
        their concatenation): byte-level BPE's and byte-fallback's exactly; else its text's UTF-8."""
        if self._byte_decoder is None:
            self._byte_decoder = _byte_decoder(self.tokenizer)
        raw = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(raw, str):
            if _BYTE_FALLBACK.fullmatch(raw):
                return [int(raw[3:5], 16)]
            if self._byte_decoder and all(ch in self._byte_decoder for ch in raw):
                return [self._byte_decoder[ch] for ch in raw]
        return list(self.piece(token_id).encode("utf-8"))

    def token_info(self, t: TokenUncertainty) -> dict[str, Any]:
        """One token: its text, id, p̄ and log p̄, entropies and MI (nats), p̄'s top tokens."""
        return {"token": self.piece(t.token_id), "token_id": t.token_id, "logprob": _finite(t.logprob),
                "prob": math.exp(t.logprob), "predictive_entropy": t.predictive_entropy,
                "expected_entropy": t.expected_entropy, "mutual_information": t.mutual_information,
                "bytes": self.token_bytes(t.token_id),
                "top_logprobs": [{"token": self.piece(i), "token_id": i, "logprob": _finite(lp),
                                  "bytes": self.token_bytes(i)} for i, lp in t.top_logprobs]}

    def completion_info(self, c: Completion) -> dict[str, Any]:
        """One answer: its text, why it ended, each token's :meth:`token_info` with its ``text_offset``
        (:func:`text_offsets`), the answer's scores."""
        tokens = [{**self.token_info(t), "text_offset": o}
                  for t, o in zip(c.tokens, text_offsets(self.tokenizer, c.token_ids), strict=True)]
        return {"text": c.text, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                "token_ids": list(c.token_ids), "tokens": tokens, "sequence": asdict(c.sequence)}

    def result_info(self, result: GenerationResult) -> dict[str, Any]:
        """The answer: mean mode, the one completion; per-sample mode, the majority answer's first
        sample as the answer, and every sample's answer with the clusters and semantic entropy."""
        out: dict[str, Any] = {"mode": result.mode, "n_samples": result.n_samples,
                               "prompt_tokens": result.prompt_tokens}
        if result.answers is None:
            out["completion"] = self.completion_info(result.completion)
            return out
        a = result.answers
        out["completion"] = self.completion_info(result.completions[a.clusters[0].members[0]])
        out["answers"] = {
            "samples": [{"text": c.text, "finish_reason": c.finish_reason, "sequence": asdict(c.sequence)}
                        for c in result.completions],
            "clusters": [{"key": cl.key, "members": list(cl.members), "share": cl.share} for cl in a.clusters],
            "majority": a.majority, "majority_share": a.majority_share, "semantic_entropy": a.semantic_entropy}
        return out


_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _byte_decoder(tokenizer: Any) -> dict[str, int]:
    """GPT-2's byte-to-character table reversed, where the tokenizer decodes byte-level (else empty)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None or "ByteLevel" not in type(decoder).__name__:
        return {}
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def _finite(logprob: float) -> float:
    """log p̄ for JSON: p̄ = 0 (underflow in float32) is -9999.0, as vLLM writes -inf."""
    return logprob if math.isfinite(logprob) else -9999.0


def held_back(text: str, stop: Sequence[str]) -> int:
    """How many characters at the end of ``text`` may not be shown yet: an incomplete character
    (:func:`~tfb_core.forward.completion.complete_text`), and before it the longest tail of the complete
    text that a stop string starts with (the stop string may complete with the next token)."""
    complete = complete_text(text)
    hold = 0
    for s in stop:
        for k in range(min(len(s), len(complete)), 0, -1):
            if complete.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - len(complete) + hold


def text_offsets(tokenizer: Any, token_ids: Sequence[int]) -> list[int]:
    """OpenAI's completions ``text_offset`` of each token: where its text begins in the answer's text,
    counted in characters of that text (the decoding without special tokens). The rule: the number
    of complete characters the tokens before it decode to, so the tokens that share a character split
    over them (an emoji in byte-level BPE) share that character's offset, and the offsets of the
    tokens that follow stay true to the text (summing each token's own text, as vLLM does, counts a
    U+FFFD per piece). Offsets past a stop string point beyond the text cut before it."""
    ids = list(token_ids)
    prefixes = tokenizer.batch_decode([ids[:i] for i in range(len(ids))], skip_special_tokens=True)
    return [len(complete_text(text)) for text in prefixes]


@dataclass
class GenerationUpdate:
    """What one request got from a step: a token (with the text now safe to show), its end (the
    result, JSON-ready), or its error."""

    key: Hashable
    token: dict[str, Any] | None = None  # token_info of a mean-mode request's token
    text: str = ""  # text to append (may be empty: held back)
    result: dict[str, Any] | None = None  # result_info, once the request ended
    error: BaseException | None = None


@dataclass
class _Entry:
    key: Hashable
    request: GenerationRequest
    stream: bool  # send token updates
    index: int = -1  # in the decoding
    sent: str = ""  # text sent so far
    decoded: int = 0  # complete characters its tokens so far decode to: the next token's text_offset
    stop: tuple[str, ...] = field(default_factory=tuple)


class GenerationBatch:
    """A running :class:`~tfb_core.forward.decoding.Decoding` and the requests waiting to join it,
    keyed by the caller's handles. One thread calls every method (the model's)."""

    def __init__(self, service: GenerationService) -> None:
        self.service = service
        self.decoding: Decoding | None = None
        self._running: dict[int, _Entry] = {}  # request index in the decoding -> entry
        self._waiting: list[_Entry] = []

    @property
    def busy(self) -> bool:
        """Whether a step has work: a request decoding or waiting to join."""
        return bool(self._running) or bool(self._waiting)

    @property
    def rows(self) -> int:
        """Rows of the running decode's forwards."""
        return 0 if self.decoding is None else len(self.decoding.rows)

    def submit(self, key: Hashable, request: GenerationRequest, stream: bool = False) -> None:
        """Queue ``request``: it joins the decode at the next step (``stream``: token updates too)."""
        self._waiting.append(_Entry(key, request, stream, stop=tuple(request.stop)))

    def cancel(self, key: Hashable) -> bool:
        """Drop the request of ``key``, waiting or decoding (its rows leave at once). Returns whether found."""
        for i, e in enumerate(self._waiting):
            if e.key == key:
                del self._waiting[i]
                return True
        for idx, e in list(self._running.items()):
            if e.key == key:
                del self._running[idx]
                if self.decoding is not None:
                    self.decoding.cancel(idx)
                    self.decoding.release(idx)
                return True
        return False

    def fail_all(self, exc: BaseException) -> list[GenerationUpdate]:
        """Every request ends with ``exc`` (the decode's state is unknown after an error): reset."""
        out = [GenerationUpdate(e.key, error=exc) for e in [*self._running.values(), *self._waiting]]
        self._running.clear()
        self._waiting.clear()
        self.decoding = None
        return out

    def _admit(self) -> list[GenerationUpdate]:
        """Start or join the waiting requests; one that the running decode refuses (another sigma of
        one adapter) waits for it to end; one that a decode of its own refuses gets the error."""
        if self.decoding is not None and self.decoding.done:
            self.decoding = None
        if not self._waiting:
            return []
        entries, self._waiting = self._waiting, []
        groups = [entries] if len(entries) > 1 else []
        groups += [[e] for e in entries]
        out: list[GenerationUpdate] = []
        admitted: set[int] = set()
        for group in groups:
            if any(id(e) in admitted for e in group):
                continue
            reqs = [e.request for e in group]
            try:
                if self.decoding is None:
                    self.decoding = self.service.generator.start(reqs)
                    idx = list(range(len(reqs)))
                else:
                    idx = self.decoding.join(reqs)
            except ValueError as exc:
                if len(group) == 1 and (self.decoding is None or self.decoding.done):
                    out.append(GenerationUpdate(group[0].key, error=exc))
                    admitted.add(id(group[0]))
                continue
            for e, i in zip(group, idx, strict=True):
                e.index = i
                self._running[i] = e
                admitted.add(id(e))
        self._waiting = [e for e in entries if id(e) not in admitted]
        return out

    def step(self) -> list[GenerationUpdate]:
        """Admit the waiting requests, then one token for every active stream. Returns the updates."""
        out = self._admit()
        if self.decoding is None or self.decoding.done:
            return out
        events = self.decoding.step()
        svc = self.service
        ended: list[int] = []
        results: dict[int, Any] = {}

        def result(idx: int) -> Any:
            if idx not in results:
                results[idx] = self.decoding.result(idx)
            return results[idx]

        for ev in events:
            e = self._running.get(ev.request)
            if e is None:
                continue
            if ev.finish_reason is not None and self.decoding.finished(ev.request):
                ended.append(ev.request)
            if not e.stream or e.request.mode != "mean":
                continue
            st = self.decoding.streams[self.decoding.stream_ids(ev.request)[0]]  # mean mode: its one stream
            token = {**svc.token_info(ev.token), "text_offset": e.decoded}
            if ev.finish_reason is not None:
                text = result(ev.request).completion.text
                delta = text[len(e.sent):] if text.startswith(e.sent) else ""
            else:
                text = svc.tokenizer.decode(st.token_ids, skip_special_tokens=True)
                e.decoded = len(complete_text(text))
                safe = text[:len(text) - held_back(text, e.stop)]
                delta = safe[len(e.sent):] if safe.startswith(e.sent) and len(safe) > len(e.sent) else ""
            e.sent += delta
            out.append(GenerationUpdate(e.key, token=token, text=delta))
        for idx in dict.fromkeys(ended):
            e = self._running.pop(idx)
            out.append(GenerationUpdate(e.key, result=svc.result_info(result(idx))))
            self.decoding.release(idx)  # a decode that requests keep joining may never end
        if self.decoding.done:
            self.decoding = None
        return out
