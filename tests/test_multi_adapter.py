"""Many adapters on one base model: rows of different adapters share one forward, and each answer
equals that adapter served alone (its own base model, its own forward)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, LABELS
from test_posterior import peft_reference

from tfb_core.config import ModelConfig
from tfb_core.data.loading import LoadError
from tfb_core.data.tasks import get_task
from tfb_core.forward.layout import Job
from tfb_core.serving.startup import load_classifier, load_classifiers

KEYS = ("adapter", "adapter_qv", "adapter_other")
YES_NO = ["yes", "no"]
PROMPTS = ["a great film with a wonderful cast", "a dull mess", "I would not watch it again", "superb"]


def _cfg(tiny, key: str, dtype: str = "float32") -> ModelConfig:
    return ModelConfig(model=tiny["model"], adapter=tiny[key], device=DEVICE, dtype=dtype)


@pytest.fixture()
def many(tiny):
    """One base model with three adapters (the second classifying yes/no)."""
    return load_classifiers([_cfg(tiny, k) for k in KEYS], [LABELS, YES_NO, LABELS])


def test_mixed_forward_in_bfloat16_equals_each_adapter_alone(tiny):
    """With a bf16 base peft keeps the LoRA weights in float32, so each segment's LoRA result is a
    new tensor that RoutedLinear must write back into the bf16 output (the path every multi-adapter
    forward takes on a GPU). Tolerance: bf16 keeps 8 significant bits (relative step 2^-8 = 0.004);
    the same rows computed in another batch may round differently in each of the tiny model's
    layers, so probabilities may move by a few steps: atol 0.02. A lost write-back drops an
    adapter's LoRA entirely, a change of the order of 0.1 or more on these adapters (non-zero B)."""
    dtype = "bfloat16"
    many = load_classifiers([_cfg(tiny, k, dtype) for k in KEYS], [LABELS, YES_NO, LABELS])
    tokens = many[0].tokenize(PROMPTS)
    draws = [clf.posterior.draw(seed=11 + a, n_samples=3) for a, clf in enumerate(many)]
    sigmas = (0.3, 0.0, 0.5)
    jobs = [Job(tokens[i], 3, draws[a], adapter=a, sigma=sigmas[a], class_ids=many[a].class_ids)
            for i in range(len(PROMPTS)) for a in range(3)]  # interleaved adapters
    mixed = many[0].run_jobs(jobs, sigma=0.0)
    for a, key in enumerate(KEYS):
        alone = load_classifier(_cfg(tiny, key, dtype), [LABELS, YES_NO, LABELS][a])
        own = alone.posterior.draw(seed=11 + a, n_samples=3)
        for i in range(len(PROMPTS)):
            ref = alone.run_jobs([Job(tokens[i], 3, own)], sigma=sigmas[a])[0]  # (N, C)
            torch.testing.assert_close(mixed[i * 3 + a].float(), ref.float(), atol=2e-2, rtol=0)


def _count_forwards(clf):
    calls: list[tuple[int, ...]] = []
    backbone = clf.backbone

    def counted(**kw):
        calls.append(tuple(kw["input_ids"].shape))
        return backbone(**kw)

    return calls, counted


@pytest.mark.parametrize("sigmas", [(0.3, 0.0, 0.5), (0.0, 0.0, 0.0), (0.4, 0.4, 0.4)])
def test_one_forward_of_three_adapters_equals_each_served_alone(tiny, many, sigmas):
    tokens = many[0].tokenize(PROMPTS)
    draws = [clf.posterior.draw(seed=11 + a, n_samples=4) for a, clf in enumerate(many)]
    jobs = [Job(tokens[i], 4, draws[a], adapter=a, sigma=sigmas[a], class_ids=many[a].class_ids)
            for i in range(len(PROMPTS)) for a in range(3)]  # interleaved adapters
    calls, counted = _count_forwards(many[0])
    many[0].backbone = counted
    mixed = many[0].run_jobs(jobs, sigma=0.0)
    assert len(calls) == 1 and calls[0][0] == sum(4 if s > 0 else 1 for s in sigmas) * len(PROMPTS)
    for a, key in enumerate(KEYS):
        alone = load_classifier(_cfg(tiny, key), [LABELS, YES_NO, LABELS][a])  # its own base model
        # the same standard-normal draws, module by module: same seed, same module order
        own = alone.posterior.draw(seed=11 + a, n_samples=4)
        for z_own, z_many in zip(own.z, draws[a].z, strict=True):
            assert torch.equal(z_own, z_many)
        for i in range(len(PROMPTS)):
            ref = alone.run_jobs([Job(tokens[i], 4, own)], sigma=sigmas[a])[0]  # (N, C)
            torch.testing.assert_close(mixed[i * 3 + a], ref, atol=1e-5, rtol=1e-4)


def test_adapters_differ_and_each_follows_its_own_sigma(many):
    """The routing is real: the same input gets each adapter's own answer, and only the adapters
    with sigma > 0 vary across samples."""
    tokens = many[0].tokenize(PROMPTS[:1])[0]
    jobs = [Job(tokens, 3, clf.posterior.draw(1, 3), adapter=a, sigma=s, class_ids=many[0].class_ids)
            for a, (clf, s) in enumerate(zip(many, (0.5, 0.0, 0.5), strict=True))]
    out = many[0].run_jobs(jobs, sigma=0.0)
    assert not torch.allclose(out[0][0], out[2][0], atol=1e-3)  # two adapters, one label set
    assert not torch.allclose(out[0][0], out[0][1], atol=1e-4)  # noisy samples differ
    assert torch.equal(out[1][0], out[1][1])  # sigma = 0: every sample is the mean


def test_sigma_zero_of_every_adapter_reproduces_its_peft_model(tiny, many):
    """Independent oracle: the untouched peft model of each adapter alone, one prompt at a time."""
    tokens = many[0].tokenize(PROMPTS)
    jobs = [Job(tokens[i], 1, None, adapter=a, sigma=0.0, class_ids=many[a].class_ids)
            for a in range(3) for i in range(len(PROMPTS))]
    out = many[0].run_jobs(jobs, sigma=0.0)
    for a, key in enumerate(KEYS):
        ref = peft_reference(_cfg(tiny, key), PROMPTS, [LABELS, YES_NO, LABELS][a])
        got = torch.stack([out[a * len(PROMPTS) + i][0] for i in range(len(PROMPTS))])
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_shared_instruction_prefix_across_adapters_keeps_answers(tiny, many):
    """Inputs of one task under several adapters: the instruction runs once per (adapter, sample),
    its keys and values are kept, and the answers are those of a plain forward."""
    task = get_task("sst2")
    prompts = [task.format(s) for s in PROMPTS]
    tokens = many[0].tokenize(prompts)
    prefix = many[0].shared_prefix(tokens)
    assert prefix >= 8
    draws = [clf.posterior.draw(seed=3, n_samples=3) for clf in many]
    jobs = [Job(t, 3, draws[a], adapter=a, sigma=0.2, class_ids=many[0].class_ids) for a in (0, 2) for t in tokens]
    plain = many[0].run_jobs(jobs, sigma=0.0)  # no prefix: one forward of the whole rows
    calls, counted = _count_forwards(many[0])
    many[0].backbone = counted
    shared = many[0].run_jobs(jobs, sigma=0.0, prefix={0: prefix, 2: prefix})
    again = many[0].run_jobs(jobs, sigma=0.0, prefix={0: prefix, 2: prefix})
    assert calls[0] == (2 * 3, prefix)  # the prefix: one row per (adapter, sample)
    assert calls[1][0] == len(jobs) * 3 and calls[2][0] == len(jobs) * 3  # second time: from the prefix cache
    assert len(calls) == 3
    for p, s, g in zip(plain, shared, again, strict=True):
        torch.testing.assert_close(s, p, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(g, p, atol=1e-5, rtol=1e-4)


def test_the_prefix_cache_keeps_adapters_apart(many):
    """At sigma = 0 two adapters' prefixes are both 'the mean': the cache must not hand one's keys
    and values to the other."""
    task = get_task("sst2")
    tokens = many[0].tokenize([task.format(s) for s in PROMPTS])
    prefix = many[0].shared_prefix(tokens)
    first = many[0].run_jobs([Job(t, 1, None) for t in tokens], sigma=0.0, prefix=prefix)
    other = many[2].run_jobs([Job(t, 1, None) for t in tokens], sigma=0.0, prefix=prefix)
    fresh = many[2]
    fresh.prefix_cache.clear()
    ref = fresh.run_jobs([Job(t, 1, None) for t in tokens], sigma=0.0)
    for o, r, f in zip(other, ref, first, strict=True):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(o, f, atol=1e-4)


def test_adapters_must_share_the_base_models_settings(tiny):
    cfgs = [_cfg(tiny, "adapter"), ModelConfig(model=tiny["model"], adapter=tiny["adapter_qv"], device=DEVICE,
                                               max_length=64)]
    with pytest.raises(LoadError, match="max_length"):
        load_classifiers(cfgs, [LABELS, LABELS])


def test_each_adapters_posterior_has_only_its_own_layers(many):
    names = [{m.name.split(".")[-1] for m in clf.posterior.modules} for clf in many]
    assert names == [{"q_proj", "v_proj", "lm_head"}, {"q_proj", "v_proj"}, {"k_proj", "o_proj", "down_proj"}]
    assert many[0].head is not None and many[1].head is None and many[2].head is None


# --- engines: one per adapter, one batch loop for all -----------------------------------------------
def _engine_cfgs(tiny, model_cfg):
    from dataclasses import replace

    from tfb_core.serving.config import EngineConfig

    base = dict(n_samples=4, seed=0, max_rows=64)
    return [("pos", EngineConfig(model=replace(model_cfg, adapter=tiny["adapter"]), task="sst2", sigma=0.3, **base)),
            ("yn", EngineConfig(model=replace(model_cfg, adapter=tiny["adapter_qv"]), labels=("yes", "no"),
                                sigma=0.0, **base)),
            ("other", EngineConfig(model=replace(model_cfg, adapter=tiny["adapter_other"]), task="sst2", sigma=0.5,
                                   **base))]


def test_a_mixed_batch_of_three_adapters_answers_each_request_as_its_adapter_alone(tiny, model_cfg):
    from tfb_core.serving.batch import BatchRequest
    from tfb_core.serving.startup import load_engine, load_engines

    named = _engine_cfgs(tiny, model_cfg)
    engines = load_engines(named, progress=False)
    assert [e.name for e in engines] == ["pos", "yn", "other"]
    assert len({id(e.classifier.model) for e in engines}) == 1  # one base model
    pos, yn, other = engines
    requests = [BatchRequest(["a great film", "a dull mess"], 4, 1, engine=pos),
                BatchRequest(["Is it good?", "Was it dull? Answer:"], 3, 2, engine=yn),
                BatchRequest(["superb"], 5, 3, engine=other),
                BatchRequest(["I would not watch it again"], 4, 1, engine=pos),
                BatchRequest(["wonderful cast"], 2, 9, labels=("True", "False"), engine=yn)]
    forwards = []
    got = pos.run_batch(requests, max_rows=64, on_forward=lambda i, r, s: forwards.append(i))
    assert sum(forwards) == 7
    alone = {name: load_engine(cfg, progress=False) for name, cfg in named}  # each on its own base model
    for req, res in zip(requests, got, strict=True):
        assert isinstance(res, torch.Tensor), res
        own = alone[req.engine.name]
        want = own.run_batch([BatchRequest(req.prompts, req.n_samples, req.seed, req.labels)], max_rows=64)[0]
        assert res.shape == want.shape
        torch.testing.assert_close(res, want, atol=1e-5, rtol=1e-4)


def test_one_forward_holds_several_adapters_when_a_forward_is_expensive(tiny, model_cfg):
    """With a large fixed cost per forward (a GPU), the planner puts all adapters' rows in one forward."""
    from tfb_core.serving.batch import BatchRequest
    from tfb_core.serving.startup import load_engines

    engines = load_engines(_engine_cfgs(tiny, model_cfg), progress=False)
    for e in engines:
        e.classifier.forward_overhead_tokens = 10_000
    requests = [BatchRequest(["a great film"], 4, 1, engine=e) for e in engines]
    forwards = []
    engines[0].run_batch(requests, max_rows=64, on_forward=lambda i, r, s: forwards.append((i, r)))
    assert forwards == [(3, 4 + 1 + 4)]  # sigma = 0 takes one row


def test_sigma_search_and_cache_entry_of_each_adapter_are_its_own(tiny, model_cfg, tmp_path):
    """Each adapter searches its own sigma on one base model, and finds it again in the cache served alone."""
    from dataclasses import replace

    from tfb_core.config import SearchConfig
    from tfb_core.serving.config import DEMO_ANCHOR, EngineConfig
    from tfb_core.serving.startup import load_engine, load_engines

    model = replace(model_cfg, cache_dir=str(tmp_path))
    search = SearchConfig(tolerance=0.05, n_samples=3, iters=3, low=1e-3, high=1.0)
    named = [(k, EngineConfig(model=replace(model, adapter=tiny[k]), task="sst2", anchor=str(DEMO_ANCHOR),
                              search=search, n_samples=3)) for k in ("adapter", "adapter_other")]
    first, second = load_engines(named, progress=False)
    assert first.sigma_source == second.sigma_source == "search"
    assert first.sigma != second.sigma
    again = load_engine(named[1][1], progress=False)
    assert again.sigma_source == "cache" and again.sigma == second.sigma


def test_adapters_taking_turns_keep_their_instruction_prefixes(tiny):
    """Five adapters in turn, twice: the second round computes no prefix (one kept per adapter and
    draw; a cache sized for one adapter would evict them in turn and miss every time)."""
    keys = ["adapter", "adapter_qv", "adapter_other", "adapter_blob", "adapter"]
    many = load_classifiers([_cfg(tiny, k) for k in keys], [LABELS] * len(keys))
    task = get_task("sst2")
    tokens = many[0].tokenize([task.format(s) for s in PROMPTS[:2]])
    prefix = many[0].shared_prefix(tokens)
    draws = [clf.posterior.draw(1, 3) for clf in many]
    calls, counted = _count_forwards(many[0])
    many[0].backbone = counted
    for round_ in range(2):
        for a in range(len(many)):
            many[0].run_jobs([Job(t, 3, draws[a], adapter=a, sigma=0.2) for t in tokens], sigma=0.0, prefix=prefix)
        if round_ == 0:
            assert sum(1 for c in calls if c[1] == prefix) == len(keys)  # each adapter's prefix, once
            calls.clear()
    assert calls and all(c[1] != prefix for c in calls), calls  # the second round: suffixes only


def test_a_start_up_error_of_one_of_several_adapters_names_it(tiny, model_cfg, tmp_path):
    from dataclasses import replace

    from tfb_core.serving.config import EngineConfig
    from tfb_core.serving.startup import load_engines

    bad_anchor = tmp_path / "anchor.jsonl"
    bad_anchor.write_text('{"sentence": "fine", "label": "positive"}\nnot json\n')
    ok = ("ok", EngineConfig(model=replace(model_cfg, adapter=tiny["adapter"]), task="sst2", sigma=0.1))
    no_task = ("no-task", EngineConfig(model=replace(model_cfg, adapter=tiny["adapter_qv"]), sigma=0.1))
    with pytest.raises(LoadError, match="^adapter 'no-task': give a task name or labels"):
        load_engines([ok, no_task], progress=False)
    bad = ("bad-anchor", EngineConfig(model=replace(model_cfg, adapter=tiny["adapter_qv"]), task="sst2",
                                      anchor=str(bad_anchor)))
    with pytest.raises(LoadError, match="^adapter 'bad-anchor': .*anchor.jsonl"):
        load_engines([ok, bad], progress=False)
