"""scripts/train_generative.py's shared-prefix computations equal the plain ones, on the tiny model.

The script trains and evaluates with the prompts' common prefix computed once and its key/value
cache repeated over the batch (padding after the prefix, explicit positions); a wrong label shift,
position or mask would train on the wrong tokens or decode other answers. Here both are compared
with a full forward per sequence and with transformers' own greedy ``generate``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_generative.py"


@pytest.fixture(scope="module")
def tg():
    spec = importlib.util.spec_from_file_location("train_generative", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def peft_model(tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)
    return PeftModel.from_pretrained(base, tiny["adapter_qv"]).eval()  # LoRA on q and v: v changes the prefix


def sequences(seed: int, n: int, prefix_len: int, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab, (prefix_len,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, vocab, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    answers = [torch.randint(3, vocab, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist() + [1]
               for _ in range(n)]
    return prompts, answers


def test_common_prefix(tg):
    assert tg.common_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == [1, 2]
    assert tg.common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == [1, 2]  # every row keeps at least one token
    assert tg.common_prefix([[7, 8]]) == [7]


def test_shared_prefix_loss_equals_full_loss(tg, peft_model):
    vocab = peft_model.config.vocab_size
    prompts, answers = sequences(0, 6, 7, vocab)
    prefix = tg.common_prefix(prompts)
    assert len(prefix) >= 7
    with torch.no_grad():
        fast = tg.answer_loss(peft_model, tg.prefix_kv(peft_model, prefix, "cpu"),
                              [p[len(prefix):] for p in prompts], answers, "cpu")
        total, count = 0.0, 0
        for p, a in zip(prompts, answers, strict=True):
            logits = peft_model(input_ids=torch.tensor([p + a])).logits[0, len(p) - 1:-1]
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(a), reduction="sum"))
            count += len(a)
    assert float(fast) == pytest.approx(total / count, rel=1e-5)


def test_shared_prefix_loss_has_gradients_through_the_prefix(tg, peft_model):
    vocab = peft_model.config.vocab_size
    prompts, answers = sequences(1, 3, 5, vocab)
    prefix = tg.common_prefix(prompts)
    peft_model.zero_grad()
    for name, p in peft_model.named_parameters():
        p.requires_grad_("lora_" in name)
    kv = tg.prefix_kv(peft_model, prefix, "cpu")
    assert kv[0][1].requires_grad  # values of the prefix depend on the v_proj LoRA
    tg.answer_loss(peft_model, kv, [p[len(prefix):] for p in prompts], answers, "cpu").backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    peft_model.zero_grad()


def test_shared_prefix_greedy_equals_generate(tg, peft_model):
    vocab = peft_model.config.vocab_size
    prompts, _ = sequences(2, 5, 6, vocab)
    prefix = tg.common_prefix(prompts)
    with torch.no_grad():
        fast = tg.greedy(peft_model, tg.prefix_kv(peft_model, prefix, "cpu"), [p[len(prefix):] for p in prompts], 6,
                         1, "cpu")
        for p, out in zip(prompts, fast, strict=True):
            ref = peft_model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                      max_new_tokens=6, do_sample=False, eos_token_id=1, pad_token_id=2)[0, len(p):].tolist()
            ref = ref[:ref.index(1)] if 1 in ref else ref
            assert out == ref
