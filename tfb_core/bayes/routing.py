"""Many adapters over one base model, in one forward.

Every LoRA-wrapped layer of the model becomes one :class:`RoutedLinear`: the base layer runs once on
all rows, then each adapter's :class:`~tfb_core.bayes.posterior.TFBLinear` adds its delta to its own
rows. :class:`Routing`, shared by all these layers, says which rows use which adapter; it is set
once per forward, like the noise, so the decoder's code runs unchanged. :func:`bayesianize_many`
builds this from a peft model (one adapter: :func:`bayesianize`).
"""

from __future__ import annotations

import torch
from torch import nn

from tfb_core.bayes.lora import (
    LoRAWeights,
    find_lora_modules,
    layer_shape,
    lora_sha256,
    replace_module,
    unwrap_peft,
)
from tfb_core.bayes.posterior import TFBLinear, TFBPosterior, base_rows, svd_reparam


class Routing:
    """Which adapter each row of a forward uses, for every :class:`RoutedLinear` of one model.

    ``segments``: (adapter, start, stop) for consecutive rows, each adapter at most once, in row
    order; ``None``: every row uses adapter 0 (one adapter served). Set once per forward, like the
    noise, so that the decoder's code runs unchanged.
    """

    __slots__ = ("segments",)

    def __init__(self) -> None:
        self.segments: list[tuple[int, int, int]] | None = None


class RoutedLinear(nn.Module):
    """A linear layer with the TFB LoRA of several adapters: rows of adapter a get a's LoRA.

    The base layer runs once on all rows; each adapter's segment of rows then adds its own
    s * B' (A'_row x) (a segmented matmul: the idea of punica's SGMV, with plain torch ops), so
    rows of many adapters and their samples share the base model's forward. An adapter without
    LoRA on this layer leaves its rows to the base layer.
    """

    def __init__(self, name: str, base: nn.Module, slots: dict[int, TFBLinear], routing: Routing) -> None:
        super().__init__()
        self.name = name
        self.base_layer = base
        # plain dict, not submodules: each slot holds base_layer too, and nothing here is trained or saved
        self.slots = slots
        self.routing = routing

    def _segments(self, n_rows: int) -> list[tuple[int, int, int]]:
        segments = self.routing.segments
        if segments is None:
            return [(0, 0, n_rows)]
        if segments[-1][2] != n_rows:
            raise RuntimeError(f"{self.name}: routing for {segments[-1][2]} rows, batch has {n_rows}")
        return segments

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (R, T, out)
        segments = self._segments(x.shape[0])
        if len(segments) == 1:
            slot = self.slots.get(segments[0][0])
            return y if slot is None else slot.add_delta(y, x)
        for a, start, stop in segments:
            slot = self.slots.get(a)
            if slot is not None:  # rows [start, stop) of a contiguous y: a contiguous view, updated in place
                part = slot.add_delta(y[start:stop], x[start:stop])
                if part.data_ptr() != y[start:stop].data_ptr():
                    y[start:stop] = part
        return y

    def rows(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Only the output features ``ids``, x (R, in) -> (R, len(ids)), each row with its adapter's LoRA."""
        y = base_rows(self.base_layer, x, ids)  # (R, C)
        parts = []
        for a, start, stop in self._segments(x.shape[0]):
            slot = self.slots.get(a)
            parts.append(y[start:stop] if slot is None else slot.add_delta_rows(y[start:stop], x[start:stop], ids))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def output_rows(layer: nn.Module, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Only the output features ``ids`` of a layer of a Bayesianized model, x (R, in) -> (R, len(ids)):
    with each row's adapter's LoRA where the layer carries any (:meth:`RoutedLinear.rows`), else the
    base layer's alone. For ``lm_head``: the class-token rows of W and of B' are all a classifier needs."""
    if isinstance(layer, RoutedLinear):
        return layer.rows(x, ids)
    return base_rows(layer, x, ids)


def bayesianize(model: nn.Module, d_floor: float = 1e-6) -> tuple[nn.Module, TFBPosterior, TFBLinear | None]:
    """Re-parameterise every LoRA module of a peft model (its one active adapter) in place and return

    (the transformers model that now holds :class:`RoutedLinear` layers, the posterior, the
    ``lm_head`` layer if it carries LoRA, else ``None``). B'A' = BA, so at sigma = 0 nothing changes.
    """
    inner, posteriors, heads, _ = bayesianize_many(model, [None], d_floor)
    return inner, posteriors[0], heads[0]


def bayesianize_many(model: nn.Module, adapters: list[str | None], d_floor: float = 1e-6
                     ) -> tuple[nn.Module, list[TFBPosterior], list[TFBLinear | None], Routing]:
    """Bayesianize several peft adapters of one model (peft names; None: the one active adapter).

    Every LoRA-wrapped layer becomes one :class:`RoutedLinear` over the base layer with each
    adapter's :class:`TFBLinear` (adapter i = its position in ``adapters``); returns the inner
    transformers model, the posterior of each adapter, each adapter's ``lm_head`` layer (or None),
    and the :class:`Routing` that every forward sets to say which rows use which adapter.
    """
    inner = unwrap_peft(model)
    out_emb = inner.get_output_embeddings()
    routing = Routing()
    per_layer: dict[str, tuple[nn.Module, dict[int, TFBLinear]]] = {}
    posteriors: list[TFBPosterior] = []
    heads: list[TFBLinear | None] = []
    for a, name in enumerate(adapters):
        modules: list[TFBLinear] = []
        head: TFBLinear | None = None
        loras = find_lora_modules(model, name)
        for lw in loras:
            layer = _tfb_layer(lw, lw.base_layer, d_floor)
            per_layer.setdefault(lw.name, (lw.base_layer, {}))[1][a] = layer
            modules.append(layer)
            if inner.get_submodule(lw.name) is out_emb:
                head = layer
        posteriors.append(TFBPosterior(modules, lora_sha256(loras)))
        heads.append(head)
    for name, (base, slots) in per_layer.items():  # after reading every adapter: peft's layers go now
        replace_module(inner, name, RoutedLinear(name, base, slots, routing))
    return inner, posteriors, heads, routing


def _tfb_layer(lw: LoRAWeights, base: nn.Module, d_floor: float) -> TFBLinear:
    """The TFB form of one LoRA module over ``base``, on the base layer's device (B'A' = BA)."""
    A2, B2, d = svd_reparam(lw.A, lw.B)
    dtype = lw.A.dtype if lw.A.dtype.is_floating_point else torch.float32
    weight = getattr(base, "weight", None)
    device = lw.A.device if weight is None or weight.device.type == "meta" else weight.device
    return TFBLinear(lw.name, base, A2.to(device), B2.to(device), d.to(device), lw.scaling, d_floor, dtype)


def fit_adapter(inner: nn.Module, loras: list[LoRAWeights], d_floor: float = 1e-6
                ) -> tuple[TFBPosterior, TFBLinear | None]:
    """One more adapter for a Bayesianized model, not yet in its forwards: (its posterior, its
    ``lm_head`` layer or None), each TFB layer over the served model's own base layer of the same
    dotted name (``loras`` read elsewhere, e.g. by :func:`~tfb_core.bayes.lora.read_lora` on a
    skeleton). ``ValueError`` naming a module the model does not have or a shape that does not fit;
    the model is not changed (:func:`add_adapter` puts it in)."""
    out_emb = inner.get_output_embeddings()
    modules: list[TFBLinear] = []
    head: TFBLinear | None = None
    for lw in loras:
        try:
            layer = inner.get_submodule(lw.name)
        except AttributeError:
            raise ValueError(f"{lw.name}: the base model has no such module") from None
        base = layer.base_layer if isinstance(layer, RoutedLinear) else layer
        want = layer_shape(base)
        if want is None:
            raise ValueError(f"{lw.name}: LoRA on a {type(base).__name__}, only linear layers (nn.Linear, "
                             "Conv1D) are supported")
        got = (lw.B.shape[0], lw.A.shape[1])
        if got != want:
            raise ValueError(f"{lw.name}: the adapter is (out, in) = {got}, the base model's layer {want}")
        modules.append(_tfb_layer(lw, base, d_floor))
        if layer is out_emb:
            head = modules[-1]
    return TFBPosterior(modules, lora_sha256(loras)), head


def add_adapter(inner: nn.Module, posterior: TFBPosterior, index: int, routing: Routing) -> None:
    """Put a :func:`fit_adapter` posterior into the model's forwards as adapter ``index`` (a new,
    never used index: those of served adapters do not move): a slot on each of its layers'
    :class:`RoutedLinear`, a layer no adapter had LoRA on wrapped in a new one."""
    for layer in posterior.modules:
        current = inner.get_submodule(layer.name)
        if isinstance(current, RoutedLinear):
            if index in current.slots:
                raise ValueError(f"{layer.name}: adapter index {index} is taken")
            current.slots[index] = layer
        else:
            replace_module(inner, layer.name, RoutedLinear(layer.name, current, {index: layer}, routing))


def remove_adapter(inner: nn.Module, index: int) -> int:
    """Take adapter ``index`` out of the model: its slots are deleted (its tensors go with the last
    reference to its posterior), and a layer left with no adapter is the plain base layer again.
    Returns the number of layers it was on."""
    found = 0
    for name, module in list(inner.named_modules()):
        if isinstance(module, RoutedLinear) and index in module.slots:
            del module.slots[index]
            found += 1
            if not module.slots:
                replace_module(inner, name, module.base_layer)
    return found
