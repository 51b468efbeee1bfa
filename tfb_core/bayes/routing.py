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

from tfb_core.bayes.lora import find_lora_modules, replace_module, unwrap_peft
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
        for lw in find_lora_modules(model, name):
            A2, B2, d = svd_reparam(lw.A, lw.B)
            dtype = lw.A.dtype if lw.A.dtype.is_floating_point else torch.float32
            layer = TFBLinear(lw.name, lw.base_layer, A2.to(lw.A.device), B2.to(lw.A.device), d, lw.scaling,
                              d_floor, dtype)
            per_layer.setdefault(lw.name, (lw.base_layer, {}))[1][a] = layer
            modules.append(layer)
            if inner.get_submodule(lw.name) is out_emb:
                head = layer
        posteriors.append(TFBPosterior(modules))
        heads.append(head)
    for name, (base, slots) in per_layer.items():  # after reading every adapter: peft's layers go now
        replace_module(inner, name, RoutedLinear(name, base, slots, routing))
    return inner, posteriors, heads, routing
