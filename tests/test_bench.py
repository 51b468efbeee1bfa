"""The benchmark's equivalences: grouped noise = per-row noise, and every baseline computes our samples."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tfb_core.forward.layout import Job

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

PROMPTS = ["a great film with a wonderful cast", "a dull mess", "I would not watch it again", "superb"]


def _delta_rows(classifier) -> list[int]:
    """Record the leading size of the first module's noise tensor at each forward."""
    from tfb_core.bayes.routing import RoutedLinear

    seen: list[int] = []
    slot = classifier.posterior.modules[0]  # the adapter's LoRA on a layer: the layer's RoutedLinear runs it
    layer = next(m for m in classifier.model.modules() if isinstance(m, RoutedLinear) and slot in m.slots.values())
    layer.register_forward_pre_hook(lambda m, args: seen.append(slot.z.shape[0] if slot.z is not None else 0))
    return seen


def test_grouped_noise_equals_one_copy_per_row_and_costs_n_not_n_times_b(classifier):
    n, sigma = 5, 0.3
    draw = classifier.posterior.draw(seed=4, n_samples=8)  # a larger draw: the first n samples are used
    tokens = classifier.tokenize(PROMPTS)
    seen = _delta_rows(classifier)
    grouped = torch.stack(classifier.run_jobs([Job(t, n, draw) for t in tokens], sigma=sigma))  # (B, N, C)
    assert seen == [n]  # N samples for N*B rows
    rows = [t for _ in range(n) for t in tokens]  # sample-major, as run_jobs lays them out
    z_rows = [z[:n].repeat_interleave(len(tokens), dim=0) for z in draw.z]  # (N*B, r, in)
    per_row = torch.softmax(classifier.class_logits(rows, z_rows, sigma), -1).view(n, len(tokens), -1)
    torch.testing.assert_close(grouped, per_row.transpose(0, 1).cpu(), atol=1e-5, rtol=1e-4)


def test_several_draws_with_equal_jobs_share_one_grouped_forward(classifier):
    tokens = classifier.tokenize(PROMPTS[:2])
    d1, d2 = classifier.posterior.draw(1, 3), classifier.posterior.draw(2, 4)
    seen = _delta_rows(classifier)
    jobs = [Job(tokens[0], 3, d1), Job(tokens[1], 3, d1), Job(tokens[0], 4, d2), Job(tokens[1], 4, d2)]
    together = classifier.run_jobs(jobs, sigma=0.3)
    assert seen == [7]  # 3 + 4 samples, each shared by 2 rows
    for job, res in zip(jobs, together, strict=True):
        torch.testing.assert_close(res, classifier.run_jobs([job], sigma=0.3)[0], atol=1e-5, rtol=1e-4)


def test_group_must_divide_the_rows(classifier):
    draw = classifier.posterior.draw(0, 3)
    tokens = classifier.tokenize(PROMPTS[:2])
    with pytest.raises(RuntimeError, match="noise for 6 rows"):
        classifier.class_logits([tokens[0]] * 4, draw.z, 0.3, group=2)
    with pytest.raises(ValueError, match="group must be >= 1"):
        classifier.posterior.set_noise(0.3, draw.z, group=0)


def test_every_baseline_computes_the_same_posterior_samples():
    from bench import equivalence
    from bench_models import Harness

    h = Harness("tiny", sigma=0.5)
    diffs = equivalence(h)
    for key in ("ref_full", "ref_last", "mixed", "plain_vs_ours_sigma0"):
        assert diffs[key] < 1e-5, (key, diffs)
    assert diffs["noise_effect"] > 1e-3  # the samples do differ from the mean
    ids = torch.randint(10, 500, (3, 12), generator=torch.Generator().manual_seed(0))
    draw = h.draw(4)
    torch.testing.assert_close(h.run_ours_rowwise(ids.tolist(), 4, draw), h.run_ours(ids.tolist(), 4, draw),
                               atol=1e-5, rtol=1e-4)


def _counted_flops(run) -> int:
    """FLOPs torch's FlopCounterMode counts in ``run()``, with the two CPU ops it has no formula for
    (the in-place addmm_ of our LoRA expand, CPU flash attention) given torch's own formulas."""
    from torch.utils.flop_counter import FlopCounterMode, addmm_flop, sdpa_flop

    def as_is(formula):  # torch's registered formulas are already shape-wrapped
        def f(*args, **kwargs):
            return formula(*args, **kwargs)
        f._get_raw = True
        return f

    aten = torch.ops.aten
    mapping = {aten.addmm_: as_is(addmm_flop), aten._scaled_dot_product_flash_attention_for_cpu: as_is(sdpa_flop)}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        run()
    return counter.get_total_flops()


def test_flop_formula_matches_torch_flop_counter():
    """The benchmark's FLOP formula (its FLOP/s figures) against what torch's FlopCounterMode counts
    in the forwards it describes: ours (class rows of the last position only) and the reference's
    N forwards with the last position's or all positions' full-vocabulary logits."""
    from bench import forward_flops
    from bench_models import Harness

    h = Harness("tiny", sigma=0.5)
    c = h.counts()
    B, T, n = 3, 12, 4
    ids = torch.randint(10, 500, (B, T), generator=torch.Generator().manual_seed(0))
    draw = h.draw(n)
    assert _counted_flops(lambda: h.run_ours(ids.tolist(), n, draw)) == pytest.approx(
        forward_flops(c, n * B, T, "ours"), rel=1e-6)

    def perturb_only():  # the reference's A = A0 + V^T diag(sigma/d) Z_n before each forward: not a forward
        h.use_peft()
        try:
            for s in range(n):
                h.perturb([z[s] for z in draw.z], None)
        finally:
            h.restore()

    perturb = _counted_flops(perturb_only)
    for keep_last, method in ((True, "ref_last"), (False, "ref_full")):
        counted = _counted_flops(lambda keep_last=keep_last: h.run_ref(ids, n, keep_last, draw)) - perturb
        assert counted == pytest.approx(n * forward_flops(c, B, T, method), rel=1e-6), method
