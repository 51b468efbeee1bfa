"""Every common base family: a tiny random model of each, with a peft LoRA (non-zero B) on its own
attention and MLP projections, served by TFB as peft serves it.

Per family: at sigma = 0 the classifier's class-token probabilities and the generator's greedy
decode of a left-padded batch are peft's (float32 exactly up to float order, bfloat16 within its
rounding); the N-row decode at sigma > 0 is the mean of its samples each decoded alone; and a second
adapter loaded at run time (serving.runtime prepare + install) serves as peft serves it, beside the
first in one decode. Llama is tested throughout the other files; its rotary positions hide position
bugs that GPT-2's absolute ones show.

Covered: biased projections (Qwen2's q/k/v, GPT-2's and GPT-NeoX's every layer), tied embeddings
(Qwen3, Gemma 3, GPT-2), fused projections (Phi-3's qkv_proj and gate_up_proj, GPT-NeoX's
query_key_value), Conv1D layers (GPT-2, which peft wraps with fan_in_fan_out), LoRA on the output
layer (Qwen2's lm_head, Mistral's, GPT-NeoX's embed_out), sliding-window layers (Gemma 3), a head that
caps its logits (Gemma 2's final_logit_softcapping), and the
real tokenizers of Qwen (transformers builds Qwen2Tokenizer for model type qwen2) and Gemma 3.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import DEVICE, assert_decode_is_the_mean_of_samples_alone, build_lora, npm_tokenizer_dir
from helpers.models import build_tokenizer

from tfb_core.config import ModelConfig
from tfb_core.forward.completion import GenerationRequest
from tfb_core.forward.generator import BayesianGenerator
from tfb_core.forward.planning import attention_window
from tfb_core.search.generation import answer_scores
from tfb_core.serving.startup import load_classifier

LABELS = ["A", "B", "C", "D"]
PREFIX = "Return the label of the correct answer for the question below. Question: "
#: prompts of different lengths that share a prefix (the classifier's shared-prefix forward)
SHARED = [PREFIX + "a great film with a wonderful cast Answer:", PREFIX + "no Answer:",
          PREFIX + "the plot is thin but the acting is superb Answer:"]
#: prompts of different lengths that share nothing (plain left-padded forwards)
MIXED = ["a dull and tedious mess of a movie", "yes", "I would not watch it again Choices: A B"]
MAX_TOKENS = 8
SIGMA = 0.3
#: bfloat16 against peft: both round every layer's output to 8 bits of mantissa, in other orders
BF16_PROBS = dict(atol=3e-2, rtol=0.0)
BF16_LOGITS = dict(atol=5e-2, rtol=2e-2)


@dataclass(frozen=True)
class Family:
    name: str
    config: Callable[..., Any]  # (vocabulary size, **special token ids) -> transformers config
    targets: tuple[str, ...]  # the served adapter's LoRA modules (the family's own names)
    other: tuple[str, ...]  # the adapter loaded at run time
    tokenizer: str | None = None  # helpers.models.NPM_TOKENIZERS key; None: a local BPE tokenizer


SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256)
LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _qwen2(vocab: int, **tokens: Any) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, num_key_value_heads=2, tie_word_embeddings=False, **SMALL, **tokens)


def _qwen3(vocab: int, **tokens: Any) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, **SMALL, **tokens)


def _gemma3(vocab: int, **tokens: Any) -> Any:
    from transformers import Gemma3TextConfig

    # one sliding-window layer with a window shorter than the prompts, one global
    return Gemma3TextConfig(vocab_size=vocab, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                            sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                            tie_word_embeddings=True, **SMALL, **tokens)


def _gemma2(vocab: int, **tokens: Any) -> Any:
    from transformers import Gemma2Config

    # its head caps the logits (cap * tanh(x / cap)): a cap small enough to change a random model's
    # softmax, which a class-token read of lm_head alone would miss
    return Gemma2Config(vocab_size=vocab, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                        final_logit_softcapping=0.2, tie_word_embeddings=True, **SMALL, **tokens)


def _mistral(vocab: int, **tokens: Any) -> Any:
    from transformers import MistralConfig

    return MistralConfig(vocab_size=vocab, num_key_value_heads=2, head_dim=8, sliding_window=None,
                         tie_word_embeddings=False, **SMALL, **tokens)


def _phi3(vocab: int, **tokens: Any) -> Any:
    from transformers import Phi3Config

    return Phi3Config(vocab_size=vocab, num_key_value_heads=2, original_max_position_embeddings=256,
                      tie_word_embeddings=False, **SMALL, **tokens)


def _gpt2(vocab: int, **tokens: Any) -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_positions=256, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                      tie_word_embeddings=True, **tokens)


def _gpt_neox(vocab: int, **tokens: Any) -> Any:
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=vocab, tie_word_embeddings=False, **SMALL, **tokens)


FAMILIES = [
    Family("qwen2", _qwen2, LLAMA_LIKE + ("lm_head",), ("q_proj", "v_proj"), tokenizer="qwen3"),
    Family("qwen3", _qwen3, LLAMA_LIKE, ("k_proj", "o_proj", "down_proj"), tokenizer="qwen3"),
    Family("gemma3", _gemma3, LLAMA_LIKE, ("q_proj", "v_proj", "up_proj"), tokenizer="gemma3"),
    Family("gemma2", _gemma2, LLAMA_LIKE, ("q_proj", "v_proj")),
    Family("mistral", _mistral, LLAMA_LIKE + ("lm_head",), ("q_proj", "v_proj")),
    Family("phi3", _phi3, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"), ("qkv_proj", "down_proj")),
    Family("gpt2", _gpt2, ("c_attn", "c_proj", "c_fc"), ("c_attn", "c_fc")),
    Family("gpt_neox", _gpt_neox, ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "embed_out"),
           ("query_key_value", "dense_4h_to_h")),
]


def _build(family: Family, root: Path) -> dict[str, str]:
    """The family's tiny model (random weights, its tokenizer beside it) and two LoRAs, saved under ``root``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = root / "model"
    if family.tokenizer is None:
        tok = build_tokenizer(model_dir)
    else:
        model_dir.mkdir(parents=True)
        src = npm_tokenizer_dir(family.tokenizer)
        for f in src.iterdir():
            shutil.copy(f, model_dir / f.name)
        tok = AutoTokenizer.from_pretrained(model_dir)
    # the tokenizer's special tokens: the generator stops where peft's generate stops
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cfg = family.config(-(-len(tok) // 64) * 64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=pad)
    torch.manual_seed(0)  # model init only
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(model_dir)
    return {"model": str(model_dir), "adapter": str(build_lora(model_dir, root / "adapter", family.targets)),
            "other": str(build_lora(model_dir, root / "other", family.other, seed=5)), "root": str(root)}


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.name)
def family(request, tmp_path_factory):
    fam = request.param
    return fam, _build(fam, tmp_path_factory.mktemp(fam.name))


def _cfg(paths: dict[str, str], dtype: str = "float32", adapter: str = "adapter") -> ModelConfig:
    return ModelConfig(model=paths["model"], adapter=paths[adapter], cache_dir=str(Path(paths["root"]) / "cache"),
                       device=DEVICE, dtype=dtype)


@dataclass
class Loaded:
    """The family's model in one dtype, served by TFB (its first adapter) and, for reference, by peft
    (both adapters: ``default``, the first, active; ``other``). Loaded once per module: tokenizers
    such as Gemma 3's take seconds to load; the tests only read these (a generator of their own each)."""

    classifier: Any
    peft: Any


def _load(paths: dict[str, str], dtype: str) -> Loaded:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    clf = load_classifier(_cfg(paths, dtype), LABELS)
    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=getattr(torch, dtype)).to(DEVICE).eval()
    peft_model = PeftModel.from_pretrained(model, paths["adapter"])
    peft_model.load_adapter(paths["other"], adapter_name="other")
    return Loaded(clf, peft_model.eval())


@pytest.fixture(scope="module")
def f32(family):
    return _load(family[1], "float32")


@pytest.fixture(scope="module")
def bf16(family):
    return _load(family[1], "bfloat16")


def _peft_class_probs(peft_model, clf, prompts: list[str]) -> torch.Tensor:
    """peft's softmax over the classifier's class tokens at the last position, each prompt alone: (B, C)."""
    out = []
    for toks in clf.tokenize(prompts):
        with torch.no_grad():
            logits = peft_model(input_ids=torch.tensor([toks], device=DEVICE)).logits[0, -1].float()  # (V,)
        out.append(torch.softmax(logits[clf.class_ids], -1).cpu())
    return torch.stack(out)


def _peft_logits(peft_model, tokens: list[int], answer: list[int]) -> torch.Tensor:
    """peft's logits before each token of ``answer`` after the prompt ``tokens``, alone: (L, V) float32."""
    with torch.no_grad():
        logits = peft_model(input_ids=torch.tensor([tokens + answer], device=DEVICE)).logits[0]
    return logits[len(tokens) - 1:-1].float()


def _peft_greedy(peft_model, tokens: list[int], pad_id: int) -> list[int]:
    """peft's greedy ``generate`` of one prompt alone (no padding)."""
    ids = torch.tensor([tokens], device=DEVICE)
    with torch.no_grad():
        out = peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=MAX_TOKENS, pad_token_id=pad_id)
    return out[0, len(tokens):].tolist()


def _tokens(tokenizer, prompts: list[str]) -> list[list[int]]:
    toks = [tokenizer(p)["input_ids"] for p in prompts]
    assert len({len(t) for t in toks}) == len(toks)  # one forward of these is left-padded
    return toks


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_classification_at_sigma_zero_is_peft(request, family, dtype):
    """The classifier's class-token probabilities at sigma = 0 are the peft model's softmax over those
    tokens at the last position: prompts sharing a prefix (its keys and values computed once) and
    prompts sharing nothing, each batch left-padded."""
    loaded = request.getfixturevalue({"float32": "f32", "bfloat16": "bf16"}[dtype])
    clf, peft_model = loaded.classifier, loaded.peft
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == "float32" else BF16_PROBS
    lora_matters = False
    for prompts in (SHARED, MIXED):
        got = clf.sample_probs(prompts, 1, sigma=0.0)[:, 0]  # (B, C)
        want = _peft_class_probs(peft_model, clf, prompts)
        torch.testing.assert_close(got, want, **tol)
        with peft_model.disable_adapter():
            base = _peft_class_probs(peft_model, clf, prompts)
        lora_matters |= bool((base - want).abs().max() > 1e-3)
    assert lora_matters  # the comparison is not the base model's


def test_greedy_generation_at_sigma_zero_is_peft_token_for_token(f32):
    """One left-padded decode of prompts of different lengths (greedy, sigma = 0, float32) gives each
    prompt peft's greedy ``generate`` of that prompt alone, token for token; so does a decode that
    reads the prompts' shared head from the generator's kept rows (a chat template's head), and the
    teacher-forced scores of those answers (their shared prefix computed once) are peft's."""
    gen, peft_model = BayesianGenerator.from_classifier(f32.classifier), f32.peft
    tokens = _tokens(gen.tokenizer, MIXED + SHARED)
    expected = [_peft_greedy(peft_model, t, gen.pad_id) for t in tokens]
    with peft_model.disable_adapter():
        assert [_peft_greedy(peft_model, t, gen.pad_id) for t in tokens] != expected  # the LoRA matters
    reqs = [GenerationRequest(t, n_samples=1, max_tokens=MAX_TOKENS) for t in tokens]
    assert [r.completion.token_ids for r in gen.generate(reqs)] == expected
    shared, answers = tokens[len(MIXED):], expected[len(MIXED):]
    head = next(i for i in range(min(map(len, shared))) if len({t[i] for t in shared}) > 1)
    gen.set_prefix(shared[0][:head])
    assert [r.completion.token_ids for r in gen.generate(reqs[len(MIXED):])] == answers
    windowed = attention_window(gen.model.config) is not None
    assert len(gen.prefix_rows) == (0 if windowed else 1)  # the head kept and read; not past a sliding window
    for t, y, scored in zip(shared, answers, answer_scores(gen, shared, answers, None, 1), strict=True):
        want = torch.log_softmax(_peft_logits(peft_model, t, y), -1).gather(1, torch.tensor(y)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor([tok.logprob for tok in scored.tokens]), want, atol=1e-4, rtol=1e-4)
        assert scored.greedy


def test_bfloat16_greedy_generation_is_a_greedy_path_of_peft(bf16):
    """In bfloat16 near-ties may break either way: every token of the left-padded decode is, within
    bfloat16's rounding, the top token of peft's logits after the tokens before it."""
    gen, peft_model = BayesianGenerator.from_classifier(bf16.classifier), bf16.peft
    tokens = _tokens(gen.tokenizer, MIXED)
    results = gen.generate([GenerationRequest(t, n_samples=1, max_tokens=MAX_TOKENS) for t in tokens])
    for t, res in zip(tokens, results, strict=True):
        y = res.completion.token_ids
        logits = _peft_logits(peft_model, t, y)  # (L, V)
        chosen = logits.gather(1, torch.tensor(y, device=DEVICE)[:, None]).squeeze(1)
        best = logits.max(-1).values
        assert torch.all(chosen >= best - BF16_LOGITS["atol"] - BF16_LOGITS["rtol"] * best.abs()), (chosen, best)


def test_n_row_decode_is_the_mean_of_its_samples_alone(f32):
    """sigma > 0: the N rows of one decode (two prompts of different lengths, left-padded) give the
    mean of the N samples each computed alone."""
    gen = BayesianGenerator.from_classifier(f32.classifier)
    tokens = _tokens(gen.tokenizer, MIXED[:2])
    reqs = [GenerationRequest(tokens[0], n_samples=3, sigma=SIGMA, max_tokens=5, seed=1, top_logprobs=2),
            GenerationRequest(tokens[1], n_samples=3, sigma=SIGMA, max_tokens=5, seed=2, top_logprobs=2)]
    for req, res in zip(reqs, gen.generate(reqs), strict=True):
        assert_decode_is_the_mean_of_samples_alone(gen, req, res)


def test_an_adapter_loaded_at_run_time_serves_as_peft(family, f32):
    """A second adapter (other modules, other weights) read at run time (serving.runtime prepare +
    install, as the load route does) classifies as peft does at sigma = 0, and one greedy decode
    mixing rows of both adapters gives each its own peft model's answer."""
    from tfb_core.serving import runtime
    from tfb_core.serving.config import EngineConfig
    from tfb_core.serving.lifecycle import RuntimeAdapter
    from tfb_core.serving.startup import load_engine

    _, paths = family
    served = load_engine(EngineConfig(model=_cfg(paths), labels=tuple(LABELS), sigma=0.1), progress=False)
    record = RuntimeAdapter("other", EngineConfig(model=_cfg(paths, adapter="other"), labels=tuple(LABELS), sigma=0.1))
    clf, engine = runtime.install(served.classifier, runtime.prepare(served, record), background_calibration=False)
    assert clf.adapter == 1 and engine is not None
    peft_model = f32.peft
    gen = BayesianGenerator.from_classifier(served.classifier)
    tokens = _tokens(gen.tokenizer, MIXED)
    reqs = [GenerationRequest(t, n_samples=1, max_tokens=MAX_TOKENS, adapter=a) for t in tokens for a in (0, 1)]
    results = gen.generate(reqs)
    try:
        peft_model.set_adapter("other")
        torch.testing.assert_close(clf.sample_probs(MIXED, 1, sigma=0.0)[:, 0],
                                   _peft_class_probs(peft_model, clf, MIXED), atol=1e-5, rtol=1e-4)
        others = [_peft_greedy(peft_model, t, gen.pad_id) for t in tokens]
    finally:
        peft_model.set_adapter("default")
    firsts = [_peft_greedy(peft_model, t, gen.pad_id) for t in tokens]
    assert [r.completion.token_ids for r in results] == [y for pair in zip(firsts, others, strict=True) for y in pair]
