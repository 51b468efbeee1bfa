"""Published adapters by name, and their reference anchor sets (read with ``datasets``, cached).

The anchor tests build small data sets on disk laid out as the hub's repositories are (a README
whose YAML names the configs and their parquet files), so ``datasets.load_dataset`` runs its real
code path without a network.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tfb_core.data import published
from tfb_core.data.published import PublishedError, parse, reference_anchor, reference_indices


def need(module: str):
    """Import ``module``; skipped locally if missing, a failure in CI (CI=true)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("CI", "").lower() in ("1", "true"):
            pytest.fail(f"{module} is needed in CI: {exc}")
        pytest.skip(f"{module} is not installed (pip install 'tfb-serve[hub]')")


# --- naming ---------------------------------------------------------------------------------
def test_every_published_name_gives_the_reference_scripts_path():
    # the path of scripts/tfblora/{mle,map,blob}.sh of the reference code, written out
    for method in ("mle", "map", "blob"):
        for dataset, task in [("winogrande_s", "winogrande"), ("winogrande_m", "winogrande"),
                              ("ARC-Challenge", "arc_challenge"), ("ARC-Easy", "arc_easy"), ("obqa", "openbookqa"),
                              ("boolq", "boolq")]:
            for seed in (1, 2, 3):
                p = parse(f"{method}/{dataset}/{seed}")
                assert p.repo == "FlyLee/bayesian-peft" and p.base_model == "meta-llama/Meta-Llama-3.1-8B"
                assert p.subfolder == (f"{method}/meta-llama/Meta-Llama-3.1-8B/{dataset}/{method}-{dataset}-sample10-"
                                       f"eps0.05-kllr0.0075-beta0.15-seed{seed}")
                assert p.task == task
    assert parse("BLOB/arc-challenge/2") == parse("blob/ARC-Challenge/2")


@pytest.mark.parametrize("spec, names", [("mlx/boolq/1", "mle, map, blob"),
                                         ("mle/winogrande/1", "winogrande_s, winogrande_m, ARC-Challenge"),
                                         ("mle/boolq/4", "1, 2, 3"), ("mle/boolq", "method/dataset/seed")])
def test_unknown_names_are_one_line_errors_listing_the_valid_ones(spec, names):
    with pytest.raises(PublishedError) as err:
        parse(spec)
    assert names in str(err.value) and "\n" not in str(err.value)


def test_cli_and_server_reject_an_unknown_name_at_start_up(monkeypatch, capsys):
    from app.cli import main

    assert main(["predict", "--published", "mle/boolq/7", "--prompt", "x"]) == 2
    monkeypatch.setenv("TFB_PUBLISHED", "mle/sst2/1")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "valid: 1, 2, 3" in err[0] and "valid: winogrande_s" in err[1]


def test_published_fills_adapter_model_and_task():
    from app.settings import Settings
    from tfb_core.config import ModelConfig
    from tfb_core.serving.config import EngineConfig

    cfg = Settings(published="blob/obqa/3").engine_config().with_defaults()
    assert (cfg.model.model, cfg.model.adapter, cfg.task) == ("meta-llama/Meta-Llama-3.1-8B", "FlyLee/bayesian-peft",
                                                               "openbookqa")
    assert cfg.model.adapter_subfolder == parse("blob/obqa/3").subfolder
    # a local copy of the base model is kept; the empty string (compose's switch-off) is unset
    local = EngineConfig(model=ModelConfig(model="/models/llama"), published="mle/boolq/1").with_defaults()
    assert local.model.model == "/models/llama" and local.task == "boolq"
    assert Settings(published="").published is None
    with pytest.raises(ValueError, match="name one"):
        EngineConfig(model=ModelConfig(adapter="org/other"), published="mle/boolq/1")
    with pytest.raises(ValueError, match="for task 'boolq'"):
        EngineConfig(published="mle/boolq/1", task="winogrande")


# --- the reference anchor -------------------------------------------------------------------
def write_hub_dataset(root: Path, configs: dict[str | None, list[dict]]) -> Path:
    """A data set folder as the hub stores it: ``<config>/train-00000-of-00001.parquet`` and a
    README whose YAML ``configs`` name them (``None``: the default config, ``data/``)."""
    pq = need("pyarrow.parquet")
    import pyarrow as pa

    lines = ["---", "configs:"]
    for name, rows in configs.items():
        sub = name or "data"
        (root / sub).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), root / sub / "train-00000-of-00001.parquet")
        lines += [f"- config_name: {name or 'default'}", "  data_files:", "  - split: train",
                  f"    path: {sub}/train-*"]
    (root / "README.md").write_text("\n".join(lines + ["---", ""]))
    return root


def arc_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        k = 3 + i % 3  # 3, 4 or 5 choices; every 4th record with digit labels, as some ARC records have
        labels = [str(j + 1) for j in range(k)] if i % 4 == 0 else list("ABCDE"[:k])
        rows.append({"id": f"Q{i}", "question": f"question {i}?",
                     "choices": {"text": [f"t{i}.{j}" for j in range(k)], "label": labels},
                     "answerKey": labels[i % k]})
    return rows


@pytest.fixture()
def local_hub(tmp_path, monkeypatch):
    """ARC-Challenge (1203 rows, more than the anchor) and winogrande_s (40 rows, fewer) on disk."""
    need("datasets")
    root = write_hub_dataset(tmp_path / "ai2_arc", {"ARC-Challenge": arc_rows(1203)})
    wino = [{"sentence": f"s{i} _ .", "option1": "x", "option2": "y", "answer": "1" if i % 2 else "2"}
            for i in range(40)]
    wroot = write_hub_dataset(tmp_path / "winogrande", {"winogrande_s": wino, "winogrande_m": wino[:7]})
    monkeypatch.setitem(published.HUB_DATASETS, "ARC-Challenge", (str(root), "ARC-Challenge"))
    monkeypatch.setitem(published.HUB_DATASETS, "winogrande_s", (str(wroot), "winogrande_s"))
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return {"arc": root, "winogrande": wroot, "cache": tmp_path / "cache"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_reference_anchor_is_datasets_own_shuffle_and_select(local_hub):
    import datasets

    path = reference_anchor("ARC-Challenge", local_hub["cache"])
    ours = read_jsonl(path)
    # the oracle: the reference's own call on the same data set
    ds = datasets.load_dataset(str(local_hub["arc"]), "ARC-Challenge", split="train",
                               cache_dir=str(local_hub["cache"] / "oracle"))
    theirs = [dict(r) for r in ds.shuffle(seed=42).select(range(500))]
    assert len(ours) == 500 and ours == theirs
    assert ours != [dict(r) for r in ds.select(range(500))]  # shuffled, not the first 500
    assert reference_indices(1203) == [int(i) for i in ds.shuffle(seed=42)._indices.column(0).to_pylist()[:500]]
    # fewer rows than the anchor size: all of them, shuffled (the reference's min(size, n))
    small = read_jsonl(reference_anchor("winogrande_s", local_hub["cache"]))
    wds = datasets.load_dataset(str(local_hub["winogrande"]), "winogrande_s", split="train",
                                cache_dir=str(local_hub["cache"] / "oracle"))
    assert small == [dict(r) for r in wds.shuffle(seed=42).select(range(40))]


def test_reference_anchor_is_cached_and_used_offline(local_hub, monkeypatch):
    import datasets

    path = reference_anchor("ARC-Challenge", local_hub["cache"])
    assert path.parent == local_hub["cache"] / "anchors" and not list(path.parent.glob("*.tmp"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the cache should have been used"))
    assert reference_anchor("ARC-Challenge", local_hub["cache"]) == path


def test_offline_without_a_cached_anchor_says_which_file_to_give(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PublishedError) as err:
        reference_anchor("boolq", tmp_path)
    msg = str(err.value)
    assert "--anchor" in msg and "google/boolq" in msg and "offline" in msg
    assert str(tmp_path / "anchors" / "boolq-train-shuffle42-500.jsonl") in msg


def test_offline_start_up_without_the_anchor_stops_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from app.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("tfb_core.serving.startup.load_classifiers", lambda *a, **k: pytest.fail("loaded the model first"))
    assert main(["search", "--published", "blob/ARC-Easy/3", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--anchor" in err and "ARC-Easy-train-shuffle42-500.jsonl" in err
    monkeypatch.setenv("TFB_PUBLISHED", "mle/obqa/1")
    monkeypatch.setenv("TFB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TFB_EXIT_ON_STARTUP_FAILURE", "false")
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app()) as client:  # the server: not ready, the reason on /readyz
        deadline = time.monotonic() + 60
        while "--anchor" not in json.dumps(body := client.get("/readyz").json()):
            assert time.monotonic() < deadline, body
            time.sleep(0.2)
        assert client.get("/readyz").status_code == 503


def test_a_named_task_without_anchor_searches_on_the_reference_anchor(tiny, local_hub, monkeypatch):
    """The engine's default anchor: the published data set's, or the one data set of a named task."""
    from tfb_core.config import ModelConfig
    from tfb_core.data.loading import LoadError
    from tfb_core.data.tasks import get_task
    from tfb_core.serving.config import EngineConfig
    from tfb_core.serving.startup import default_anchor

    cfg = EngineConfig(model=ModelConfig(model=tiny["model"], adapter=tiny["adapter"],
                                         cache_dir=str(local_hub["cache"])), task="arc_challenge")
    assert default_anchor(cfg, get_task("arc_challenge")) == \
        published.anchor_cache_path("ARC-Challenge", local_hub["cache"])
    wino = EngineConfig(model=cfg.model, task="winogrande")
    with pytest.raises(LoadError, match="winogrande_s"):  # S and M differ: the task alone cannot say
        default_anchor(wino, get_task("winogrande"))
    pub = EngineConfig(model=ModelConfig(model=tiny["model"], cache_dir=str(local_hub["cache"])),
                       published="map/winogrande_s/2")
    assert default_anchor(pub, get_task("winogrande")).name.startswith("winogrande_s-train")
