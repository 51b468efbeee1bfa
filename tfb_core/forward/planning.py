"""How to group inputs into forwards: pure arithmetic on token counts, no model.

A forward costs a fixed overhead (kernel launches, Python) plus its tokens, padding included; a
prefix that all its rows share (a task's instruction) runs once per posterior sample instead.
:func:`plan_chunks` cuts inputs into the cheapest forwards under a row and a token cap;
:func:`measure_forward_overhead` fits the overhead from timed forwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

#: Shorter common prefixes are not worth a separate forward.
MIN_SHARED_PREFIX = 8


def _common_prefix(rows: Sequence[list[int]]) -> int:
    """Length of the token prefix all rows share, leaving every row at least one token of its own."""
    first, shortest = rows[0], min(len(r) for r in rows)
    n = 0
    while n < shortest - 1 and all(r[n] == first[n] for r in rows):
        n += 1
    return n


def shared_prefix(token_lists: Sequence[Sequence[int]]) -> int:
    """Tokens all inputs share (0 if fewer than MIN_SHARED_PREFIX, or only one input)."""
    n = _common_prefix(token_lists) if len(token_lists) > 1 else 0
    return n if n >= MIN_SHARED_PREFIX else 0


def attention_window(config: Any) -> int | None:
    """The sliding attention window of a transformers model ``config``'s layers (None: every layer
    attends to the whole sequence).

    transformers counts a window in cache positions, padding included: a row padded in the middle
    (a shared prefix's keys and values, then the row's rest left-padded) would see fewer of its own
    tokens than it does alone once it is wider than the window. Left padding alone is exact."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


#: Default fixed cost of one forward, in prompt tokens (what a forward of this many more tokens costs):
#: measured about 30 for SmolLM2 on one CPU core, about 1000 for a Llama-3.1-8B shape on an H200,
#: where small forwards are bound by kernel launches (benchmarks/RESULTS.md).
FORWARD_OVERHEAD_TOKENS = {"cpu": 32, "other": 1024}
#: Default cap on the tokens one forward computes (rows x padded length past the shared prefix): on
#: a CPU, forwards past about a thousand tokens run slower per token (SmolLM2, one core: 4.1-4.8 ms
#: per token at 256-640 tokens, 5.0-5.1 at 2048-5120); a GPU has no such knee below its row limit.
MAX_BATCH_TOKENS: dict[str, float | None] = {"cpu": 1024, "other": None}


def plan_chunks(token_lists: Sequence[Sequence[int]], rows: Sequence[int], max_rows: int,
                overhead_tokens: float, keys: Sequence[Any] | None = None,
                max_tokens: float | None = None) -> list[list[int]]:
    """Group inputs into forwards of at most ``max_rows`` rows (and ``max_tokens`` tokens past the
    shared prefix, padding included), as cheaply as padding allows.

    Input i has ``rows[i]`` rows (its samples) and is padded to the longest input of its forward.
    Inputs are ordered by (key, length) and cut into consecutive chunks that minimise

        sum over forwards of  overhead_tokens + rows * longest  - rows * common prefix (one key)

    (dynamic programming, O(n * inputs per forward)). A forward whose inputs all have one key (one
    noise draw and N) runs only their suffixes: the common prefix (a task's instruction) runs once
    per posterior sample and is reused by every forward (:meth:`BayesianClassifier.run_jobs`). A
    small overhead (CPU) buckets inputs by length; a large one (GPU) packs as many rows as allowed.
    An input over either limit gets a forward of its own. Returns lists of indices.
    """
    n = len(token_lists)
    if n == 0:
        return []
    key_of = [0] * n if keys is None else list(keys)
    order = sorted(range(n), key=lambda i: (str(key_of[i]), len(token_lists[i])))
    prefix = shared_prefix(token_lists)
    inf = float("inf")
    best = [0.0] + [inf] * n  # best[j]: cheapest plan of the first j inputs (in order)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        last = order[j - 1]
        longest = len(token_lists[last])  # the longest of any chunk ending at j (sorted per key)
        total = 0
        one_key = True
        for i in range(j - 1, -1, -1):  # chunk order[i:j], growing to the left
            item = order[i]
            total += rows[item]
            if total > max_rows and i < j - 1:
                break
            one_key = one_key and key_of[item] == key_of[last]
            longest = max(longest, len(token_lists[item]))
            tokens = total * (longest - (prefix if one_key else 0))  # grows as the chunk grows
            if max_tokens is not None and tokens > max_tokens and i < j - 1:
                break
            cost = overhead_tokens + tokens
            if best[i] + cost <= best[j]:  # ties: the bigger chunk (fewer forwards)
                best[j] = best[i] + cost
                cut[j] = i
    chunks: list[list[int]] = []
    j = n
    while j > 0:
        chunks.append(order[cut[j]:j])
        j = cut[j]
    return chunks[::-1]


def measure_forward_overhead(run: Callable[[int], Any], per_input: float, copies: int,
                             repeats: int = 2) -> float | None:
    """Fixed cost of a forward in tokens, from the time of ``run(1)`` and ``run(copies)`` (best of
    ``repeats``): forwards of 1 and ``copies`` inputs of ``per_input`` tokens each (as the planner
    counts them). ``run`` must end synchronised (e.g. with a copy to the host). None when the
    timings do not resolve it (``copies`` < 2, or the bigger forward was not slower)."""
    if copies < 2:
        return None

    def best(count: int) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(count)
            times.append(time.perf_counter() - t0)
        return min(times)

    one, many = best(1), best(copies)
    slope = (many - one) / ((copies - 1) * per_input)  # seconds per token
    if slope <= 0:
        return None
    return max(0.0, one / slope - per_input)
