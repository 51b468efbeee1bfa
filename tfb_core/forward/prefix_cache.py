"""Keys and values of a prompt prefix per posterior sample, kept for the next forwards: the one
store of the classifier, the generator and the generator's teacher-forced scoring.

A task's instruction, or a chat template's head, is the same tokens in every prompt: its keys and
values under the posterior samples of a forward are computed once, kept here (the last ``capacity``
entries, least recently used first out), and reused by every later forward with the same samples,
sigma and prefix tokens. The key is explicit and holds all of these; a draw is named by its
:attr:`NoiseDraw.key`, unique for the life of the process (never an ``id()``, which a later draw may
reuse). The classifier keeps one whole cache per set of samples
(``BayesianClassifier._last_hidden``: ``((adapter, samples, sigma), ...), S, prefix tokens``); the
generator keeps one entry per row, ``(adapter, sample, draw key, sigma, prefix tokens)``, and
concatenates the rows a decode needs (:meth:`~tfb_core.forward.generator.BayesianGenerator.prefix_cache_of`).

A forward extends and reorders the cache it is given (``reorder_cache`` and the suffix's
``update``), and a dynamic cache layer does both by building new tensors and rebinding
``keys``/``values``: the forward gets a new cache object over the same tensors (:func:`fork`), so
the kept entry stays as it was without a copy of its tensors.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

#: shared prefixes kept: one per set of posterior samples in use (the default draw, a few seeds)
PREFIX_CACHE_SIZE = 4


def _rebinds_only(layer: Any) -> bool:
    """Whether a cache layer only ever rebinds its tensors (never writes into them)."""
    from transformers.cache_utils import DynamicLayer

    quantized = type(layer).__name__.endswith("QuantizedLayer")
    return isinstance(layer, DynamicLayer) and not quantized and not hasattr(layer, "indexer_keys")


def fork(cache: Any) -> Any:
    """A cache object of its own over the same key/value tensors: what a forward may extend and
    reorder without touching ``cache``. Layers that write in place are copied whole instead."""
    layers = getattr(cache, "layers", None)
    if layers is None or not all(_rebinds_only(layer) for layer in layers):
        return copy.deepcopy(cache)
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in layers]  # new layer objects, shared tensors
    return out


class PrefixCache:
    """The last ``capacity`` prefixes' keys and values, least recently used first out.

    ``fork``: what :meth:`get` and :meth:`put` hand out and keep of a value (:func:`fork`: a cache
    object of its own over the same tensors, for a forward that extends it); None: the value itself
    (per-row tensors that no forward writes into)."""

    def __init__(self, capacity: int = PREFIX_CACHE_SIZE, fork: Callable[[Any], Any] | None = fork) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._fork = fork if fork is not None else (lambda value: value)
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Any | None:
        """A fork of the cache kept under ``key`` (the forward's own to extend), or None."""
        cache = self._items.get(key)
        if cache is None:
            return None
        self._items.move_to_end(key)
        return self._fork(cache)

    def put(self, key: Hashable, cache: Any) -> None:
        """Keep ``cache`` (as it is now: the caller may go on extending its own object)."""
        if self.capacity == 0:
            return
        self._items[key] = self._fork(cache)
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def keys(self) -> list[Hashable]:
        """The keys kept, least recently used first."""
        return list(self._items)

    def clear(self) -> None:
        self._items.clear()

    def drop(self, keep: Callable[[Hashable], bool]) -> int:
        """Drop every entry whose key ``keep`` refuses (e.g. an unloaded adapter's); returns how many."""
        gone = [k for k in self._items if not keep(k)]
        for k in gone:
            del self._items[k]
        return len(gone)
