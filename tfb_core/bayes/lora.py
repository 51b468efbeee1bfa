"""The only file that knows peft's internals: find the LoRA modules, read A, B and the scaling.

peft keeps, per LoRA-wrapped ``nn.Linear``, ``lora_A[name]`` (r x in), ``lora_B[name]`` (out x r),
``scaling[name]`` (alpha / r) and the frozen ``base_layer``. We read these once and hand them to
:mod:`tfb_core.bayes.posterior`; after that the model no longer runs through peft's code.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class LoRAWeights:
    """One LoRA module as peft stores it: y = base(x) + scaling * B (A x)."""

    name: str  # dotted path inside the transformers model, e.g. "model.layers.0.self_attn.q_proj"
    base_layer: nn.Module
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scaling: float


def _lora_layer_type() -> type:
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (the model itself if it is not one)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.get_base_model()
    return model


def find_lora_modules(model: nn.Module, adapter: str | None = None) -> list[LoRAWeights]:
    """Every LoRA-wrapped linear layer (``nn.Linear``, GPT-2's ``Conv1D``) of a (peft-wrapped) model, in module order.

    ``adapter``: the peft adapter name to read (a model may hold several, each read on its own);
    None: the active one, which must be exactly one. Raises ``ValueError`` if there is none, or a
    feature TFB does not model (DoRA, LoRA on a layer other than ``nn.Linear``, a bias on B). LoRA
    dropout is ignored: it is inactive at inference.
    """
    lora_layer = _lora_layer_type()
    inner = unwrap_peft(model)
    found: list[LoRAWeights] = []
    for name, module in inner.named_modules():
        if not isinstance(module, lora_layer):
            continue
        adapters = list(module.lora_A.keys())
        if not adapters:
            continue
        if adapter is None:
            active = module.active_adapters
            if len(active) != 1:
                raise ValueError(f"{name}: exactly one active adapter is served, found {active}")
            key = active[0]
        elif adapter in adapters:
            key = adapter
        else:
            continue  # another adapter's layer
        if getattr(module, "use_dora", {}).get(key, False):
            raise ValueError(f"{name}: DoRA adapters are not supported by TFB")
        lin_a, lin_b = module.lora_A[key], module.lora_B[key]
        if not isinstance(lin_a, nn.Linear) or not isinstance(lin_b, nn.Linear):
            raise ValueError(f"{name}: only LoRA on nn.Linear layers is supported, got {type(lin_a).__name__}")
        if lin_b.bias is not None:
            raise ValueError(f"{name}: LoRA with a bias on B is not supported")
        found.append(
            LoRAWeights(
                name=name,
                base_layer=module.get_base_layer(),
                A=lin_a.weight.detach(),
                B=lin_b.weight.detach(),
                scaling=float(module.scaling[key]),
            )
        )
    if not found:
        which = "" if adapter is None else f" of adapter {adapter!r}"
        raise ValueError(f"the model has no LoRA modules{which}: is the adapter loaded?")
    return found


def layer_shape(layer: nn.Module) -> tuple[int, int] | None:
    """(out, in) features of a layer peft's LoRA wraps as a linear layer: ``nn.Linear``, or
    transformers' ``Conv1D`` (GPT-2's: weight (in, out), which peft wraps with fan_in_fan_out; its
    LoRA's A and B are nn.Linear all the same, so nothing else here differs). None: another kind."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(layer, Conv1D):
        return layer.nf, layer.nx
    if isinstance(layer, nn.Linear) or hasattr(layer, "in_features"):  # any layer that names them as nn.Linear
        return layer.out_features, layer.in_features
    return None


def replace_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    """Put ``new`` at ``root.<dotted>``."""
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def read_lora(skeleton: nn.Module, folder: str, adapter_name: str, device: torch.device | str = "cpu"
              ) -> list[LoRAWeights]:
    """The LoRA modules of the peft adapter in ``folder``, read by peft onto ``skeleton``: the base
    model's structure on the meta device (no weights), so that an adapter can be read while the
    served model, whose LoRA layers are Bayesianized already, keeps serving.

    peft wraps the skeleton's target layers; only the LoRA tensors are made real (on ``device``)
    before the state dict is copied in, so nothing of the base model is allocated. Each result's
    ``base_layer`` is the skeleton's (meta): map it to the served model's by ``name``. Raises
    ``ValueError`` naming the problem: a config peft cannot read, a module the base model does not
    have, a tensor of the wrong shape, a LoRA tensor missing from the weights file."""
    from peft import PeftConfig, get_peft_model, load_peft_weights, set_peft_model_state_dict

    config = PeftConfig.from_pretrained(folder)
    config.inference_mode = True
    try:
        peft_model = get_peft_model(skeleton, config, adapter_name=adapter_name, low_cpu_mem_usage=True)
    except ValueError as exc:  # e.g. target modules the base model does not have
        raise ValueError(f"the adapter does not fit the base model: {exc}") from exc
    lora_layer = _lora_layer_type()
    for module in peft_model.modules():
        if isinstance(module, lora_layer) and adapter_name in module.lora_A:
            module.lora_A[adapter_name].to_empty(device=device)  # uninitialised until the copy below
            module.lora_B[adapter_name].to_empty(device=device)
    state = load_peft_weights(folder, device=str(device))
    try:
        result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name)
    except RuntimeError as exc:  # size mismatch: made for another base model
        raise ValueError(f"the adapter's tensors do not fit the base model: {exc}"[:800]) from exc
    missing = [k for k in result.missing_keys if ".lora_A." in k or ".lora_B." in k]
    if missing:
        raise ValueError(f"the weights file lacks {len(missing)} LoRA tensors, e.g. {missing[0]}")
    return find_lora_modules(peft_model, adapter_name)


def lora_sha256(loras: Sequence[LoRAWeights]) -> str:
    """SHA-256 of an adapter as peft holds it (each module's name, scaling, A and B: shape, dtype,
    bytes): what identifies it for a cache, however and wherever it was loaded. Not of A', B': the
    SVD's float rounding varies with the threads and the machine, the adapter does not."""
    h = hashlib.sha256()
    for lw in loras:
        h.update(f"{lw.name}:{lw.scaling!r}".encode())
        for t in (lw.A, lw.B):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
