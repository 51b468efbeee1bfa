"""A forward's fixed cost is measured once for a model on a machine and cached beside sigma: a
restart with the same cache reads it (no timed forwards), another key (dtype, machine) measures again.

The measurement itself (timed forwards) is tested in test_sampling.py; here it is replaced by one
that counts its calls and gives a fixed value, so that what the cache holds is known exactly."""

from __future__ import annotations

import pytest
from test_app_support import make_settings, ready_client

from tfb_core.forward.classifier import BayesianClassifier
from tfb_core.search import cache
from tfb_core.serving import overhead
from tfb_core.serving.startup import load_engine


@pytest.fixture
def measured(monkeypatch):
    """Counts the measurements; each gives 100 + the number of calls so far (tokens)."""
    calls: list[str] = []

    def measure(self, job, sigma, max_rows, prefix=None, repeats=2):
        calls.append(str(self.model.dtype))
        self.forward_overhead_tokens = 100.0 + len(calls)
        return self.forward_overhead_tokens

    monkeypatch.setattr(BayesianClassifier, "measure_forward_overhead", measure)
    return calls


def _served(client):
    return client.app.state.tfb.worker.engine.default.classifier


def test_a_restart_with_the_same_cache_does_not_measure_again(tiny, tmp_path, measured):
    settings = make_settings(tiny, cache_dir=str(tmp_path), warmup=True)
    with ready_client(settings) as c:
        assert _served(c).forward_overhead_tokens == 101.0
    assert measured == ["torch.float32"]
    with ready_client(settings) as c:  # the restart: read, not measured
        assert _served(c).forward_overhead_tokens == 101.0
    assert measured == ["torch.float32"]
    assert len(list((tmp_path / overhead.KIND).glob("*.json"))) == 1


def test_another_dtype_or_machine_measures_again(tiny, tmp_path, measured, monkeypatch):
    def warm(**overrides):
        engine = load_engine(make_settings(tiny, cache_dir=str(tmp_path), **overrides).engine_config(),
                             progress=False)
        return engine.warm_up(32), engine

    first, engine = warm()
    assert warm()[0] == first == 101.0 and len(measured) == 1
    other, engine16 = warm(dtype="bfloat16")
    assert other == 102.0 and measured == ["torch.float32", "torch.bfloat16"]
    assert engine16.classifier.forward_overhead_tokens == 102.0
    monkeypatch.setattr(overhead, "_cpu_model", lambda: "another CPU")
    assert warm()[0] == 103.0 and len(measured) == 3
    # what a key holds is what was measured under it
    key = overhead.overhead_key(engine.cfg.model, engine.classifier, engine.first_forward()[0], engine.sigma, 32,
                                engine.prompt_prefix or None)
    assert cache.load_json(tmp_path, key, overhead.KIND) == {"tokens": 103.0}


def test_an_unusable_cached_value_is_measured_again(tiny, tmp_path, measured):
    engine = load_engine(make_settings(tiny, cache_dir=str(tmp_path)).engine_config(), progress=False)
    key = overhead.overhead_key(engine.cfg.model, engine.classifier, engine.first_forward()[0], engine.sigma, 32,
                                engine.prompt_prefix or None)
    cache.save_json(tmp_path, key, {"tokens": -5.0}, overhead.KIND)
    assert engine.warm_up(32) == 101.0 and len(measured) == 1
    assert cache.load_json(tmp_path, key, overhead.KIND) == {"tokens": 101.0}
