"""The library in ten lines (tfb_core.BayesianModel): the README's lines run; sigma = 0 is the plain peft
model (greedy generation token for token, the class tokens' softmax); sigma comes from the same cache as
the server's start-up; chat messages are their rendered template; each kind refuses the other's call;
``tfb generate --json`` is the library's answer."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LABELS, with_chat_template
from test_app_support import CHAT_TEMPLATE, clean_env

from app.settings import Settings
from tfb_core.cli import main
from tfb_core.data.loading import LoadError
from tfb_core.model import BayesianModel, engine_config
from tfb_core.serving import startup
from tfb_core.serving.config import DEMO_GENERATIVE_ADAPTER
from tfb_core.serving.startup import load_engine

#: the template renders the tokenizer's BOS itself, as Llama's and SmolLM2's do
TEMPLATE = "{{ bos_token }}" + CHAT_TEMPLATE
ANCHOR = [{"prompt": "one two three"}, {"prompt": "the cat sat on"},
          {"messages": [{"role": "user", "content": "count to three"}]}]
PROMPTS = ["a great film with a wonderful cast", "a dull mess", "superb"]
ASK = [{"role": "user", "content": "Calculate 47 + 38 ="}]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _adapter(root: Path, name: str, source: str, anchor: list[dict], generative: bool) -> str:
    """A copy of a tiny LoRA as a folder that carries its anchor set (and says it is generative)."""
    folder = root / name
    shutil.copytree(source, folder)
    _write_jsonl(folder / "anchor.jsonl", anchor)
    if generative:
        (folder / "train_config.json").write_text(json.dumps({"kind": "generation"}))
    return str(folder)


@pytest.fixture(scope="module")
def lib(tiny, tmp_path_factory):
    """The tiny model with a chat template, two generative adapters (their folders say so) and a classifier."""
    root = tmp_path_factory.mktemp("library")
    model = with_chat_template(tiny["model"], root / "model", TEMPLATE)
    return {"model": str(model), "root": root,
            "writer": _adapter(root, "writer", tiny["adapter_other"], ANCHOR, True),
            "second": _adapter(root, "second", tiny["adapter"], ANCHOR, True),
            "clf": _adapter(root, "clf", tiny["adapter"], [{"prompt": p} for p in PROMPTS], False)}


def _peft(lib, adapter: str):
    """The oracle: the plain peft model of ``adapter`` (transformers and peft only)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(lib["model"], dtype=torch.float32)
    return AutoTokenizer.from_pretrained(lib["model"]), PeftModel.from_pretrained(base, adapter).eval()


def _greedy(tok, peft_model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = peft_model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                                  pad_token_id=tok.pad_token_id)
    return out[0, len(ids):].tolist()


def test_the_ten_lines_run(lib, tmp_path):
    from tfb_core import BayesianModel as Exported

    assert Exported is BayesianModel
    m = Exported.load(lib["model"], lib["writer"], cache_dir=str(tmp_path))  # sigma searched on its anchor
    out = m.generate("Calculate 47 + 38 =", n_samples=10)  # a text
    chat = m.generate(ASK, n_samples=10, answers="per_sample")  # chat messages
    probs = Exported.load(m, lib["clf"], labels=LABELS).predict(["a gripping film"])

    assert (m.kind, m.sigma_source) == ("generation", "search") and m.sigma > 0
    c = out["completion"]
    assert out["text"] == c["text"] and out["sigma"] == m.sigma and out["n_samples"] == 10 and c["tokens"]
    for t in c["tokens"]:
        assert 0 < t["prob"] <= 1 and t["mutual_information"] >= 0
        assert t["predictive_entropy"] == pytest.approx(t["expected_entropy"] + t["mutual_information"], abs=1e-5)
    assert any(t["mutual_information"] > 0 for t in c["tokens"])  # sigma > 0: the samples disagree
    assert c["sequence"]["nll"] == pytest.approx(-sum(t["logprob"] for t in c["tokens"]), rel=1e-5)
    assert c["sequence"]["max_mutual_information"] == pytest.approx(max(t["mutual_information"] for t in c["tokens"]))
    answers = chat["answers"]
    assert len(answers["samples"]) == 10 and sum(len(cl["members"]) for cl in answers["clusters"]) == 10
    assert answers["semantic_entropy"] >= 0 and chat["text"] == answers["samples"][answers["clusters"][0]["members"][0]]["text"]
    (p,) = probs["predictions"]
    assert probs["labels"] == LABELS and p["label"] in LABELS and sum(p["probs"]) == pytest.approx(1, abs=1e-5)
    assert {"confidence", "predictive_entropy", "expected_entropy", "mutual_information"} <= set(p)
    # the second adapter joined the loaded base model: one copy of its weights
    clf = Exported.load(m, lib["clf"], labels=LABELS, sigma=0.05)
    assert clf.engine.classifier.model is m.engine.classifier.model
    # loaded again: both sigmas from the cache, nothing searched
    again = Exported.load(lib["model"], lib["writer"], cache_dir=str(tmp_path))
    assert (again.sigma_source, again.sigma) == ("cache", m.sigma)
    assert again.generate("Calculate 47 + 38 =", n_samples=10) == out  # the same seed: the same answer


def test_importing_the_package_does_not_import_the_library_until_it_is_named():
    code = ("import sys, tfb_core; import tfb_core.data.tasks; print('tfb_core.model' in sys.modules, "
            "'tfb_core.serving.startup' in sys.modules); tfb_core.BayesianModel; print('tfb_core.model' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split("\n")
    assert out[:2] == ["False False", "True"]


def test_generation_at_sigma_zero_is_each_adapters_peft_greedy_decode_token_for_token(lib):
    m = BayesianModel.load(lib["model"], lib["writer"], sigma=0.0)
    second = BayesianModel.load(m, lib["second"], sigma=0.0)  # on m's base model, routed in its forwards
    L = 10
    answers = {}
    for name, model in (("writer", m), ("second", second)):
        tok, peft_model = _peft(lib, lib[name])
        got = model.generate(PROMPTS, max_tokens=L)
        per_sample = model.generate(PROMPTS, max_tokens=L, answers="per_sample", n_samples=3)
        answers[name] = [g["completion"]["token_ids"] for g in got]
        for prompt, g, s in zip(PROMPTS, got, per_sample, strict=True):
            expected = _greedy(tok, peft_model, tok(prompt)["input_ids"], L)
            assert g["completion"]["token_ids"] == expected, (name, prompt)
            assert [a["text"] for a in s["answers"]["samples"]] == [tok.decode(expected, skip_special_tokens=True)] * 3
            assert all(t["mutual_information"] == 0.0 for t in g["completion"]["tokens"])  # exact at sigma = 0
        chat = model.generate(ASK, max_tokens=L)  # the chat template's rendering, its BOS not added twice
        ids = tok(tok.apply_chat_template(ASK, add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False)["input_ids"]
        assert chat["prompt_tokens"] == len(ids) and chat["completion"]["token_ids"] == _greedy(tok, peft_model, ids, L)
    assert answers["writer"] != answers["second"]  # the adapters answer differently: each is its own


def test_prediction_at_sigma_zero_is_the_peft_models_softmax_over_the_class_tokens(lib):
    m = BayesianModel.load(lib["model"], lib["clf"], labels=LABELS, sigma=0.0)
    got = m.predict(PROMPTS, n_samples=4)
    tok, peft_model = _peft(lib, lib["clf"])
    class_ids = [tok(label, add_special_tokens=False)["input_ids"][0] for label in LABELS]
    for prompt, p in zip(PROMPTS, got["predictions"], strict=True):
        with torch.no_grad():
            logits = peft_model(**tok(prompt, return_tensors="pt")).logits[0, -1]
        expected = torch.softmax(logits[class_ids], -1)
        torch.testing.assert_close(torch.tensor(p["probs"]), expected, atol=1e-5, rtol=1e-4)
        assert p["mutual_information"] == 0.0 and p["label"] == LABELS[int(expected.argmax())]
    joined = BayesianModel.load(BayesianModel.load(lib["model"], lib["writer"], sigma=0.0), lib["clf"],
                                labels=LABELS, sigma=0.0)  # beside a generative adapter on one base model
    torch.testing.assert_close(torch.tensor([p["probs"] for p in joined.predict(PROMPTS)["predictions"]]),
                               torch.tensor([p["probs"] for p in got["predictions"]]), atol=1e-5, rtol=1e-4)


def _server_engine(lib, cache: Path, **settings):
    """The server's start-up of one adapter (app.state: its Settings' config, then load_engine)."""
    with clean_env():
        [(_, cfg)] = Settings(model=lib["model"], adapter=lib["writer"], cache_dir=str(cache), **settings).engine_configs()
    return load_engine(cfg.with_defaults(), progress=False)


def test_sigma_is_read_from_the_cache_the_servers_start_up_wrote_and_the_other_way_round(lib, tmp_path, monkeypatch):
    searches = []
    search = startup.search_generation_sigma

    def counted(*args, **kwargs):
        searches.append(1)
        return search(*args, **kwargs)

    monkeypatch.setattr(startup, "search_generation_sigma", counted)
    server = _server_engine(lib, tmp_path / "a")
    assert server.sigma_source == "search" and len(searches) == 1
    m = BayesianModel.load(lib["model"], lib["writer"], cache_dir=str(tmp_path / "a"))
    assert (m.sigma_source, m.sigma, len(searches)) == ("cache", server.sigma, 1)
    # joined to a loaded base model (the runtime load's reading of the adapter): the same key
    clf = BayesianModel.load(lib["model"], lib["clf"], labels=LABELS, sigma=0.05, cache_dir=str(tmp_path / "a"))
    joined = BayesianModel.load(clf, lib["writer"])
    assert (joined.sigma_source, joined.sigma, len(searches)) == ("cache", server.sigma, 1)
    # the library searches first, the server reads it
    mine = BayesianModel.load(lib["model"], lib["writer"], cache_dir=str(tmp_path / "b"))
    assert mine.sigma_source == "search" and len(searches) == 2
    served = _server_engine(lib, tmp_path / "b")
    assert (served.sigma_source, served.sigma, len(searches)) == ("cache", mine.sigma, 2)


@pytest.mark.parametrize("given", [{}, {"seed": 3}, {"sigma": 0.05, "n_samples": 4}, {"anchor_max_tokens": 8}])
def test_the_librarys_config_is_the_servers_for_the_same_values(lib, given):
    """What keys the sigma cache (model, task, anchor, search) is the server's for the same settings
    (TFB_SEED moves the search's seed too)."""
    with clean_env():
        server = Settings(model=lib["model"], adapter=lib["writer"], **given).engine_config().with_defaults()
    mine = engine_config(lib["model"], lib["writer"], **given).with_defaults()
    for f in ("model", "task", "labels", "sigma", "anchor", "search", "n_samples", "seed", "anchor_max_tokens",
              "d_floor"):
        assert getattr(mine, f) == getattr(server, f), f


def test_chat_messages_are_their_rendered_template(lib):
    m = BayesianModel.load(lib["model"], lib["writer"], sigma=0.1)
    messages = [{"role": "system", "content": "be brief"}, *ASK]
    text = m.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith(m.tokenizer.bos_token)
    # the text path adds the tokenizer's BOS, which the template writes itself
    rendered = m.generate(text[len(m.tokenizer.bos_token):], n_samples=4, max_tokens=6)
    assert m.generate(messages, n_samples=4, max_tokens=6) == rendered
    among = m.generate([messages, "a dull mess"], n_samples=4, max_tokens=6)[0]  # one of a list: other padding
    assert among["completion"]["token_ids"] == rendered["completion"]["token_ids"]
    assert [t["prob"] for t in among["completion"]["tokens"]] == pytest.approx(
        [t["prob"] for t in rendered["completion"]["tokens"]], abs=1e-5)


def test_each_kind_refuses_the_other_kinds_call_naming_the_adapter(lib):
    m = BayesianModel.load(lib["model"], lib["writer"], sigma=0.05)
    with pytest.raises(ValueError, match=rf"adapter '{re.escape(lib['writer'])}' is a generative adapter .*"
                                         r"use \.generate\(\), not \.predict\(\)"):
        m.predict(["a great film"])
    clf = BayesianModel.load(m, lib["clf"], labels=LABELS, sigma=0.05)
    with pytest.raises(ValueError, match=rf"adapter '{re.escape(lib['clf'])}' is a classifier \(task 'generic', "
                                         r"labels \['negative', 'positive'\]\): use \.predict\(\), not \.generate\(\)"):
        clf.generate("a great film")
    with pytest.raises(TypeError, match=r"unknown settings \['sigmaa'\]"):
        BayesianModel.load(lib["model"], lib["writer"], sigmaa=0.1)
    with pytest.raises(ValueError, match=r"\['dtype'\]: the base model is loaded already"):
        BayesianModel.load(m, lib["clf"], labels=LABELS, sigma=0.05, dtype="bfloat16")
    with pytest.raises(ValueError, match="answers must be one of"):
        m.generate("x", answers="vote")
    with pytest.raises(ValueError, match="prompt 1: expected a text or a list of chat messages"):
        m.generate(["x", 3])


def _run_cli(capsys, *argv) -> tuple[int, str, list[str]]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.startswith(f"tfb {argv[0]}: error:")]


def test_tfb_generate_json_is_the_librarys_answer_and_errors_are_one_line(lib, tmp_path, capsys):
    inputs = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one two"}, {"messages": ASK}])
    model = ["--model", lib["model"], "--adapter", lib["writer"], "--sigma", "0.1"]
    code, out, errors = _run_cli(capsys, "generate", *model, "--samples", "3", "--seed", "5", "--max-tokens", "4",
                                 "--prompt", "a b c", "--input", str(inputs), "--json")
    assert code == 0 and not errors
    m = BayesianModel.load(lib["model"], lib["writer"], sigma=0.1, n_samples=3, seed=5)
    expected = m.generate(["a b c", "one two", ASK], max_tokens=4)
    assert json.loads(out) == {"adapter": lib["writer"], "sigma": 0.1, "sigma_source": "fixed",
                               "results": json.loads(json.dumps(expected))}
    code, out, _ = _run_cli(capsys, "generate", *model, "--samples", "3", "--seed", "5", "--max-tokens", "4", "--chat",
                            "--prompt", ASK[0]["content"], "--json")  # a prompt as one user message
    assert code == 0 and json.loads(out)["results"] == [json.loads(json.dumps(m.generate(ASK, max_tokens=4)))]
    code, out, _ = _run_cli(capsys, "generate", *model, "--samples", "3", "--answers", "per_sample", "--prompt", "a b c")
    assert code == 0 and out.startswith("sigma=0.1 (fixed)  N=3  answers=per_sample") and "semantic_entropy=" in out
    for argv, message in [
        (["generate", "--model", lib["model"], "--adapter", lib["clf"], "--labels", *LABELS, "--sigma", "0.1",
          "--prompt", "x"], f"adapter '{lib['clf']}' is a classifier"),
        (["generate", *model], "no prompts: give --prompt TEXT"),
        (["generate", *model, "--input", str(_write_jsonl(tmp_path / "bad.jsonl", [{"text": "x"}]))],
         "bad.jsonl: record 1: give one of 'prompt'"),
        (["generate", *model, "--prompt", "x", "--max-tokens", "0"], "max_tokens must be >= 1"),
        (["predict", *model, "--prompt", "x"], f"adapter '{lib['writer']}' is a generative adapter"),
    ]:
        code, _, errors = _run_cli(capsys, *argv)
        assert code == 2 and len(errors) == 1 and message in errors[0], (argv, errors)


def test_tfb_generate_on_the_embedded_default_is_its_generative_adapter(monkeypatch, capsys):
    seen = []

    def stop(cls, cfg, progress=False):
        seen.append(cfg.with_defaults())
        raise LoadError("stopped before loading")

    monkeypatch.setattr(BayesianModel, "from_config", classmethod(stop))
    assert _run_cli(capsys, "generate", "--prompt", "x")[0] == 2
    assert seen[-1].model.adapter == str(DEMO_GENERATIVE_ADAPTER) and seen[-1].generative
    assert _run_cli(capsys, "generate", "--adapter", "/elsewhere", "--prompt", "x")[0] == 2
    assert seen[-1].model.adapter == "/elsewhere"


def test_a_joined_adapter_whose_search_fails_leaves_the_base_model_as_it_was(lib, tmp_path, monkeypatch):
    m = BayesianModel.load(lib["model"], lib["clf"], labels=LABELS, sigma=0.05, cache_dir=str(tmp_path))
    before = m.predict(PROMPTS)

    def fail(*args, **kwargs):
        raise RuntimeError("the search failed")

    monkeypatch.setattr(startup, "search_generation_sigma", fail)
    with pytest.raises(RuntimeError, match="the search failed"):
        BayesianModel.load(m, lib["writer"])  # sigma neither given nor cached: searched
    posteriors = m.engine.classifier.posteriors
    assert len(posteriors) == 2 and posteriors[1] is None  # its slot freed: no layer routes to it
    assert m.predict(PROMPTS) == before


def test_a_partial_search_keeps_the_default_search_of_the_adapters_kind(lib):
    """``search={...}`` changes only its fields of the kind's default search (a generative adapter's
    tolerance is not the classifier's), as the server's TFB_SEARCH_* settings do."""
    from tfb_core.search.strategy import CLASSIFIER_SEARCH, GENERATION_SEARCH

    with clean_env():
        server = Settings(model=lib["model"], adapter=lib["writer"], search_low=0.002, seed=3).engine_config()
    mine = engine_config(lib["model"], lib["writer"], search={"low": 0.002}, seed=3).with_defaults()
    assert mine.search == server.with_defaults().search
    assert (mine.search.criterion, mine.search.tolerance, mine.search.low) == ("nll", GENERATION_SEARCH.tolerance, 0.002)
    clf = engine_config(lib["model"], lib["clf"], labels=LABELS, search={"low": 0.002}).with_defaults()
    assert (clf.search.tolerance, clf.search.low) == (CLASSIFIER_SEARCH.tolerance, 0.002)
