"""The SVD re-parameterisation and the posterior: B'A' = BA, std sigma/d_i, sigma = 0 is the plain LoRA."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, LABELS

from tfb_core.bayes.lora import find_lora_modules
from tfb_core.bayes.posterior import sample_seed, svd_reparam
from tfb_core.config import ModelConfig
from tfb_core.data.loading import load_adapter, load_base_model
from tfb_core.serving.startup import load_classifier

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
    loras = find_lora_modules(peft_model)
    before = {lw.name: (lw.B @ lw.A).clone() for lw in loras}
    before_B = {lw.name: lw.B.detach().clone() for lw in loras}
    assert any(n.endswith("lm_head") for n in before) and any("q_proj" in n for n in before)
    from tfb_core.forward.classifier import BayesianClassifier

    clf = BayesianClassifier.from_peft(peft_model, tok, LABELS)
    assert {m.name for m in clf.posterior.modules} == set(before)
    for m in clf.posterior.modules:
        torch.testing.assert_close(m.lora_B @ m.lora_A, before[m.name], atol=1e-5, rtol=1e-4)
    # The A' each row of a forward uses, recovered through the forward's own path (shrink) from
    # identity inputs: row n, x = I (in x in) gives x A'_n^T = A'_n^T. Its std over samples, per row
    # i of A', is sigma / d_i (d from an independent SVD of B), and its mean is the posterior mean.
    n, sigma = 4000, 0.02
    draw = clf.posterior.draw(seed=3, n_samples=n)
    clf.posterior.set_noise(sigma, draw.z)
    try:
        for m in clf.posterior.modules:
            d = torch.linalg.svdvals(before_B[m.name].float())  # (r,)
            eye = torch.eye(m.lora_A.shape[1]).expand(n, -1, -1)  # (N, in, in)
            samples = m.shrink(eye).transpose(1, 2)  # (N, r, in): A' of each row
            dev = samples - m.lora_A  # (N, r, in)
            torch.testing.assert_close(dev.std(dim=(0, 2)), sigma / d, rtol=0.05, atol=0)
            torch.testing.assert_close(dev.mean(dim=(0, 2)), torch.zeros_like(d), atol=0.2 * float(sigma / d.min()), rtol=0)
    finally:
        clf.posterior.clear_noise()
    # the posterior mean again once the noise is cleared
    m = clf.posterior.modules[0]
    torch.testing.assert_close(m.shrink(torch.eye(m.lora_A.shape[1])[None]).transpose(1, 2)[0], m.lora_A)


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
    with pytest.raises(ValueError, match="seed"):
        sample_seed(2**64, 0)


# seeds that a 43-bit wrap-around (or any truncation to fewer than 64 bits) would merge with another
BIG_SEEDS = [0, 1, 2**43 - 1, 2**43, 2**43 + 1, 2**44, 2**62, 2**63 - 1, 2**63 - 1 - 2**43]


def test_every_accepted_seed_has_its_own_samples(model_cfg):
    """Any two seeds the API accepts (0 .. 2**63 - 1) give different noise for every sample."""
    clf = load_classifier(model_cfg, LABELS)
    first = {}
    for seed in BIG_SEEDS:
        draw = clf.posterior.draw(seed, 3)
        first[seed] = [draw.z[0][n, 0, :8].clone() for n in range(3)]
    for i, a in enumerate(BIG_SEEDS):
        for b in BIG_SEEDS[i + 1:]:
            for n in range(3):
                assert not torch.equal(first[a][n], first[b][n]), (a, b, n)
    gens = {sample_seed(s, n) for s in BIG_SEEDS for n in range(64)}
    assert len(gens) == len(BIG_SEEDS) * 64 and all(0 <= g < 2**64 for g in gens)
    # seeds below 2**43 keep the streams they always had
    assert sample_seed(5, 3) == (5 << 20) | 3
