"""The kept prefix caches: reused without a copy of their tensors, and never changed by a forward."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from tfb_core.forward.prefix_cache import PrefixCache, fork


def _cache(layers: int = 2, rows: int = 3, seed: int = 0) -> DynamicCache:
    gen = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for i in range(layers):
        cache.update(torch.randn(rows, 2, 5, 4, generator=gen), torch.randn(rows, 2, 5, 4, generator=gen), i)
    return cache  # (rows, heads, P, d) per layer


def _snapshot(cache):
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def test_a_reused_entry_shares_its_tensors_and_a_forward_cannot_change_it():
    kept = PrefixCache(capacity=2)
    original = _cache()
    kept.put("k", original)
    before = _snapshot(original)
    got = kept.get("k")
    entry = kept._items["k"]
    # no copy of any key or value tensor: the forward starts from the very same memory
    for g, e in zip(got.layers, entry.layers, strict=True):
        assert g.keys.data_ptr() == e.keys.data_ptr() and g.values.data_ptr() == e.values.data_ptr()
    # what a forward does with it: rows to samples, then the suffix's keys and values appended
    got.reorder_cache(torch.tensor([0, 0, 1, 2, 2]))
    for i in range(len(got.layers)):
        got.update(torch.ones(5, 2, 3, 4), torch.ones(5, 2, 3, 4), i)
    assert got.layers[0].keys.shape == (5, 2, 8, 4)
    again = kept.get("k")  # the kept entry is as it was put
    for (k, v), layer in zip(before, again.layers, strict=True):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    # and the caller's own object, extended after put, does not reach the entry either
    original.reorder_cache(torch.tensor([2, 1, 0]))
    for (k, _), layer in zip(before, kept.get("k").layers, strict=True):
        assert torch.equal(layer.keys, k)


def test_least_recently_used_out_and_clear():
    kept = PrefixCache(capacity=2)
    kept.put("a", _cache(seed=1))
    kept.put("b", _cache(seed=2))
    assert kept.get("a") is not None  # a is now the most recent
    kept.put("c", _cache(seed=3))
    assert kept.get("b") is None and kept.get("a") is not None and kept.get("c") is not None
    kept.clear()
    assert len(kept) == 0 and kept.get("a") is None
    PrefixCache(capacity=0).put("x", _cache())  # keeps nothing
    with pytest.raises(ValueError, match="capacity"):
        PrefixCache(capacity=-1)


def test_fork_copies_layers_that_write_in_place():
    class InPlace:  # not a dynamic layer: forks must not share its tensors
        def __init__(self):
            self.keys = torch.zeros(2, 2)

    cache = DynamicCache()
    cache.layers = [InPlace()]
    forked = fork(cache)
    assert forked.layers[0].keys.data_ptr() != cache.layers[0].keys.data_ptr()
