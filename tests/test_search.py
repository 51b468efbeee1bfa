"""The sigma search: synthetic objectives with known roots, the tiny model, and the cache."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import LABELS

from tfb_core.config import SearchConfig
from tfb_core.search import cache
from tfb_core.search.classifier import anchor_objective, search_sigma
from tfb_core.search.strategy import search
from tfb_core.serving import overhead
from tfb_core.serving.config import EngineConfig
from tfb_core.serving.startup import cache_key, load_engine


def monotone(root: float, calls: list[float] | None = None):
    """A smooth increasing criterion that crosses tolerance 0.1 at ``root``."""
    def f(sigmas):
        if calls is not None:
            calls.extend(sigmas)
        return [0.1 * (s / root) ** 2 for s in sigmas]
    return f


@pytest.mark.parametrize("method", ["bisect", "grid"])
@pytest.mark.parametrize("root", [0.004, 0.0123, 0.05, 0.0004])  # inside, inside, above, below the bracket
def test_search_finds_a_known_root(method, root):
    cfg = SearchConfig(tolerance=0.1, low=0.001, high=0.015, iters=12, method=method, grid_size=8)
    res = search(monotone(root), cfg)
    assert res.satisfied
    assert res.sigma <= root * (1 + 1e-9)  # never above the root: the largest sigma that satisfies
    assert res.sigma >= root * 0.995
    assert res.value <= 0.1
    assert all(p.ok == (p.value <= 0.1) for p in res.history)


def test_bisect_stops_once_within_rtol_of_the_tolerance_in_few_steps():
    calls: list[float] = []
    cfg = SearchConfig(tolerance=0.1, low=0.001, high=0.015, iters=10, rtol=0.03)
    res = search(lambda s: [0.1 * (x / 0.0123) ** 1.5 + 0.01 * x for x in (calls.extend(s) or s)], cfg)
    assert 0.097 <= res.value <= 0.1  # ok, and within rtol of the tolerance
    assert len(calls) <= 5  # high, low, then interpolation instead of 10 halvings


def test_bisect_returns_the_largest_satisfying_not_the_last_violating():
    cfg = SearchConfig(tolerance=0.1, low=0.001, high=0.015, iters=5)
    res = search(monotone(0.007), cfg)
    oks = [p.sigma for p in res.history if p.ok]
    assert res.sigma == max(oks)


def test_no_satisfying_sigma_gives_zero_and_says_so():
    cfg = SearchConfig(tolerance=0.1, low=0.001, high=0.015, max_expansions=2)
    res = search(lambda s: [1.0 for _ in s], cfg)
    assert not res.satisfied and res.sigma == 0.0 and "broke the tolerance" in res.note


def test_search_on_the_tiny_model_satisfies_the_tolerance_and_above_does_not(classifier):
    prompts = ["a great film", "a dull mess", "superb acting", "I would not watch it", "thin plot", "wonderful"]
    cfg = SearchConfig(criterion="nll", tolerance=0.2, low=0.01, high=0.5, iters=6, n_samples=4, seed=3)
    res = search_sigma(classifier, prompts, cfg, progress=False)
    assert res.satisfied and 0 < res.sigma
    objective, ref = anchor_objective(classifier, prompts, cfg)
    assert ref["nll_pseudo"] > 0
    at, above = objective([res.sigma, res.sigma * 1.3])
    assert at == pytest.approx(res.value, rel=1e-4) and at <= cfg.tolerance  # deterministic: common random numbers
    assert above > cfg.tolerance
    flip = search_sigma(classifier, prompts, SearchConfig(criterion="flip", tolerance=0.2, low=0.01, high=0.5,
                                                          n_samples=4), progress=False)
    assert flip.satisfied and flip.value <= 0.2


def test_grid_evaluates_many_sigmas_in_shared_forwards(classifier):
    prompts = ["a great film", "a dull mess", "superb acting"]
    cfg = SearchConfig(n_samples=3, seed=1)
    objective, _ = anchor_objective(classifier, prompts, cfg)
    together = objective([0.05, 0.2, 0.4])
    apart = [objective([s])[0] for s in (0.05, 0.2, 0.4)]
    assert together == pytest.approx(apart, rel=1e-4, abs=1e-6)


@pytest.fixture()
def anchor_file(tmp_path):
    path = tmp_path / "anchor.jsonl"
    rows = [{"prompt": p, "label": lab} for p, lab in [("a great film", "positive"), ("a dull mess", "negative"),
                                                       ("superb acting", "positive"), ("thin plot", "negative")]]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def engine_cfg(model_cfg, anchor, cache_dir, **search):
    from dataclasses import replace

    return EngineConfig(model=replace(model_cfg, cache_dir=str(cache_dir)), labels=tuple(LABELS), anchor=str(anchor),
                        search=SearchConfig(**{"tolerance": 0.3, "low": 0.01, "high": 0.5, "iters": 3,
                                               "n_samples": 3, **search}))


def test_cache_is_reused_and_invalidated_by_any_key(model_cfg, anchor_file, tmp_path):
    cfg = engine_cfg(model_cfg, anchor_file, tmp_path)
    first = load_engine(cfg, progress=False)
    assert first.sigma_source == "search"
    again = load_engine(cfg, progress=False)
    assert again.sigma_source == "cache" and again.sigma == first.sigma
    assert len(list((tmp_path / "sigma").glob("*.json"))) == 1
    # every key that the result depends on invalidates it
    assert load_engine(engine_cfg(model_cfg, anchor_file, tmp_path, tolerance=0.31), False).sigma_source == "search"
    assert load_engine(engine_cfg(model_cfg, anchor_file, tmp_path, seed=9), False).sigma_source == "search"
    assert load_engine(engine_cfg(model_cfg, anchor_file, tmp_path, criterion="flip"), False).sigma_source == "search"
    anchor_file.write_text(anchor_file.read_text().replace("thin plot", "thin plot indeed"))
    assert load_engine(cfg, progress=False).sigma_source == "search"
    assert len(list((tmp_path / "sigma").glob("*.json"))) == 5
    assert not list((tmp_path / "sigma").glob("*.tmp"))  # atomic writes leave no temporary files


def test_moved_adapter_reuses_the_search_and_changed_weights_at_the_same_path_do_not(tiny, model_cfg, anchor_file,
                                                                                     tmp_path):
    import shutil
    from dataclasses import replace

    from safetensors.torch import load_file, save_file

    here = shutil.copytree(tiny["adapter"], tmp_path / "adapter")
    first = load_engine(engine_cfg(replace(model_cfg, adapter=str(here)), anchor_file, tmp_path), progress=False)
    assert first.sigma_source == "search"
    moved = shutil.copytree(here, tmp_path / "elsewhere" / "adapter")  # same weights, another path
    again = load_engine(engine_cfg(replace(model_cfg, adapter=str(moved)), anchor_file, tmp_path), progress=False)
    assert again.sigma_source == "cache" and again.sigma == first.sigma
    f = here / "adapter_model.safetensors"  # the same path, one weight changed
    sd = load_file(f)
    name = next(k for k in sorted(sd) if "lora_B" in k)
    sd[name] = sd[name].clone()
    sd[name].view(-1)[0] += 0.01
    save_file(sd, f)
    changed = load_engine(engine_cfg(replace(model_cfg, adapter=str(here)), anchor_file, tmp_path), progress=False)
    assert changed.sigma_source == "search"


def _key_variants():
    """(name, change) pairs, each changing one thing the search result depends on."""
    from dataclasses import replace

    def model(**kw):
        return lambda cfg, clf: (replace(cfg, model=replace(cfg.model, **kw)), clf)

    def search(**kw):
        return lambda cfg, clf: (replace(cfg, search=replace(cfg.search, **kw)), clf)

    def weights(part: str, where: str = ""):
        """The adapter with one value of its first ``part`` tensor (of a module named ``where``) changed."""
        def change(cfg, clf):
            import shutil
            import tempfile

            from safetensors.torch import load_file, save_file

            from tfb_core.serving.startup import load_classifier

            here = Path(tempfile.mkdtemp()) / "adapter"
            shutil.copytree(cfg.model.adapter, here)
            f = here / "adapter_model.safetensors"
            sd = load_file(f)
            name = next(k for k in sorted(sd) if part in k and where in k)
            sd[name] = sd[name].clone()
            sd[name].view(-1)[0] += 1e-3
            save_file(sd, f)
            other = replace(cfg, model=replace(cfg.model, adapter=str(here)))
            return other, load_classifier(other.model, LABELS)
        return change

    def scaling(cfg, clf):
        clf.posterior.modules[0].scaling *= 2
        return cfg, clf

    return [
        ("base model", model(model="/another/model")), ("model revision", model(model_revision="v2")),
        ("model subfolder", model(model_subfolder="sub")), ("gguf file", model(gguf_file="m.gguf")),
        ("dtype", model(dtype="bfloat16")), ("device type", model(device="cuda")),
        ("8-bit", model(load_in_8bit=True)), ("max length", model(max_length=64)),
        ("d floor", lambda cfg, clf: (replace(cfg, d_floor=1e-3), clf)),
        ("labels", lambda cfg, clf: (replace(cfg, labels=tuple(reversed(LABELS))), clf)),
        ("criterion", search(criterion="flip")), ("tolerance", search(tolerance=0.31)), ("low", search(low=0.02)),
        ("high", search(high=0.4)), ("iters", search(iters=4)), ("rtol", search(rtol=0.1)),
        ("search N", search(n_samples=4)), ("search seed", search(seed=9)), ("method", search(method="grid")),
        ("adapter A", weights("lora_A")), ("adapter B", weights("lora_B")),
        ("lm_head LoRA", weights("lora_B", "lm_head")), ("adapter scaling", scaling),
    ]


@pytest.mark.parametrize("name,change", _key_variants(), ids=[n for n, _ in _key_variants()])
def test_the_cache_key_changes_with_each_thing_alone(model_cfg, anchor_file, tmp_path, name, change):
    from dataclasses import replace

    from tfb_core.data.jsonl import read_jsonl
    from tfb_core.data.tasks import get_task
    from tfb_core.serving.startup import anchor_prompts, load_classifier

    cfg = engine_cfg(model_cfg, anchor_file, tmp_path)
    clf = load_classifier(cfg.model, LABELS)
    prompts, targets = anchor_prompts(get_task(None, LABELS), read_jsonl(anchor_file))

    def key(c, k):
        return cache_key(c, k, get_task(None, c.labels), prompts, targets)

    base = key(cfg, clf)
    assert key(cfg, clf) == base  # deterministic
    # the adapter's location is not part of it: only what it computes
    moved = replace(cfg, model=replace(cfg.model, adapter="/moved/adapter", adapter_subfolder="x", adapter_revision="r"))
    assert key(moved, clf) == base
    if name == "8-bit":  # 8-bit needs CUDA: vary it alone against the same config on CUDA
        cfg = replace(cfg, model=replace(cfg.model, device="cuda"))
        base = key(cfg, clf)
    other_cfg, other_clf = change(cfg, clf)
    assert key(other_cfg, other_clf) != base, name


def test_the_anchor_changes_the_key(model_cfg, anchor_file, tmp_path):
    from tfb_core.data.jsonl import read_jsonl
    from tfb_core.data.tasks import get_task
    from tfb_core.serving.startup import anchor_prompts, load_classifier

    cfg = engine_cfg(model_cfg, anchor_file, tmp_path)
    clf = load_classifier(cfg.model, LABELS)
    task = get_task(None, LABELS)
    prompts, targets = anchor_prompts(task, read_jsonl(anchor_file))
    base = cache_key(cfg, clf, task, prompts, targets)
    assert cache_key(cfg, clf, task, prompts[:-1], targets[:-1]) != base
    assert cache_key(cfg, clf, task, prompts, 1 - targets) != base  # other labels
    assert cache_key(cfg, clf, task, prompts, None) != base  # unlabelled


def _package_copy(tmp_path, monkeypatch) -> Path:
    """A copy of tfb_core's source whose modules the cache keys hash (``cache.PACKAGE_DIR``): edit a
    file of it to stand for an edit to the module (the real source, which runs, stays as it is)."""
    import shutil

    copy = tmp_path / "src" / "tfb_core"
    shutil.copytree(cache.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("adapters", "__pycache__"))
    monkeypatch.setattr(cache, "PACKAGE_DIR", copy)
    return copy


def _module_file(copy: Path, name: str) -> Path:
    path = copy.parent.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


KEYED = {"classifier search": cache.CLASSIFIER_SEARCH, "generative search": cache.GENERATION_SEARCH,
         "calibration": cache.CALIBRATION, "forward overhead": overhead.CODE}


def test_an_edit_to_any_module_the_computation_imports_changes_its_key_and_no_other(tmp_path, monkeypatch):
    """Walk every module of the package (in a copy): an edit changes a key exactly when the module is
    in the import closure of that key's entry points; the closures hold what the issue found
    missing (the averaged decode, the calibration's engine, a function-level import)."""
    copy = _package_copy(tmp_path, monkeypatch)
    closures = {what: set(cache.hashed_modules(roots)) for what, roots in KEYED.items()}
    assert "tfb_core.decide.generation" in closures["generative search"]  # the 'accuracy' criterion's decode
    assert "tfb_core.serving.engine" in closures["calibration"]  # the calibration's forward
    assert "tfb_core.forward.decoding" in closures["generative search"]  # imported inside a function
    assert "tfb_core.forward.decoding" not in closures["classifier search"]  # the split holds
    assert "tfb_core.search.classifier" not in closures["generative search"]
    modules = sorted(set(cache.hashed_modules(["tfb_core.cli"])) | {"tfb_core.serving.response"})
    assert set().union(*closures.values()) < set(modules)  # some modules are outside every closure
    cache._code_sha256.cache_clear()
    before = {what: cache.code_sha256(roots) for what, roots in KEYED.items()}
    for name in modules:
        path = _module_file(copy, name)
        source = path.read_text()
        path.write_text(source + "\nEDITED = 1  # an edit\n")
        cache._code_sha256.cache_clear()  # its sources read again (the closure, an edit adding no import, holds)
        changed = {what for what, roots in KEYED.items() if cache.code_sha256(roots) != before[what]}
        assert changed == {what for what in KEYED if name in closures[what]}, name
        path.write_text(source)
    cache._code_sha256.cache_clear()
    assert {what: cache.code_sha256(roots) for what, roots in KEYED.items()} == before  # restored: the same keys


def test_the_closures_hold_every_module_their_entry_points_import_at_run_time():
    """The static reading against Python's own: importing a key's entry points (from nothing of
    tfb_core loaded, in a fresh interpreter) loads no module of tfb_core outside that key's closure."""
    import subprocess
    import sys

    code = """import importlib, json, sys
loaded = {}
for what, roots in json.loads(sys.argv[1]).items():
    for m in [m for m in sys.modules if m == "tfb_core" or m.startswith("tfb_core.")]:
        del sys.modules[m]  # torch and transformers stay loaded: one interpreter for every key
    for r in roots:
        importlib.import_module(r)
    loaded[what] = [m for m in sys.modules if m == "tfb_core" or m.startswith("tfb_core.")]
print(json.dumps(loaded))
"""
    out = subprocess.run([sys.executable, "-c", code, json.dumps(KEYED)], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    for what, loaded in json.loads(out).items():
        assert set(KEYED[what]) <= set(loaded)
        assert set(loaded) <= set(cache.hashed_modules(KEYED[what])), (what, set(loaded) - set(cache.hashed_modules(KEYED[what])))


def test_the_code_that_computes_a_result_keys_its_caches(model_cfg, anchor_file, tmp_path, monkeypatch):
    """An edit to the calibration's engine (serving/engine.py, which no list named before) makes a
    new calibration (a new cache file, not the old result) and leaves the classifier's sigma key
    as it was (the search does not import it); an unchanged tree gives the same keys again."""
    from tfb_core.data.jsonl import read_jsonl
    from tfb_core.data.tasks import get_task
    from tfb_core.serving.startup import anchor_prompts

    copy = _package_copy(tmp_path, monkeypatch)
    cache._code_sha256.cache_clear()
    cfg = replace(engine_cfg(model_cfg, anchor_file, tmp_path / "cache"), sigma=0.05, calibration=str(anchor_file))
    task = get_task(None, LABELS)
    prompts, targets = anchor_prompts(task, read_jsonl(anchor_file))
    engine = load_engine(cfg, progress=False)
    key = cache_key(cfg, engine.classifier, task, prompts, targets)
    cache._code_sha256.cache_clear()  # read the sources again: unchanged, the same key
    assert cache_key(cfg, engine.classifier, task, prompts, targets) == key
    calibrations = tmp_path / "cache" / "calibration"
    assert len(list(calibrations.glob("*.json"))) == 1
    load_engine(cfg, progress=False)
    assert len(list(calibrations.glob("*.json"))) == 1  # reused

    engine_file = copy / "serving" / "engine.py"
    engine_file.write_text(engine_file.read_text() + "\nNOISE_CACHE = 4  # an edit\n")
    cache._code_sha256.cache_clear()  # a new process would read the edited source
    assert cache_key(cfg, engine.classifier, task, prompts, targets) == key  # not the search's code
    load_engine(cfg, progress=False)
    assert len(list(calibrations.glob("*.json"))) == 2  # recomputed under a new key


def test_the_searchs_prefixes_are_freed_before_serving(model_cfg, tmp_path):
    """The search's kept prefix keys/values (its own draws and sigmas) are gone once load returns."""
    import gc
    import weakref

    from tfb_core.forward import classifier as sampling

    anchor_file = tmp_path / "instructed.jsonl"  # prompts that share an instruction, as a task's do
    instruction = "Classify the sentiment of the movie review below as positive or negative. Review: "
    anchor_file.write_text("\n".join(json.dumps({"prompt": instruction + p, "label": lab}) for p, lab in
                                     [("a great film", "positive"), ("a dull mess", "negative"),
                                      ("superb acting", "positive"), ("thin plot", "negative")]) + "\n")

    kept = []
    put = sampling.PrefixCache.put

    def spy(self, key, cache):
        kept.append(weakref.ref(cache.layers[0].keys))
        put(self, key, cache)

    sampling.PrefixCache.put = spy
    try:
        # no held-out calibration: its forward would (rightly) cache the serving prefix
        cfg = replace(engine_cfg(model_cfg, anchor_file, tmp_path), calibration_split=0.0)
        engine = load_engine(cfg, progress=False)
    finally:
        sampling.PrefixCache.put = put
    assert engine.sigma_source == "search" and kept  # the search did keep prefixes while it ran
    assert len(engine.classifier.prefix_cache) == 0
    gc.collect()
    assert all(ref() is None for ref in kept)  # and their tensors are freed


@pytest.mark.parametrize("garbage", ["{not json", json.dumps({"format": 1, "key": {}, "result": {}}),
                                     json.dumps({"format": 99}), ""])
def test_corrupt_or_mismatching_cache_is_ignored_with_a_warning(model_cfg, anchor_file, tmp_path, caplog, garbage):
    cfg = engine_cfg(model_cfg, anchor_file, tmp_path)
    first = load_engine(cfg, progress=False)
    path = next((tmp_path / "sigma").glob("*.json"))
    path.write_text(garbage)
    with caplog.at_level(logging.WARNING):
        again = load_engine(cfg, progress=False)
    assert again.sigma_source == "search" and again.sigma == first.sigma
    assert "recomputing" in caplog.text
    assert cache.load(tmp_path, json.loads(path.read_text())["key"]) is not None  # rewritten, valid


def test_cache_round_trip(tmp_path):
    from tfb_core.search.strategy import SearchPoint, SearchResult

    res = SearchResult(0.01, 0.2, "nll", 0.3, True, "bisect", [SearchPoint(0.01, 0.2, True)], 1.5, 1,
                       {"nll_pseudo": 0.1})
    key = {"a": 1, "b": [1, 2]}
    cache.save(tmp_path, key, res)
    assert cache.load(tmp_path, key) == res
    assert cache.load(tmp_path, {"a": 2, "b": [1, 2]}) is None
    assert math.isclose(cache.load(tmp_path, key).sigma, 0.01)


def test_the_adapters_key_is_its_peft_weights_not_their_svd(model_cfg, anchor_file, tmp_path, monkeypatch):
    """The SVD's rounding varies with threads and machines (the same adapter once missed the cache
    between a 1-thread and a 2-thread process): the key hashes A and B as peft read them."""
    from tfb_core.bayes import routing
    from tfb_core.bayes.lora import LoRAWeights, lora_sha256
    from tfb_core.data.tasks import get_task
    from tfb_core.serving.startup import load_classifier

    cfg = engine_cfg(model_cfg, anchor_file, tmp_path)
    clf = load_classifier(model_cfg, LABELS)
    first = clf.posterior
    svd = routing.svd_reparam

    def rounded_otherwise(A, B):  # another machine's SVD: the last bit of A' differs
        A2, B2, d = svd(A, B)
        return torch.nextafter(A2, A2 + 1), B2, d

    monkeypatch.setattr(routing, "svd_reparam", rounded_otherwise)
    clf2 = load_classifier(model_cfg, LABELS)
    second = clf2.posterior
    assert not torch.equal(first.modules[0].lora_A, second.modules[0].lora_A)
    assert first.weights_sha256 == second.weights_sha256 is not None
    task = get_task(None, LABELS)
    assert cache_key(cfg, clf, task, ["x"], None) == cache_key(cfg, clf2, task, ["x"], None)
    # and one changed weight is another adapter
    t = torch.arange(12.0).view(3, 4)
    u = t.clone()
    u[2, 3] += 1e-3
    base = torch.nn.Linear(4, 3)
    assert lora_sha256([LoRAWeights("m", base, t, t.T, 2.0)]) != lora_sha256([LoRAWeights("m", base, u, t.T, 2.0)])
    assert lora_sha256([LoRAWeights("m", base, t, t.T, 2.0)]) != lora_sha256([LoRAWeights("m", base, t, t.T, 1.0)])


def test_expanding_upwards_does_not_evaluate_below_the_bracket():
    calls: list[float] = []
    cfg = SearchConfig(tolerance=0.1, low=0.001, high=0.015, iters=5)
    res = search(monotone(0.05, calls), cfg)
    assert min(calls) >= 0.015  # the last ok point of the expansion is the lower end
    assert calls[:3] == [0.015, 0.03, 0.06] and len(calls) <= 3 + 5
    assert res.n_evaluations == len(calls)


@pytest.mark.parametrize("field,bad", [("sigma", "Infinity"), ("sigma", 1e30), ("sigma", -0.01), ("sigma", "0.1"),
                                       ("sigma", 1e-12), ("value", "NaN"), ("criterion", "flip")])
def test_implausible_cache_entry_is_recomputed(model_cfg, anchor_file, tmp_path, caplog, field, bad):
    """A cached result must be one the search could have produced (finite sigma >= 0 within the bracket
    it reaches, finite criterion): Infinity or 1e30 once made the server serve null or flat probabilities."""
    cfg = engine_cfg(model_cfg, anchor_file, tmp_path)
    first = load_engine(cfg, progress=False)
    path = next((tmp_path / "sigma").glob("*.json"))
    data = json.loads(path.read_text())
    text = json.dumps({**data, "result": {**data["result"], field: 0.0}})
    path.write_text(text.replace(f'"{field}": 0.0', f'"{field}": {bad}' if not isinstance(bad, str) or bad in
                                 ("Infinity", "NaN") else f'"{field}": "{bad}"'))
    with caplog.at_level(logging.WARNING):
        again = load_engine(cfg, progress=False)
    assert again.sigma_source == "search" and again.sigma == first.sigma
    assert "implausible" in caplog.text and "recomputing" in caplog.text


def test_reachable_range_holds_every_search_result():
    from tfb_core.search.strategy import bisect, grid, reachable_range

    for method, run in (("bisect", bisect), ("grid", grid)):
        cfg = SearchConfig(low=0.01, high=0.05, tolerance=1.0, method=method, max_expansions=3)
        lo, hi = reachable_range(cfg)
        for root in (1e-6, 0.02, 1e3):  # below, inside and above the bracket
            res = run(lambda sigmas, r=root: [s / r for s in sigmas], cfg)
            assert res.sigma == 0.0 or lo <= res.sigma <= hi, (method, root, res.sigma)


def test_an_edited_decoder_searches_a_generative_adapter_again_not_a_classifier(model_cfg, anchor_file, tmp_path,
                                                                              monkeypatch):
    """The generative search's modules key a generative adapter's sigma, not a classifier's."""
    from tfb_core.data.jsonl import read_jsonl
    from tfb_core.data.tasks import GENERATION, get_task
    from tfb_core.serving.startup import anchor_prompts, load_classifier

    copy = _package_copy(tmp_path, monkeypatch) / "forward" / "decoding.py"
    cache._code_sha256.cache_clear()
    clf = load_classifier(model_cfg, LABELS)
    cfg = engine_cfg(model_cfg, anchor_file, tmp_path)
    task = get_task(None, LABELS)
    prompts, targets = anchor_prompts(task, read_jsonl(anchor_file))
    classifier_key = cache_key(cfg, clf, task, prompts, targets)
    generation_code = cache.code_sha256(cache.GENERATION_SEARCH)
    assert generation_code != cache.code_sha256(cache.CLASSIFIER_SEARCH)
    copy.write_text(copy.read_text() + "\nMAX_STEPS = 1  # an edit\n")
    cache._code_sha256.cache_clear()
    assert cache.code_sha256(cache.GENERATION_SEARCH) != generation_code
    assert cache_key(cfg, clf, task, prompts, targets) == classifier_key
    assert GENERATION.generative
