"""Llama-3.1 in miniature, offline: the compose file's GPU service environment on CPU.

A random-weight Llama-3.1-8B scaled down (same 128256-token vocabulary and real tokenizer, llama3
rope scaling, grouped-query attention, untied lm_head) and adapters in the published format sit in
a local hub cache under the published ids (``meta-llama/Meta-Llama-3.1-8B``, ``FlyLee/bayesian-peft``
with its subfolders). With ``HF_HUB_OFFLINE=1`` and the ``tfb`` service's TFB_* values read from
deploy/docker-compose.yml (CPU and float32 instead of CUDA and bfloat16), the server starts, finds
the reference anchor in its cache, searches sigma, becomes ready and answers /predict.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from helpers.models import build_llama31, build_published_lora, hub_snapshot
from transformers import AutoConfig

from tfb_core.data.published import parse, reference_anchor
from tfb_core.serving.response import predict

ROOT = Path(__file__).resolve().parents[1]
MLE, BLOB = "mle/winogrande_s/1", "blob/winogrande_s/1"
WINO = [{"sentence": f"The trophy does not fit in the suitcase because the _ is too {w}.", "option1": "trophy",
         "option2": "suitcase", "answer": "1" if w in ("big", "wide") else "2"}
        for w in ("big", "small", "wide", "narrow", "large", "tiny", "long", "short")] * 3


@pytest.fixture(scope="module")
def mini(tmp_path_factory, llama3_tokenizer_dir):
    """A hub cache with the miniature base model and two published adapters, and a tfb cache with the
    reference anchor of winogrande_s (made by :func:`reference_anchor` from a local hub-laid-out copy)."""
    from test_published import need, write_hub_dataset

    need("datasets")
    root = tmp_path_factory.mktemp("llama31")
    hub = root / "hf" / "hub"
    base = build_llama31(hub_snapshot(hub, parse(MLE).base_model), llama3_tokenizer_dir)
    adapters = hub_snapshot(hub, parse(MLE).repo)
    config = AutoConfig.from_pretrained(base)
    for spec, blob in ((MLE, False), (BLOB, True)):
        build_published_lora(config, adapters / parse(spec).subfolder, blob=blob)
    cache = root / "tfb"
    data = write_hub_dataset(root / "winogrande", {"winogrande_s": WINO})
    mp = pytest.MonkeyPatch()
    mp.setitem(sys.modules["tfb_core.data.published"].HUB_DATASETS, "winogrande_s", (str(data), "winogrande_s"))
    mp.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        reference_anchor("winogrande_s", cache)
    finally:
        mp.undo()
    return {"root": root, "base": base, "adapters": adapters, "cache": cache}


def compose_environment() -> dict[str, str]:
    """The ``tfb`` service's environment with every ``${VAR:-default}`` at its default; entries
    passed through from the caller (no value) are left out."""
    env = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())["services"]["tfb"]["environment"]
    out = {}
    for key, value in env.items():
        if value is None:
            continue
        out[key] = re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", str(value))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(mini, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TFB_", "HF_"))}
    env.update(compose_environment())
    env.update(TFB_DEVICE="cpu", TFB_DTYPE="float32", TFB_CACHE_DIR=str(mini["cache"]), HF_HOME=str(mini["root"] / "hf"),
               HF_HUB_OFFLINE="1", TFB_HOST="127.0.0.1", TFB_PORT=str(free_port()), OMP_NUM_THREADS="1", **extra)
    return env


def call(port: int, path: str, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def serve(mini, inputs: list[dict], **extra: str) -> tuple[dict, dict]:
    """Start ``tfb serve`` with the compose environment, wait until ready; (/info, /predict)."""
    env = offline_env(mini, **extra)
    port = int(env["TFB_PORT"])
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if call(port, "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.5)
        status, info = call(port, "/info")
        assert status == 200, info
        status, out = call(port, "/predict", {"inputs": inputs})
        assert status == 200, out
        return info, out
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def peft_probs(mini, spec: str, records: list[dict], dtype=torch.float32) -> torch.Tensor:
    """The untouched peft model's class probabilities, tokenized as the reference does."""
    from peft import PeftModel
    from test_prompts import ref_label_ids, ref_prompt
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mini["base"])
    tok.padding_side, tok.pad_token = "left", tok.bos_token
    model = AutoModelForCausalLM.from_pretrained(mini["base"], dtype=dtype)
    model = PeftModel.from_pretrained(model, str(mini["adapters"] / parse(spec).subfolder)).eval()
    batch = tok([ref_prompt("winogrande_s", r) for r in records], padding=True, truncation=True, max_length=300,
                return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits[:, -1, ref_label_ids(tok, "winogrande_s")]
    return torch.softmax(logits.float(), dim=-1)


def test_the_adapters_have_peft_own_keys_and_shapes(mini):
    """The adapters are written without peft's model: their keys and shapes are what peft saves."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(mini["base"]),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "lm_head"]))
    theirs = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
    for spec in (MLE, BLOB):
        ours = {k: tuple(v.shape) for k, v in load_file(mini["adapters"] / parse(spec).subfolder /
                                                         "adapter_model.safetensors").items()}
        assert {k: v for k, v in ours.items() if "lora_A_rho" not in k} == theirs
        assert any("lora_A_rho" in k for k in ours) == (spec == BLOB)


def test_compose_environment_names_a_published_adapter():
    env = compose_environment()
    assert env["TFB_PUBLISHED"] == MLE and "TFB_ANCHOR" not in env and "TFB_ADAPTER" not in env


def test_the_compose_service_serves_the_published_adapter_offline(mini):
    info, out = serve(mini, WINO[:4])
    assert info["published"] == MLE and info["adapter"] == "FlyLee/bayesian-peft"
    assert info["adapter_subfolder"] == parse(MLE).subfolder and info["model"] == "meta-llama/Meta-Llama-3.1-8B"
    assert info["sigma_source"] == "search" and info["sigma"] > 0 and info["task"] == "winogrande"
    assert info["anchor"].endswith("winogrande_s-train-shuffle42-500.jsonl")
    assert info["search"]["tolerance"] == float(compose_environment()["TFB_SEARCH_TOLERANCE"])
    assert info["lora_modules"] == 2 * 2 + 1  # q_proj and v_proj of 2 layers, and lm_head
    assert out["labels"] == ["A", "B"] and out["sigma"] == info["sigma"]
    assert all(abs(sum(p["probs"]) - 1) < 1e-5 and p["mutual_information"] >= 0 for p in out["predictions"])


def test_at_sigma_zero_the_server_equals_the_untouched_peft_model(mini):
    info, out = serve(mini, WINO[:6], TFB_SIGMA="0")
    assert info["sigma_source"] == "fixed"
    ours = torch.tensor([p["probs"] for p in out["predictions"]])
    torch.testing.assert_close(ours, peft_probs(mini, MLE, WINO[:6]), atol=1e-5, rtol=0)


def test_blob_adapter_equals_peft_at_sigma_zero(mini, caplog):
    """BLoB's lora_A_rho keys are skipped (and named in the log); the mean adapter is used."""
    with caplog.at_level("INFO", logger="tfb_core.data.loading"):
        engine = local_engine(mini, BLOB)
    assert "lora_A_rho" in caplog.text
    ours = torch.tensor([p["probs"] for p in predict(engine, WINO[:3])["predictions"]])
    torch.testing.assert_close(ours, peft_probs(mini, BLOB, WINO[:3]), atol=1e-5, rtol=0)


def local_engine(mini, spec: str, **model_kw):
    from tfb_core.config import ModelConfig
    from tfb_core.serving.config import EngineConfig
    from tfb_core.serving.startup import load_engine

    model = ModelConfig(model=str(mini["base"]), adapter=str(mini["adapters"] / parse(spec).subfolder),
                        cache_dir=str(mini["cache"]), **model_kw)
    return load_engine(EngineConfig(model=model, task="winogrande", sigma=0.0), progress=False)


def test_bfloat16_through_the_miniature(mini):
    engine = local_engine(mini, MLE, dtype="bfloat16")
    assert next(engine.classifier.model.parameters()).dtype == torch.bfloat16
    ours = torch.tensor([p["probs"] for p in predict(engine, WINO[:4])["predictions"]])
    torch.testing.assert_close(ours, peft_probs(mini, MLE, WINO[:4], dtype=torch.bfloat16), atol=2e-2, rtol=0)
    engine.sigma = 0.05
    noisy = predict(engine, WINO[:4], n_samples=4)["predictions"]
    assert all(p["mutual_information"] > 0 for p in noisy)


def test_8bit_through_the_miniature(mini):
    """bitsandbytes LLM.int8 (its CPU backend here, CUDA on a GPU host) through the same miniature."""
    from test_published import need

    bnb = need("bitsandbytes")
    device = os.environ.get("TFB_TEST_DEVICE", "cpu")
    if device == "cpu" and tuple(int(x) for x in bnb.__version__.split(".")[:2]) < (0, 46):
        pytest.skip(f"bitsandbytes {bnb.__version__} has no CPU backend (0.46+): 8-bit needs a CUDA device here")
    engine = local_engine(mini, MLE, device=device, load_in_8bit=True)
    kinds = {type(m).__name__ for n, m in engine.classifier.model.named_modules() if n.endswith("q_proj.base_layer")}
    assert kinds == {"Linear8bitLt"}
    ours = torch.tensor([p["probs"] for p in predict(engine, WINO[:4])["predictions"]])
    torch.testing.assert_close(ours, peft_probs(mini, MLE, WINO[:4]), atol=2e-3, rtol=0)  # int8 rounding
    engine.sigma = 0.05
    assert all(p["mutual_information"] > 0 for p in predict(engine, WINO[:4], n_samples=4)["predictions"])
