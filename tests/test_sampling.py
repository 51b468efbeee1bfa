"""The batched Monte Carlo forward: equivalences, determinism, independence of the batch."""

from __future__ import annotations

import pytest
import torch

from tfb_core.bayes.posterior import NoiseDraw
from tfb_core.decide.uncertainty import summarize
from tfb_core.forward.layout import Job
from tfb_core.forward.planning import plan_chunks

PROMPTS = ["a great film with a wonderful cast", "a dull mess", "I would not watch it again", "superb"]


def test_batched_forward_equals_sequential_single_sample_forwards(classifier):
    sigma, n = 0.3, 5
    draw = classifier.posterior.draw(seed=7, n_samples=n)
    batched = classifier.sample_probs(PROMPTS, n, sigma=sigma, noise=draw)  # (B, N, C), one forward
    tokens = classifier.tokenize(PROMPTS)
    for s in range(n):
        for b, toks in enumerate(tokens):  # one prompt, one sample, one forward: no padding, no batch
            z_rows = [z[s:s + 1] for z in draw.z]
            logits = classifier.class_logits([toks], z_rows, sigma)
            torch.testing.assert_close(batched[b, s], torch.softmax(logits[0], -1).cpu(), atol=1e-5, rtol=1e-4)


def test_same_seed_same_answer_other_seed_other_answer(classifier):
    a = classifier.sample_probs(PROMPTS, 6, seed=1, sigma=0.3)
    b = classifier.sample_probs(PROMPTS, 6, seed=1, sigma=0.3)
    c = classifier.sample_probs(PROMPTS, 6, seed=2, sigma=0.3)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-4)


def test_first_k_samples_do_not_depend_on_n(classifier):
    small, large = classifier.posterior.draw(5, 3), classifier.posterior.draw(5, 8)
    for zs, zl in zip(small.z, large.z, strict=True):
        assert torch.equal(zs, zl[:3])


def test_mutual_information_is_zero_at_sigma_zero_and_grows(classifier):
    mi = []
    for sigma in (0.0, 0.05, 0.2, 0.6):
        u = summarize(classifier.sample_probs(PROMPTS, 8, seed=0, sigma=sigma))
        mi.append(float(u.mutual_information.mean()))
        assert torch.all(u.mutual_information >= 0)
        torch.testing.assert_close(u.predictive_entropy - u.expected_entropy, u.mutual_information,
                                   atol=1e-6, rtol=0)
    assert mi[0] == 0.0
    assert mi[0] < mi[1] < mi[2] < mi[3]


def test_result_does_not_depend_on_the_rest_of_the_batch(classifier):
    """One input alone, and in ONE padded forward with longer and shorter inputs: the same answer."""
    draw = classifier.posterior.draw(seed=11, n_samples=4)
    toks = classifier.tokenize(PROMPTS)
    assert len({len(t) for t in toks}) > 1  # padding differs between the rows
    alone = classifier.run_jobs([Job(toks[1], 4, draw)], sigma=0.3)[0]
    calls = []
    backbone = classifier.backbone
    classifier.backbone = lambda **kw: calls.append(kw["input_ids"].shape) or backbone(**kw)
    try:
        together = classifier.run_jobs([Job(t, 4, draw) for t in toks], sigma=0.3)
    finally:
        classifier.backbone = backbone
    assert calls == [(4 * len(PROMPTS), max(len(t) for t in toks))]  # all rows in one forward
    torch.testing.assert_close(alone, together[1], atol=1e-5, rtol=1e-4)


def test_mixed_jobs_in_one_forward_match_separate_forwards(classifier):
    """Jobs with their own seeds and N share a forward without changing each other's answer."""
    toks = classifier.tokenize(PROMPTS[:3])
    d1, d2 = classifier.posterior.draw(1, 4), classifier.posterior.draw(2, 6)
    jobs = [Job(toks[0], 4, d1), Job(toks[1], 6, d2), Job(toks[2], 2, d1)]
    mixed = classifier.run_jobs(jobs, sigma=0.3)
    for job, res in zip(jobs, mixed, strict=True):
        alone = classifier.run_jobs([job], sigma=0.3)[0]
        assert res.shape == (job.n_samples, 2)
        torch.testing.assert_close(res, alone, atol=1e-5, rtol=1e-4)


def test_noise_is_common_random_numbers_scaled_by_sigma(classifier):
    """Folding sigma into the draw equals passing sigma: the search evaluates many sigmas at once."""
    draw = classifier.posterior.draw(3, 3)
    direct = classifier.sample_probs(PROMPTS, 3, sigma=0.25, noise=draw)
    folded = classifier.sample_probs(PROMPTS, 3, sigma=1.0, noise=NoiseDraw(3, [z * 0.25 for z in draw.z]))
    torch.testing.assert_close(direct, folded, atol=1e-5, rtol=1e-4)


def test_shared_prompt_prefix_runs_once_per_sample_with_the_same_result(classifier):
    """A task's instruction is common to every row: running it once per sample changes nothing."""
    from tfb_core.data.tasks import get_task

    task = get_task("sst2")
    prompts = [task.format(s) for s in PROMPTS]
    from tfb_core.forward.planning import _common_prefix

    assert _common_prefix(classifier.tokenize(prompts)) >= 8
    draw = classifier.posterior.draw(seed=2, n_samples=5)
    results = {}
    for share in (True, False):
        classifier.share_prefix = share
        toks = classifier.tokenize(prompts)
        mixed = [Job(toks[0], 5, draw), Job(toks[1], 3, classifier.posterior.draw(9, 3)), Job(toks[2], 2, None)]
        results[share] = (classifier.sample_probs(prompts, 5, sigma=0.3, noise=draw),  # rows grouped by sample
                          classifier.sample_probs(prompts, 5, sigma=0.0),  # posterior mean: one prefix row
                          classifier.run_jobs(mixed, sigma=0.3))  # per-row noise: no sharing possible
    calls = []
    backbone = classifier.backbone
    classifier.backbone = lambda **kw: calls.append(kw["input_ids"].shape) or backbone(**kw)
    classifier.share_prefix = True
    classifier.forward_overhead_tokens = classifier.max_batch_tokens = 1e9  # one forward for all four prompts
    classifier.prefix_cache.clear()  # computed again, not reused from above
    classifier.sample_probs(prompts, 5, sigma=0.3, noise=draw)
    prefix = _common_prefix(classifier.tokenize(prompts))
    assert calls[0] == (5, prefix) and calls[1][0] == 20  # the prefix on 5 sample rows, the rest on 20
    for a, b in zip(results[True][:2], results[False][:2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(results[True][2], results[False][2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _chunk_tokens(tokens, rows, keys, chunk, prefix):
    one_key = len({keys[i] for i in chunk}) == 1  # the shared prefix is computed once, not per forward
    return sum(rows[i] for i in chunk) * (max(len(tokens[i]) for i in chunk) - (prefix if one_key else 0))


def _plan_cost(tokens, rows, keys, chunk, overhead, prefix):
    return overhead + _chunk_tokens(tokens, rows, keys, chunk, prefix)


def _best_cost_brute_force(tokens, rows, keys, max_rows, overhead, prefix, max_tokens):
    """Cheapest split of the (key, length) order into consecutive forwards, by trying every split."""
    order = sorted(range(len(tokens)), key=lambda i: (str(keys[i]), len(tokens[i])))
    best = float("inf")
    for mask in range(2 ** (len(order) - 1)):
        chunks, start = [], 0
        for k in range(1, len(order)):
            if mask >> (k - 1) & 1:
                chunks.append(order[start:k])
                start = k
        chunks.append(order[start:])
        if any(len(c) > 1 and (sum(rows[i] for i in c) > max_rows
                               or _chunk_tokens(tokens, rows, keys, c, prefix) > max_tokens) for c in chunks):
            continue
        best = min(best, sum(_plan_cost(tokens, rows, keys, c, overhead, prefix) for c in chunks))
    return best


def test_plan_chunks_covers_every_input_once_within_the_row_limit_at_least_cost():
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = int(torch.randint(1, 8, (1,), generator=gen))
        prefix = [7] * 9 if trial % 2 else []  # with and without a shared instruction (>= 8 tokens)
        tokens = [prefix + [100 + i] * int(torch.randint(1, 40, (1,), generator=gen)) for i in range(n)]
        rows = [int(torch.randint(1, 12, (1,), generator=gen)) for _ in range(n)]
        keys = [int(torch.randint(0, 2, (1,), generator=gen)) for _ in range(n)]
        max_rows, overhead = int(torch.randint(1, 30, (1,), generator=gen)), [0, 5, 50, 1e6][trial % 4]
        max_tokens = [None, 200][trial % 3 == 0]
        plan = plan_chunks(tokens, rows, max_rows, overhead, keys, max_tokens)
        shared = len(prefix) if n > 1 else 0
        assert sorted(i for c in plan for i in c) == list(range(n))
        assert all(len(c) == 1 or sum(rows[i] for i in c) <= max_rows for c in plan)
        assert max_tokens is None or all(len(c) == 1 or _chunk_tokens(tokens, rows, keys, c, shared) <= max_tokens
                                         for c in plan)
        cost = sum(_plan_cost(tokens, rows, keys, c, overhead, shared) for c in plan)
        assert cost == _best_cost_brute_force(tokens, rows, keys, max_rows, overhead, shared,
                                              float("inf") if max_tokens is None else max_tokens)


def test_plan_chunks_buckets_by_length_when_forwards_are_cheap_and_packs_when_not():
    tokens = [[1] * 5, [1] * 200, [1] * 6, [1] * 198]
    assert plan_chunks(tokens, [10] * 4, 64, overhead_tokens=32) == [[0, 2], [3, 1]]
    assert plan_chunks(tokens, [10] * 4, 64, overhead_tokens=1e6) == [[0, 2, 3, 1]]
    assert plan_chunks(tokens, [10] * 4, 20, overhead_tokens=1e6) == [[0, 2], [3, 1]]  # row limit
    assert plan_chunks([[1] * 5], [99], 64, 32) == [[0]]  # too many rows for a forward: alone
    assert plan_chunks(tokens, [10] * 4, 64, overhead_tokens=1e6, max_tokens=2000) == [[0, 2], [3], [1]]
    # other draws lose the shared prompt prefix: kept apart where that costs more than a forward
    shared = [[7] * 30 + [i] * 5 for i in range(4)]
    assert plan_chunks(shared, [10] * 4, 64, overhead_tokens=32, keys="abab") == [[0, 2], [1, 3]]
    assert plan_chunks(shared, [10] * 4, 64, overhead_tokens=32, keys="aaaa") == [[0, 1, 2, 3]]
    assert plan_chunks(shared, [10] * 4, 64, overhead_tokens=1e6, keys="abab") == [[0, 2, 1, 3]]


def test_forwards_planned_by_length_give_the_same_probabilities(classifier):
    prompts = [p * k for k in (1, 6) for p in PROMPTS]  # short and long inputs
    draw = classifier.posterior.draw(seed=4, n_samples=3)
    calls = []
    backbone = classifier.backbone
    classifier.backbone = lambda **kw: calls.append(kw["input_ids"].shape) or backbone(**kw)
    results = {}
    classifier.max_batch_tokens = 1e9
    for overhead in (1e9, 0.0):  # one forward of everything; forwards by length
        classifier.forward_overhead_tokens = overhead
        calls.clear()
        results[overhead] = classifier.sample_probs(prompts, 3, sigma=0.3, noise=draw)
        results[overhead, "forwards"] = len(calls)
    assert results[1e9, "forwards"] == 1 < results[0.0, "forwards"]
    torch.testing.assert_close(results[0.0], results[1e9], atol=1e-5, rtol=1e-4)


def test_shared_prefix_is_reused_by_later_forwards_with_the_same_samples(classifier):
    """The instruction's keys and values are computed once per posterior sample and reused by the
    next forwards (other prompts, also one prompt alone), and never for other samples or sigma."""
    from tfb_core.data.tasks import get_task

    task = get_task("sst2")
    prompts = [task.format(s) for s in PROMPTS]
    draw, other = classifier.posterior.draw(seed=2, n_samples=4), classifier.posterior.draw(seed=3, n_samples=4)
    expected = {}
    classifier.share_prefix = False
    for name, d, sigma in (("a", draw, 0.3), ("b", other, 0.3), ("c", draw, 0.2), ("mean", None, 0.0)):
        expected[name] = classifier.sample_probs(prompts, 4, sigma=sigma, noise=d)
    classifier.share_prefix = True
    calls = []
    backbone = classifier.backbone
    classifier.backbone = lambda **kw: calls.append(kw["input_ids"].shape) or backbone(**kw)
    toks = classifier.tokenize(prompts)
    prefix = classifier.shared_prefix(toks)
    assert prefix >= 8
    got = torch.stack(classifier.run_jobs([Job(t, 4, draw) for t in toks[:2]], sigma=0.3, prefix=prefix))
    assert calls == [(4, prefix), (8, max(len(t) for t in toks[:2]) - prefix)]  # prefix on 4 sample rows
    calls.clear()
    for i in (2, 3):  # one prompt alone: its 4 rows reuse the prefix computed above
        got = torch.cat([got, classifier.run_jobs([Job(toks[i], 4, draw)], sigma=0.3, prefix=prefix)[0][None]])
    assert calls == [(4, len(toks[2]) - prefix), (4, len(toks[3]) - prefix)]
    torch.testing.assert_close(got, expected["a"], atol=1e-5, rtol=1e-4)
    for name, d, sigma in (("b", other, 0.3), ("c", draw, 0.2), ("mean", None, 0.0), ("a", draw, 0.3),
                           ("b", other, 0.3)):
        calls.clear()
        res = torch.stack(classifier.run_jobs([Job(t, 4, d) for t in toks], sigma=sigma, prefix=prefix))
        torch.testing.assert_close(res, expected[name], atol=1e-5, rtol=1e-4)
        # other samples or sigma: the prefix is computed once more; kept ones (a, b) are reused
        assert (calls[0][1] == prefix) == (name in ("b", "c", "mean") and len(calls) == 2)
    for _ in range(4):  # only the most recent few are kept
        classifier.run_jobs([Job(t, 4, classifier.posterior.draw(7, 4)) for t in toks], sigma=0.3, prefix=prefix)
    assert len(classifier.prefix_cache) == 4
    classifier.prefix_cache.clear()
    assert not len(classifier.prefix_cache)
    calls.clear()  # one input first: its prefix is computed on its own 4 rows, then reused
    for _ in range(2):
        res = classifier.run_jobs([Job(toks[3], 4, draw)], sigma=0.3, prefix=prefix)[0]
        torch.testing.assert_close(res, expected["a"][3], atol=1e-5, rtol=1e-4)
    assert calls == [(4, prefix), (4, len(toks[3]) - prefix), (4, len(toks[3]) - prefix)]
    calls.clear()  # without a prefix to keep, one input runs whole, as before
    classifier.run_jobs([Job(toks[3], 4, draw)], sigma=0.3)
    assert calls == [(4, len(toks[3]))]


def test_engine_knows_its_tasks_instruction(tiny):
    from tfb_core.config import ModelConfig
    from tfb_core.serving.config import EngineConfig
    from tfb_core.serving.startup import load_engine

    model = ModelConfig(model=str(tiny["model"]), adapter=str(tiny["adapter"]))
    sst2 = load_engine(EngineConfig(model=model, task="sst2", sigma=0.1))
    toks = sst2.classifier.tokenize(sst2.format_inputs(["a gripping story", "dull"]))
    assert sst2.prompt_prefix >= 8 and toks[0][:sst2.prompt_prefix] == toks[1][:sst2.prompt_prefix]
    assert load_engine(EngineConfig(model=model, labels=("no", "yes"), sigma=0.1)).prompt_prefix == 0


def test_forward_overhead_is_measured_from_forwards_of_one_and_several_inputs(classifier, monkeypatch):
    """A forward that costs 0.5 s plus 2 ms per token has a fixed cost of 250 tokens."""
    import tfb_core.forward.planning as sampling

    clock = [0.0]
    monkeypatch.setattr(sampling.time, "perf_counter", lambda: clock[0])
    prefix = 10

    def fake_run_jobs(jobs, sigma=None, class_ids=None, prefix=None):
        clock[0] += 0.5 + 0.002 * sum(j.n_samples * (len(j.tokens) - prefix) for j in jobs)

    monkeypatch.setattr(classifier, "run_jobs", fake_run_jobs)
    job = Job(list(range(40)), 4, classifier.posterior.draw(0, 4))
    assert classifier.measure_forward_overhead(job, 0.2, max_rows=64, prefix=prefix) == pytest.approx(250.0)
    assert classifier.forward_overhead_tokens == pytest.approx(250.0)
    assert classifier.measure_forward_overhead(job, 0.2, max_rows=4) is None  # one input per forward: nothing to fit


# --- the row layout alone: no model --------------------------------------------------------------------
def _job_rows(n_samples, draws):
    """The rows of inputs with N ``n_samples[j]`` and draw ``draws[j]`` (None: sigma = 0), as run_jobs makes them."""
    from tfb_core.forward.layout import job_rows

    return [row for j, (n, d) in enumerate(zip(n_samples, draws, strict=True))
            for row in job_rows(j, 0, n, d, 0.0 if d is None else 1.0)]


def _owner(rows):
    from tfb_core.forward.layout import layout

    order, plans = layout(rows)
    return [(rows[i].stream, rows[i].sample) for i in order], plans


def test_row_layout_shares_one_sample_per_group_of_rows_when_every_draw_has_equal_jobs():

    a, b = NoiseDraw(0, [torch.zeros(3, 1, 1)]), NoiseDraw(1, [torch.ones(3, 1, 1)])
    owner, (plan,) = _owner(_job_rows([3, 3], [a, a]))  # two inputs, one draw, N = 3: sample-major
    assert plan.uniform and plan.group == 2 and plan.key == ((a.key, 3),)
    assert owner == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    owner, (plan,) = _owner(_job_rows([2, 2, 2, 2], [a, b, a, b]))  # two draws of two inputs each
    assert plan.uniform and plan.group == 2 and plan.key == ((a.key, 2), (b.key, 2))
    assert owner == [(0, 0), (2, 0), (0, 1), (2, 1), (1, 0), (3, 0), (1, 1), (3, 1)]


def test_row_layout_gathers_samples_when_draws_differ_in_jobs_or_n_and_the_mean_takes_one_row():

    a, b = NoiseDraw(0, [torch.zeros(3, 1, 1)]), NoiseDraw(1, [torch.ones(3, 1, 1)])
    owner, (plan,) = _owner(_job_rows([2, 3, 1], [a, a, None]))
    assert not plan.uniform and plan.group == 1 and plan.key is None
    assert owner == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, -1)]  # gathered; one mean row
    owner, (plan,) = _owner(_job_rows([4, 4], [None, None]))  # sigma = 0: one row per input stands for its 4
    assert owner == [(0, -1), (1, -1)] and not plan.uniform
    owner, (plan,) = _owner(_job_rows([2, 2, 2], [a, a, b]))  # draws with 2 and 1 jobs
    assert not plan.uniform and owner == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    with pytest.raises(ValueError, match="n_samples"):
        _job_rows([0], [a])
