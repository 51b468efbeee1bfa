"""Bayesian generation on the tiny Llama with a non-zero-B LoRA: sigma = 0 is the plain peft model's
greedy decode, the batched N-sample decode is the mean of the samples decoded alone, the KV cache
changes nothing, seeds reproduce, sequences finish on their own, per-sample answers are each
sample's own greedy answer, adapters mix in one decode."""

from __future__ import annotations

import pytest
import torch
from conftest import DECODE_TOL as TOL
from conftest import DEVICE, LABELS, assert_decode_is_the_mean_of_samples_alone
from conftest import single_sample as _single

from tfb_core.bayes.posterior import sample_seed
from tfb_core.config import ModelConfig
from tfb_core.data.loading import load_adapter, load_base_model
from tfb_core.decide.generation import cluster_answers, mix_rows
from tfb_core.forward.completion import GenerationRequest
from tfb_core.forward.generator import BayesianGenerator
from tfb_core.serving.startup import load_classifier, load_classifiers

PROMPTS = ["a great film with a wonderful cast", "a dull mess", "I would not watch it again", "superb"]
SIGMA = 0.3


def _cfg(tiny, key: str = "adapter", dtype: str = "float32") -> ModelConfig:
    return ModelConfig(model=tiny["model"], adapter=tiny[key], device=DEVICE, dtype=dtype)


def _generator(tiny, key: str = "adapter", dtype: str = "float32") -> BayesianGenerator:
    cfg = _cfg(tiny, key, dtype)
    tok, model = load_base_model(cfg)
    return BayesianGenerator.from_peft(load_adapter(model, cfg), tok)


@pytest.fixture(scope="module")
def gen(tiny):
    return _generator(tiny)


@pytest.fixture(scope="module")
def tokens(gen):
    return [gen.tokenizer(p)["input_ids"] for p in PROMPTS]


def _vals(tokens, attr: str) -> torch.Tensor:
    return torch.tensor([getattr(t, attr) for t in tokens], dtype=torch.float64)


def _ids(result):
    return [c.token_ids for c in result.completions]


def test_sigma_zero_is_the_peft_models_greedy_generate_token_for_token(tiny, gen, tokens):
    cfg = _cfg(tiny)
    tok, model = load_base_model(cfg)
    peft_model = load_adapter(model, cfg)
    L = 12
    reqs = [GenerationRequest(t, n_samples=5, max_tokens=L) for t in tokens]  # one left-padded batch
    reqs += [GenerationRequest(t, n_samples=5, max_tokens=L, mode="per_sample") for t in tokens]
    # a noisy request in the same decode: the sigma = 0 rows ride in its noisy segment with zero noise
    results = gen.generate(reqs + [GenerationRequest(tokens[0], n_samples=3, sigma=SIGMA, max_tokens=4)])
    differs_from_base = False
    for i, t in enumerate(tokens):
        enc = {"input_ids": torch.tensor([t], device=DEVICE)}
        with torch.no_grad():
            out = peft_model.generate(**enc, attention_mask=torch.ones_like(enc["input_ids"]), do_sample=False,
                                      max_new_tokens=L, pad_token_id=tok.pad_token_id)
            with peft_model.disable_adapter():
                base = peft_model.generate(**enc, attention_mask=torch.ones_like(enc["input_ids"]),
                                           do_sample=False, max_new_tokens=L, pad_token_id=tok.pad_token_id)
        expected = out[0, len(t):].tolist()
        differs_from_base |= base[0, len(t):].tolist() != expected
        mean, per_sample = results[i], results[len(tokens) + i]
        assert mean.completion.token_ids == expected
        assert _ids(per_sample) == [expected] * 5  # the N samples are one model: N identical answers
        assert per_sample.answers.semantic_entropy == 0.0
        for token in mean.completion.tokens + per_sample.completion.tokens:
            assert token.mutual_information == 0.0  # exactly, by construction
            assert token.expected_entropy == token.predictive_entropy
        assert mean.completion.sequence.max_mutual_information == 0.0
    assert differs_from_base  # the LoRA changes the answers: the comparison is not the base model's


def test_batched_n_sample_decode_equals_each_sample_alone(gen, tokens):
    """p̄ of the N rows of one decode = the mean of the N samples, each computed alone (one row, its
    own forward): tokens, p̄(y), entropies, MI and top logprobs, for two sequences of different
    length and seed in one batch."""
    n = 4
    draw = gen.posteriors[0].draw(7, n)
    reqs = [GenerationRequest(tokens[0], n_samples=n, sigma=SIGMA, max_tokens=6, noise=draw, top_logprobs=3),
            GenerationRequest(tokens[1], n_samples=n, sigma=SIGMA, max_tokens=6, seed=3, top_logprobs=3)]
    for req, res in zip(reqs, gen.generate(reqs), strict=True):
        assert_decode_is_the_mean_of_samples_alone(gen, req, res)


def test_kv_cache_decode_equals_a_full_recompute_at_every_step(gen, tokens):
    """Every step of the cached decode (a left-padded batch of three, rows leaving as they end) equals
    a forward of prompt + tokens so far with no cache. Two requests share a draw, the third has its
    own: rows go stream-major until it ends, then sample-major (the cache reordered)."""
    n = 3
    reqs = [GenerationRequest(tokens[i], n_samples=n, sigma=SIGMA, max_tokens=m, seed=seed, top_logprobs=2)
            for i, m, seed in ((0, 5, 4), (1, 3, 9), (3, 5, 4))]
    rows = []
    forward = gen.model.forward
    gen.model.forward = lambda **kw: rows.append(kw["input_ids"].shape[0]) or forward(**kw)
    try:
        results = gen.generate(reqs)
    finally:
        del gen.model.forward
    assert rows == [9, 9, 9, 6, 6]  # the prefill, then a step per token; the ended request's rows leave
    for req, res in zip(reqs, results, strict=True):
        y = res.completion.token_ids
        assert len(y) == req.max_tokens
        for t, token in enumerate(res.completion.tokens):
            logits = gen.continuation_logits(req, y[:t + 1])[:, -1]  # (N, V): the step recomputed
            mixed = mix_rows(logits, torch.zeros(n, dtype=torch.long), 1)
            assert int(mixed.probs.argmax()) == token.token_id
            got = torch.tensor([token.logprob, token.predictive_entropy, token.expected_entropy,
                                token.mutual_information], dtype=torch.float64)
            want = torch.stack([mixed.probs[0, token.token_id].double().log(), mixed.predictive_entropy[0],
                                mixed.expected_entropy[0], mixed.mutual_information[0]])
            torch.testing.assert_close(got, want, **TOL)
            assert [i for i, _ in token.top_logprobs] == mixed.probs[0].topk(2).indices.tolist()


def test_score_is_the_uncertainty_of_a_given_answer(gen, tokens):
    req = GenerationRequest(tokens[2], n_samples=4, sigma=SIGMA, max_tokens=6, seed=5)
    (res,) = gen.generate([req])
    scored, scores = gen.score(req, res.completion.token_ids)
    for a, b in zip(scored, res.completion.tokens, strict=True):
        assert a.token_id == b.token_id
        torch.testing.assert_close(torch.tensor([a.logprob, a.mutual_information, a.predictive_entropy]),
                                   torch.tensor([b.logprob, b.mutual_information, b.predictive_entropy]), **TOL)
    assert scores.nll == pytest.approx(res.completion.sequence.nll, rel=1e-4)


def test_per_sample_answers_are_each_samples_own_greedy_decode(gen, tokens):
    """The oracle: N single-sample decodes, one after the other. Rows stop at different steps on a
    stop token that only some samples produce, so rows leave the batch one by one."""
    n, draw = 5, gen.posteriors[0].draw(11, 5)
    base = GenerationRequest(tokens[0], n_samples=n, sigma=0.6, max_tokens=8, mode="per_sample", noise=draw)
    free = _ids(gen.generate([base])[0])
    assert len({tuple(a) for a in free}) > 1  # the samples disagree
    # a token some answers produce early (from position 1) and some never: a stop token for those
    stop = next(t for a in free for t in a[1:4] if any(t not in b for b in free))
    req = GenerationRequest(**{**base.__dict__, "stop_token_ids": [stop]})
    res = gen.generate([req, GenerationRequest(tokens[1], n_samples=2, sigma=0.6, max_tokens=8)])[0]
    lengths = set()
    for s, completion in enumerate(res.completions):
        alone = gen.generate([GenerationRequest(tokens[0], n_samples=1, sigma=0.6, max_tokens=8,
                                                noise=_single(draw, s), stop_token_ids=[stop])])[0].completion
        assert completion.token_ids == alone.token_ids
        assert completion.finish_reason == alone.finish_reason
        torch.testing.assert_close(_vals(completion.tokens, "logprob"), _vals(alone.tokens, "logprob"), **TOL)
        assert all(t.mutual_information == 0.0 for t in completion.tokens)  # one model per answer
        lengths.add(len(completion.token_ids))
    assert len(lengths) > 1  # rows did finish at different steps
    assert res.answers == cluster_answers([c.text for c in res.completions])


def test_per_sample_at_sigma_zero_and_temperature_one_is_k_samples_of_the_plain_model(gen, tokens):
    """The classical semantic-entropy baseline: K temperature-1 answers of the sigma = 0 model, in one
    decode; answer k is the plain model sampled alone with the answer's seed (sample_seed(seed, k))."""
    req = GenerationRequest(tokens[1], n_samples=4, max_tokens=6, temperature=1.0, sampling_seed=3, mode="per_sample")
    res = gen.generate([req])[0]
    assert len({tuple(a) for a in _ids(res)}) > 1  # the answers are samples, not one greedy answer
    for k, completion in enumerate(res.completions):
        alone = gen.generate([GenerationRequest(tokens[1], n_samples=1, max_tokens=6, temperature=1.0,
                                                sampling_seed=sample_seed(3, k))])[0].completion
        assert completion.token_ids == alone.token_ids
        assert all(t.mutual_information == 0.0 for t in completion.tokens)


def test_same_seed_same_output_other_seed_other_tokens_and_batch_independence(gen, tokens):
    kw = dict(n_samples=4, sigma=SIGMA, max_tokens=8, temperature=0.9, top_p=0.95, seed=2)
    reqs = [GenerationRequest(tokens[0], sampling_seed=5, **kw),
            GenerationRequest(tokens[1], sampling_seed=5, mode="per_sample", **kw)]
    a, b = gen.generate(reqs), gen.generate(reqs)
    assert [_ids(r) for r in a] == [_ids(r) for r in b]
    assert [[t.logprob for t in r.completion.tokens] for r in a] == [[t.logprob for t in r.completion.tokens]
                                                                    for r in b]
    other = gen.generate([GenerationRequest(tokens[0], sampling_seed=6, **kw)])[0]
    assert _ids(other) != _ids(a[0])
    alone = gen.generate([reqs[0]])[0]  # without the other request in the batch: the same tokens
    assert _ids(alone) == _ids(a[0])
    greedy = gen.generate([GenerationRequest(tokens[0], **{**kw, "temperature": 0.0})])[0]
    assert _ids(greedy) != _ids(a[0])  # the temperature is used


def test_finish_reasons_eos_stop_string_and_length_each_sequence_on_its_own(gen, tokens):
    free = [r.completion.token_ids for r in gen.generate(
        [GenerationRequest(t, n_samples=3, sigma=SIGMA, max_tokens=8) for t in tokens])]
    dec = lambda ids: gen.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    # a stop token: the first token of an answer not seen before it (from position 2)
    a, k = next((a, i) for a, y in enumerate(free) for i in range(2, 8) if y[i] not in y[:i])
    # a stop string: the text a token adds (from position 1; whole characters), not in the text before
    b, j = next((b, i) for b, y in enumerate(free) for i in range(1, 8)
                if (s := dec(y[:i + 1])[len(dec(y[:i])):]) and "\ufffd" not in s and s not in dec(y[:i]))
    y0, y1 = free[a], free[b]
    piece = dec(y1[:j + 1])[len(dec(y1[:j])):]
    reqs = [GenerationRequest(tokens[a], n_samples=3, sigma=SIGMA, max_tokens=8, stop_token_ids=[y0[k]]),
            GenerationRequest(tokens[b], n_samples=3, sigma=SIGMA, max_tokens=8, stop=["never there", piece]),
            GenerationRequest(tokens[a], n_samples=3, sigma=SIGMA, max_tokens=2)]
    eos, stop, length = (r.completion for r in gen.generate(reqs))
    assert (eos.finish_reason, eos.stop_reason, eos.token_ids) == ("stop", y0[k], y0[:k + 1])
    assert eos.text == dec(y0[:k])  # the stop token is no text
    assert (stop.finish_reason, stop.stop_reason, stop.token_ids) == ("stop", piece, y1[:j + 1])
    assert stop.text == dec(y1[:j]) and piece not in stop.text  # cut before the stop string
    assert (length.finish_reason, length.stop_reason, length.token_ids) == ("length", None, y0[:2])
    assert len(eos.tokens) == len(eos.token_ids) and eos.sequence.n_tokens == k + 1
    # the sequence that went on after the others ended decoded as it does in the full batch
    full = gen.generate([GenerationRequest(tokens[a], n_samples=3, sigma=SIGMA, max_tokens=8)])[0]
    torch.testing.assert_close(_vals(eos.tokens, "logprob"), _vals(full.completion.tokens[:k + 1], "logprob"),
                               **TOL)


def test_bfloat16_model_generates_on_cpu(tiny, tokens):
    gen16 = _generator(tiny, dtype="bfloat16")
    assert next(gen16.model.parameters()).dtype == torch.bfloat16
    reqs = [GenerationRequest(tokens[0], n_samples=3, max_tokens=5),
            GenerationRequest(tokens[1], n_samples=3, sigma=SIGMA, max_tokens=5, top_logprobs=2),
            GenerationRequest(tokens[2], n_samples=3, sigma=SIGMA, max_tokens=5, mode="per_sample")]
    zero, noisy, per_sample = gen16.generate(reqs)
    assert all(t.mutual_information == 0.0 for t in zero.completion.tokens)
    assert any(t.mutual_information > 0.0 for t in noisy.completion.tokens)
    vocab = torch.log(torch.tensor(float(len(gen16.tokenizer))))
    for t in noisy.completion.tokens:
        assert t.logprob <= 0.0 and 0.0 <= t.predictive_entropy <= vocab + 1e-4 and t.mutual_information >= 0.0
        assert t.predictive_entropy == pytest.approx(t.expected_entropy + t.mutual_information, abs=1e-9)
    assert len(per_sample.completions) == 3 and all(len(c.token_ids) == 5 for c in per_sample.completions)


@pytest.mark.parametrize("sigmas", [(SIGMA, 0.0), (SIGMA, 0.5)])
def test_adapters_mixed_in_one_decode_equal_each_adapter_alone(tiny, tokens, sigmas):
    keys = ("adapter", "adapter_other")
    many = BayesianGenerator.from_classifier(load_classifiers([_cfg(tiny, k) for k in keys], [LABELS, LABELS])[0])
    assert len(many.posteriors) == 2
    reqs = [GenerationRequest(tokens[i], n_samples=3, sigma=sigmas[a], max_tokens=5, seed=i, adapter=a)
            for i in range(3) for a in range(2)]  # interleaved adapters
    calls = []
    forward = many.model.forward
    many.model.forward = lambda **kw: calls.append(kw["input_ids"].shape[0]) or forward(**kw)
    mixed = many.generate(reqs)
    assert calls[0] == sum(3 if sigmas[a] > 0 else 1 for a in range(2)) * 3  # all rows in one prefill
    for a, key in enumerate(keys):
        alone = BayesianGenerator.from_classifier(load_classifier(_cfg(tiny, key), LABELS))
        for i in range(3):
            req = GenerationRequest(tokens[i], n_samples=3, sigma=sigmas[a], max_tokens=5, seed=i)
            ref = alone.generate([req])[0].completion
            got = mixed[2 * i + a].completion
            assert got.token_ids == ref.token_ids
            torch.testing.assert_close(torch.tensor([[t.logprob, t.mutual_information] for t in got.tokens]),
                                       torch.tensor([[t.logprob, t.mutual_information] for t in ref.tokens]), **TOL)
    with pytest.raises(ValueError, match="one sigma per forward"):
        many.generate([GenerationRequest(tokens[0], sigma=0.1), GenerationRequest(tokens[1], sigma=0.2)])


def test_requests_join_a_running_decode_and_each_answer_is_its_own(gen, tokens):
    """Continuous batching: requests join between steps (their prefill separate, their cache rows
    appended with left padding), the longest prompt leaves early (its padding is cut off the cache),
    and every answer equals the request decoded alone."""
    kw = dict(n_samples=3, sigma=SIGMA, seed=4, top_logprobs=2)
    first = [GenerationRequest(tokens[0], max_tokens=2, **kw), GenerationRequest(tokens[3], max_tokens=7, **kw)]
    later = [GenerationRequest(tokens[2], max_tokens=5, **kw),
             GenerationRequest(tokens[1], max_tokens=4, mode="per_sample", **{**kw, "seed": 8})]
    decoding = gen.start(first)
    decoding.step()
    assert decoding.join(later[:1]) == [2]
    decoding.step()
    with pytest.raises(ValueError, match="one sigma per forward"):  # refused, and nothing changed
        decoding.join([GenerationRequest(tokens[1], n_samples=3, sigma=0.1)])
    decoding.step()
    assert decoding.join(later[1:]) == [3]
    while not decoding.done:
        decoding.step()
        if not decoding.done:
            assert bool(decoding.mask.any(0).all())  # no column that no row attends to
    assert decoding.mask is None
    for req, res in zip(first + later, decoding.results(), strict=True):
        alone = gen.generate([req])[0]
        assert _ids(res) == _ids(alone)
        for got, ref in zip(res.completions, alone.completions, strict=True):
            torch.testing.assert_close(_vals(got.tokens, "logprob"), _vals(ref.tokens, "logprob"), **TOL)
            torch.testing.assert_close(_vals(got.tokens, "mutual_information"),
                                       _vals(ref.tokens, "mutual_information"), **TOL)


def test_a_cancelled_request_leaves_the_decode_and_the_others_answers_do_not_change(gen, tokens):
    """Decoding.cancel between steps: the request's rows leave the forwards at once (rows counted),
    its streams end "cancelled", and every other request's answer equals its decode alone."""
    kw = dict(n_samples=3, sigma=SIGMA, seed=4)
    reqs = [GenerationRequest(tokens[0], max_tokens=6, **kw), GenerationRequest(tokens[3], max_tokens=6, **kw),
            GenerationRequest(tokens[2], max_tokens=6, mode="per_sample", **kw)]
    decoding = gen.start(reqs)
    decoding.step()
    assert len(decoding.rows) == 9
    assert decoding.cancel(1) is True
    assert len(decoding.rows) == 6 and decoding.finished(1) and not decoding.finished(0)
    assert decoding.cancel(1) is False  # already out
    decoding.step()
    assert decoding.cancel(2) is True
    assert len(decoding.rows) == 3
    while not decoding.done:
        decoding.step()
    res = decoding.results()
    assert res[1].completion.finish_reason == "cancelled" and len(res[1].completion.token_ids) == 1
    assert {c.finish_reason for c in res[2].completions} == {"cancelled"}
    alone = gen.generate([reqs[0]])[0]
    assert _ids(res[0]) == _ids(alone)
    torch.testing.assert_close(_vals(res[0].completion.tokens, "mutual_information"),
                               _vals(alone.completion.tokens, "mutual_information"), **TOL)
    # cancelling the last request ends the decoding
    decoding = gen.start(reqs[:1])
    decoding.step()
    decoding.cancel(0)
    assert decoding.done and decoding.cache is None


def test_a_released_request_holds_nothing_and_the_decode_goes_on(gen, tokens):
    kw = dict(n_samples=3, sigma=SIGMA, seed=4)
    reqs = [GenerationRequest(tokens[0], max_tokens=2, **kw), GenerationRequest(tokens[1], max_tokens=5, **kw)]
    decoding = gen.start(reqs)
    with pytest.raises(RuntimeError, match="still decoding"):
        decoding.release(0)
    decoding.step()
    decoding.step()
    first = decoding.result(0)
    decoding.release(0)
    assert 0 not in decoding.requests and all(st.request != 0 for st in decoding.streams.values())
    with pytest.raises(RuntimeError, match="released"):
        decoding.result(0)
    while not decoding.done:
        decoding.step()
    assert _ids(first) == _ids(gen.generate([reqs[0]])[0])
    assert _ids(decoding.result(1)) == _ids(gen.generate([reqs[1]])[0])


def _with_head(head: list[int], tok, texts) -> list[list[int]]:
    return [head + tok(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.mark.parametrize("sigma", [0.0, SIGMA])
def test_a_shared_prefix_is_computed_once_per_sample_and_answers_as_the_whole_prompt(tiny, tokens, sigma):
    """Prompts that start with the generator's prefix (a chat template's head) read its keys and values
    from the kept rows (one per sample, computed once, reused by later decodes and by requests joining
    a running one), and answer as the whole prompt computed each time: the same tokens, the same
    probabilities and MI up to float rounding; a prompt without the prefix is computed whole."""
    whole, shared = _generator(tiny), _generator(tiny)
    head = tokens[0][:1] + shared.tokenizer("system: you answer briefly. user:", add_special_tokens=False)["input_ids"]
    shared.set_prefix(head, rows=8)
    prompts = _with_head(head, shared.tokenizer, PROMPTS[1:])
    # the served way: one kept draw per seed (the engine's), so later decodes find its rows
    draw = shared.posteriors[0].draw(5, 3) if sigma > 0 else None
    kw = dict(n_samples=3, sigma=sigma, max_tokens=6, stop_token_ids=(), top_logprobs=2, noise=draw)
    reqs = [GenerationRequest(p, seed=5, **kw) for p in prompts[:2]]  # one draw: its 3 rows shared by both
    widths: list[int] = []
    forward = shared.model.forward
    shared.model.forward = lambda **k: widths.append(k["input_ids"].shape[1]) or forward(**k)
    got = shared.generate(reqs)
    assert widths[0] == len(head)  # the prefix's forward: once per sample, for both prompts
    assert widths[1] == max(len(p) for p in prompts[:2]) - len(head)  # then only the rest of each prompt
    assert len(shared.prefix_rows) == (1 if sigma == 0 else 3)
    widths.clear()
    decoding = shared.start([GenerationRequest(prompts[2], seed=5, **kw)])  # kept rows: no prefix forward
    decoding.step()
    decoding.join([GenerationRequest(tokens[1], seed=5, **kw)])  # no prefix: computed whole
    while not decoding.done:
        decoding.step()
    assert widths[0] == len(prompts[2]) - len(head) and widths[2] == len(tokens[1])
    results = got + decoding.results()
    for req, res in zip(reqs + [GenerationRequest(prompts[2], seed=5, **kw), GenerationRequest(tokens[1], seed=5, **kw)],
                        results, strict=True):
        ref = whole.generate([req])[0]
        assert _ids(res) == _ids(ref)
        for a, b in zip(res.completions, ref.completions, strict=True):
            for attr in ("logprob", "mutual_information", "predictive_entropy"):
                torch.testing.assert_close(_vals(a.tokens, attr), _vals(b.tokens, attr), **TOL)


def test_kept_prefix_rows_are_per_draw_and_sigma_and_bounded(tiny, tokens):
    """Another posterior draw or sigma is another row (a kept row never stands in for other noise),
    and the store keeps at most its rows: past them a decode computes its prefix itself, correctly."""
    gen = _generator(tiny)
    head = tokens[0][:1] + gen.tokenizer("system: be brief. user:", add_special_tokens=False)["input_ids"]
    gen.set_prefix(head, rows=4)
    prompt = _with_head(head, gen.tokenizer, PROMPTS[:1])[0]
    kw = dict(max_tokens=3, stop_token_ids=())
    one, two = gen.posteriors[0].draw(1, 2), gen.posteriors[0].draw(2, 2)
    gen.generate([GenerationRequest(prompt, n_samples=2, sigma=SIGMA, noise=one, **kw)])
    gen.generate([GenerationRequest(prompt, n_samples=2, sigma=SIGMA, noise=two, **kw)])  # another draw: 2 more rows
    assert len(gen.prefix_rows) == 4
    whole = _generator(tiny)
    for req in (GenerationRequest(prompt, n_samples=2, sigma=0.1, noise=one, **kw),  # another sigma, same draw
                GenerationRequest(prompt, n_samples=6, sigma=SIGMA, seed=3, **kw)):  # more rows than kept
        res, ref = gen.generate([req])[0], whole.generate([req])[0]
        assert _ids(res) == _ids(ref)
        torch.testing.assert_close(_vals(res.completion.tokens, "mutual_information"),
                                   _vals(ref.completion.tokens, "mutual_information"), **TOL)
    assert len(gen.prefix_rows) <= 4


def test_a_decode_that_never_ends_holds_only_its_live_requests(gen, tokens):
    """Continuous traffic through one decode: a request joins at every step while others end and are
    released (as the server does). What the decode keeps (requests, streams, their index, posterior
    draws) stays bounded by the requests still in it, not by the hundreds it served."""
    kw = dict(n_samples=2, sigma=SIGMA, stop_token_ids=())
    live_most = 0
    decoding = gen.start([GenerationRequest(tokens[0], max_tokens=3, seed=0, **kw)])
    served = 1
    results = {}
    while served < 300:
        decoding.join([GenerationRequest(tokens[served % 4], max_tokens=1 + served % 4, seed=served,
                                         mode="per_sample" if served % 2 else "mean", **kw)])
        served += 1
        decoding.step()
        live = len(decoding.requests)  # those that took this step's token
        live_most = max(live_most, live)
        assert live <= 4  # max_tokens <= 4: at most four requests are ever decoding at once
        assert len(decoding._by_request) == live and len(decoding._draws) <= live
        assert len(decoding.streams) == sum(len(decoding.stream_ids(r)) for r in decoding.requests) <= live * 2
        for r in [r for r in decoding.requests if decoding.finished(r)]:
            results[r] = decoding.result(r)
            decoding.release(r)
    while not decoding.done:
        decoding.step()
    assert live_most >= 3 and len(results) >= 295
    with pytest.raises(RuntimeError, match="released"):
        decoding.result(0)
    # the bookkeeping changed nothing of the answers: a late one equals its decode alone
    late = max(r for r in results if results[r].mode == "per_sample")
    req = GenerationRequest(tokens[late % 4], max_tokens=1 + late % 4, seed=late, mode="per_sample", **kw)
    assert _ids(results[late]) == _ids(gen.generate([req])[0])


def test_a_chat_prompts_path_does_not_depend_on_the_prompts_that_join_beside_it(tiny, tokens):
    """A prompt that starts with the kept chat head prefills from the kept rows whether or not a prompt
    without the head joins in the same call (the two kinds prefill apart): its first token's logits
    are bit-identical alone and in that company; its answer the same tokens, its later numbers equal
    up to rounding (its rows then share forwards with the other's)."""
    gen = _generator(tiny)
    head = tokens[0][:1] + gen.tokenizer("system: you answer briefly. user:", add_special_tokens=False)["input_ids"]
    gen.set_prefix(head, rows=8)
    chat_prompt = _with_head(head, gen.tokenizer, PROMPTS[2:3])[0]
    kw = dict(n_samples=3, sigma=SIGMA, max_tokens=6, stop_token_ids=(), noise=gen.posteriors[0].draw(5, 3), seed=5)
    chat, plain = GenerationRequest(chat_prompt, **kw), GenerationRequest(tokens[1], **kw)
    gen.generate([chat])  # the kept rows of the head: the same ones for both decodes below

    def first_logits(decoding, request: int) -> dict[int, torch.Tensor]:  # by posterior sample
        return {row.sample: decoding.logits[r].clone() for r, row in enumerate(decoding.rows)
                if decoding.streams[row.stream].request == request}

    alone = gen.start([chat])
    ref = first_logits(alone, 0)
    for company, at in (([chat, plain], 0), ([plain, chat], 1)):
        decoding = gen.start(company)
        got = first_logits(decoding, at)
        assert got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in ref)
        while not decoding.done:
            decoding.step()
        res = decoding.result(at)
        assert _ids(res) == _ids(gen.generate([chat])[0])
    while not alone.done:
        alone.step()
    torch.testing.assert_close(_vals(res.completion.tokens, "logprob"), _vals(alone.result(0).completion.tokens,
                                                                              "logprob"), **TOL)


@pytest.mark.parametrize("sigma", [0.0, SIGMA])
def test_a_per_sample_answer_at_temperature_is_the_same_alone_and_in_company(gen, tokens, sigma):
    """Each sample's token draws are seeded by the request's seed and the sample's index in the
    request, never by where its stream sits in the decode: the answers alone, after other requests in
    one start, and joining a running decode are the same."""
    req = GenerationRequest(tokens[2], n_samples=3, sigma=sigma, max_tokens=6, temperature=1.0, sampling_seed=7,
                            mode="per_sample", stop_token_ids=())
    other = GenerationRequest(tokens[0], n_samples=2, sigma=sigma, max_tokens=4, temperature=1.0, sampling_seed=7,
                              mode="per_sample", stop_token_ids=())
    alone = _ids(gen.generate([req])[0])
    assert len(set(map(tuple, alone))) > 1  # the samples are draws, not one answer
    assert _ids(gen.generate([other, req])[1]) == alone
    decoding = gen.start([other])
    decoding.step()
    [r] = decoding.join([req])
    while not decoding.done:
        decoding.step()
    assert _ids(decoding.result(r)) == alone


def test_a_join_that_fails_leaves_the_decode_as_it_was(gen, tokens):
    """A request refused mid-join (its prompt's forward raises) adds nothing: no request, stream or
    row stays behind to be retried, and the running request decodes on as alone."""
    kw = dict(n_samples=3, sigma=SIGMA, seed=4, max_tokens=5, stop_token_ids=())
    decoding = gen.start([GenerationRequest(tokens[0], **kw)])
    decoding.step()
    before = (dict(decoding.requests), dict(decoding.streams), list(decoding.rows), dict(decoding._draws))
    with pytest.raises((IndexError, RuntimeError)):  # a token id past the vocabulary: the embedding refuses it
        decoding.join([GenerationRequest([len(gen.tokenizer) + 10**6], **{**kw, "seed": 9})])
    assert (decoding.requests, decoding.streams, decoding.rows, decoding._draws) == before
    assert decoding.join([GenerationRequest(tokens[1], **kw)]) == [1]  # the next id: the failed one took none
    while not decoding.done:
        decoding.step()
    assert _ids(decoding.result(0)) == _ids(gen.generate([GenerationRequest(tokens[0], **kw)])[0])


@pytest.mark.parametrize("field", ["seed", "sampling_seed"])
def test_a_seed_torch_cannot_take_is_refused_by_the_request(tokens, field):
    GenerationRequest(tokens[0], **{field: 2**64 - 1})
    with pytest.raises(ValueError, match=f"{field} must be in"):
        GenerationRequest(tokens[0], **{field: 2**64})
    with pytest.raises(ValueError, match=f"{field} must be in"):
        GenerationRequest(tokens[0], **{field: -1})
