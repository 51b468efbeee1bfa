"""The batched Monte Carlo forward: equivalences, determinism, independence of the batch."""

from __future__ import annotations

import torch

from tfb_core.posterior import NoiseDraw
from tfb_core.sampling import Job
from tfb_core.uncertainty import summarize

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
    draw = classifier.posterior.draw(seed=11, n_samples=4)
    alone = classifier.sample_probs(PROMPTS[1:2], 4, sigma=0.3, noise=draw)[0]
    together = classifier.sample_probs(PROMPTS, 4, sigma=0.3, noise=draw)[1]
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-4)


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
    from tfb_core.tasks import get_task

    task = get_task("sst2")
    prompts = [task.format(s) for s in PROMPTS]
    from tfb_core.sampling import _common_prefix

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
    classifier.sample_probs(prompts, 5, sigma=0.3, noise=draw)
    prefix = _common_prefix(classifier.tokenize(prompts))
    assert calls[0] == (5, prefix) and calls[1][0] == 20  # the prefix on 5 sample rows, the rest on 20
    for a, b in zip(results[True][:2], results[False][:2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(results[True][2], results[False][2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
