"""The SVD re-parameterisation and the posterior: B'A' = BA, std sigma/d_i, sigma = 0 is the plain LoRA."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, LABELS

from tfb_core.config import ModelConfig
from tfb_core.loading import load_adapter, load_base_model, load_classifier
from tfb_core.lora import find_lora_modules
from tfb_core.posterior import sample_seed, svd_reparam

PROMPTS = ["a great film with a wonderful cast", "a dull mess", "I would not watch it again Answer:"]


def peft_reference(cfg: ModelConfig, prompts, labels=LABELS) -> torch.Tensor:
    """Class probabilities of the untouched peft model, one unpadded prompt at a time: (B, C)."""
    tok, model = load_base_model(cfg)
    peft_model = load_adapter(model, cfg)
    ids = [tok(label, add_special_tokens=False)["input_ids"][0] for label in labels]
    out = []
    with torch.no_grad():
        for p in prompts:
            enc = tok(p, return_tensors="pt").to(cfg.device)
            out.append(torch.softmax(peft_model(**enc).logits[0, -1, ids].float(), -1))
    return torch.stack(out).cpu()


def test_svd_reparam_keeps_delta_w_and_orders_d():
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 16, generator=gen), torch.randn(24, 4, generator=gen)
    A2, B2, d = svd_reparam(A, B)
    torch.testing.assert_close(B2 @ A2, B @ A, atol=1e-5, rtol=1e-5)
    assert torch.all(d[:-1] >= d[1:]) and torch.all(d > 0)
    torch.testing.assert_close(B2.norm(dim=0), d)  # columns of B' = U diag(d) have norm d_i


def test_every_module_keeps_ba_and_std_is_sigma_over_d(model_cfg):
    tok, model = load_base_model(model_cfg)
    peft_model = load_adapter(model, model_cfg)
    before = {lw.name: (lw.B @ lw.A).clone() for lw in find_lora_modules(peft_model)}
    assert any(n.endswith("lm_head") for n in before) and any("q_proj" in n for n in before)
    from tfb_core.sampling import BayesianClassifier

    clf = BayesianClassifier.from_peft(peft_model, tok, LABELS)
    assert {m.name for m in clf.posterior.modules} == set(before)
    for m, std in zip(clf.posterior.modules, clf.posterior.std(0.01), strict=True):
        torch.testing.assert_close(m.lora_B @ m.lora_A, before[m.name], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(std, 0.01 / m.d)
    # the empirical std of the rows of A' around the mean is sigma / d_i
    draw = clf.posterior.draw(seed=3, n_samples=4000)
    clf.posterior.set_noise(0.02, draw.z)
    for m in clf.posterior.modules:
        torch.testing.assert_close(m.delta.std(dim=(0, 2)), 0.02 / m.d, rtol=0.05, atol=0)
        torch.testing.assert_close(m.delta.mean(dim=(0, 2)), torch.zeros_like(m.d), atol=0.2 * float(0.02 / m.d.min()), rtol=0)
    clf.posterior.clear_noise()
    assert all(m.delta is None for m in clf.posterior.modules)


@pytest.mark.parametrize("adapter_key", ["adapter", "adapter_qv"])
def test_sigma_zero_reproduces_the_peft_model(tiny, adapter_key):
    cfg = ModelConfig(model=tiny["model"], adapter=tiny[adapter_key], device=DEVICE)
    ref = peft_reference(cfg, PROMPTS)
    clf = load_classifier(cfg, LABELS)
    ours = clf.sample_probs(PROMPTS, n_samples=3, sigma=0.0)  # (B, N, C), batched with left padding
    for n in range(3):
        torch.testing.assert_close(ours[:, n], ref, atol=1e-5, rtol=1e-4)
    # a noisy forward with zero noise is the same computation
    draw = clf.posterior.draw(0, 2)
    zero = type(draw)(0, [torch.zeros_like(z) for z in draw.z])
    torch.testing.assert_close(clf.sample_probs(PROMPTS, 2, sigma=0.5, noise=zero)[:, 0], ref, atol=1e-5, rtol=1e-4)


def test_sample_seeds_are_distinct_and_validated():
    seen = {sample_seed(s, n) for s in range(50) for n in range(50)}
    assert len(seen) == 2500
    with pytest.raises(ValueError, match="sample index"):
        sample_seed(0, 2**20)
