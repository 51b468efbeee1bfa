"""The ``tfb`` command line of the library: predict, search, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import LABELS

from tfb_core.cli import main
from tfb_core.serving.config import EngineConfig
from tfb_core.serving.startup import load_engine

PROMPTS = ["a great film", "a dull mess of a movie"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def base_args(tiny, *extra):
    return ["--model", tiny["model"], "--adapter", tiny["adapter"], "--cache-dir", str(tiny["root"] / "cli-cache"),
            *extra]


def test_predict_json_matches_the_library(tiny, model_cfg, capsys):
    args = ["predict", *base_args(tiny, "--labels", *LABELS, "--sigma", "0.3", "--samples", "5", "--seed", "4",
                                  "--json")]
    for p in PROMPTS:
        args += ["--prompt", p]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0
    got = json.loads(out)
    assert got["labels"] == LABELS and got["sigma"] == 0.3 and got["n_samples"] == 5
    assert len(got["predictions"]) == 2
    for p in got["predictions"]:
        assert set(p) == {"label", "index", "probs", "confidence", "predictive_entropy", "expected_entropy",
                          "mutual_information"}
        assert p["label"] == LABELS[p["index"]] and abs(sum(p["probs"]) - 1) < 1e-5
    engine = load_engine(EngineConfig(model=model_cfg, labels=tuple(LABELS), sigma=0.3), progress=False)
    direct = engine.classifier.sample_probs(PROMPTS, 5, seed=4, sigma=0.3).mean(1)
    torch.testing.assert_close(torch.tensor([p["probs"] for p in got["predictions"]]), direct, atol=1e-5, rtol=1e-4)


def test_predict_named_task_from_jsonl(tiny, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"sentence": "a great film", "label": 1}) + "\n")
    code, out, err = run_cli(capsys, "predict", *base_args(tiny, "--task", "sst2", "--sigma", "0", "--input",
                                                            str(inp), "--json"))
    assert code == 0, err
    got = json.loads(out)
    assert got["labels"] == ["negative", "positive"] and got["predictions"][0]["mutual_information"] == 0.0


def test_search_prints_the_result_and_reuses_the_cache(tiny, tmp_path, capsys):
    anchor = tmp_path / "a.jsonl"
    anchor.write_text("\n".join(json.dumps({"prompt": p}) for p in ["a great film", "dull", "superb", "thin plot"]))
    args = ["search", *base_args(tiny, "--labels", *LABELS, "--anchor", str(anchor), "--criterion", "flip",
                                 "--tolerance", "0.25", "--low", "0.01", "--high", "0.4", "--search-samples", "3",
                                 "--json")]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    first = json.loads(out)
    assert first["source"] == "search" and first["criterion"] == "flip" and first["value"] <= 0.25
    assert first["history"] and first["seconds"] >= 0
    code, out, _ = run_cli(capsys, *args)
    assert json.loads(out)["source"] == "cache" and json.loads(out)["sigma"] == first["sigma"]


@pytest.mark.parametrize("extra, message", [
    (["--task", "no_such_task"], "unknown task 'no_such_task'"),
    (["--labels", "positive", "not a single token"], "label 'not a single token' is"),
    (["--labels", "positive"], "at least 2 labels"),
    (["--labels", *LABELS, "--sigma", "-1"], "sigma must be a finite number >= 0"),
    (["--task", "sst2", "--labels", "a", "b"], "fixed labels"),
])
def test_bad_input_is_a_clear_error(tiny, capsys, extra, message):
    code, _, err = run_cli(capsys, "predict", *base_args(tiny, *extra, "--prompt", "x"))
    assert code == 2 and message in err


def test_missing_adapter_names_the_path(tiny, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, _, err = run_cli(capsys, "predict", "--model", tiny["model"], "--adapter", str(missing), "--labels",
                           *LABELS, "--sigma", "0", "--prompt", "x")
    assert code == 2 and str(missing) in err and "adapter_config.json" in err


def test_adapter_for_another_base_model_is_an_error(tiny, tmp_path, capsys):
    from conftest import build_lora

    other = tmp_path / "other"
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    wrong = build_lora(other, tmp_path / "wrong_adapter")
    code, _, err = run_cli(capsys, "predict", "--model", tiny["model"], "--adapter", str(wrong), "--labels",
                           *LABELS, "--sigma", "0", "--prompt", "x")
    assert code == 2 and "does not fit model" in err and str(wrong) in err


def test_missing_model_and_anchor_name_the_path(tiny, tmp_path, capsys):
    code, _, err = run_cli(capsys, "predict", "--model", str(tmp_path / "nomodel"), "--adapter", tiny["adapter"],
                           "--labels", *LABELS, "--sigma", "0", "--prompt", "x")
    assert code == 2 and "nomodel" in err
    code, _, err = run_cli(capsys, "predict", *base_args(tiny, "--labels", *LABELS, "--anchor",
                                                          str(tmp_path / "none.jsonl"), "--prompt", "x"))
    assert code == 2 and "none.jsonl" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{oops\n')
    code, _, err = run_cli(capsys, "predict", *base_args(tiny, "--labels", *LABELS, "--anchor", str(bad),
                                                          "--prompt", "x"))
    assert code == 2 and "bad.jsonl:2" in err


def test_blob_adapter_extra_keys_are_ignored_with_a_log_line(tiny, caplog):
    import logging
    from dataclasses import replace

    from tfb_core.config import ModelConfig
    from tfb_core.serving.startup import load_classifier

    cfg = ModelConfig(model=tiny["model"], adapter=tiny["adapter_blob"])
    with caplog.at_level(logging.INFO):
        clf = load_classifier(cfg, LABELS)
    assert "lora_A_rho" in caplog.text
    plain = load_classifier(replace(cfg, adapter=tiny["adapter"]), LABELS)
    assert len(clf.posterior.modules) == len(plain.posterior.modules)
    for a, b in zip(clf.posterior.modules, plain.posterior.modules, strict=True):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)


def test_the_library_does_not_import_its_command_line():
    """tfb_core's modules depend on each other one way: only cli.py (and __main__ code) imports cli."""
    import ast
    from pathlib import Path

    import tfb_core

    for path in Path(tfb_core.__file__).parent.glob("*.py"):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "tfb_core.cli" or n.startswith("tfb_core.cli.") for n in names), path.name
