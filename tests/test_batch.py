"""tfb_core.serving.batch: many callers' requests in shared forwards, each answered as if alone."""

from __future__ import annotations

import pytest
import torch
from conftest import LABELS

from tfb_core.data.tasks import TaskError
from tfb_core.forward.classifier import PromptTooLongError
from tfb_core.serving.batch import BatchRequest
from tfb_core.serving.config import EngineConfig
from tfb_core.serving.response import predict
from tfb_core.serving.startup import load_engine

PROMPTS = ["a great film with a wonderful cast", "a dull and tedious mess of a movie",
           "the plot is thin but the acting is superb", "I would not watch it again"]


@pytest.fixture(scope="module")
def engine(model_cfg):
    from dataclasses import replace

    return load_engine(EngineConfig(model=replace(model_cfg, max_length=24), labels=tuple(LABELS), sigma=0.2),
                          progress=False)


def test_each_request_is_answered_as_if_alone_and_errors_stay_with_their_request(engine):
    long_prompt = " ".join(["word"] * 40)
    requests = [BatchRequest(PROMPTS[:2], 4, 0), BatchRequest(PROMPTS[1:4], 6, 7),
                BatchRequest([PROMPTS[0], long_prompt], 4, 0), BatchRequest(PROMPTS[2:3], 3, 1, ("yes", "no")),
                BatchRequest(PROMPTS[:1], 4, 0, ("yes", "not one token at all")), BatchRequest(PROMPTS[3:], 2, 2**50)]
    forwards = []
    got = engine.run_batch(requests, max_rows=32, on_forward=lambda i, r, s: forwards.append((i, r)))
    assert isinstance(got[2], PromptTooLongError) and isinstance(got[4], TaskError)
    for req, res in zip(requests, got, strict=True):
        if isinstance(res, Exception):
            continue
        alone = engine.run_batch([req], max_rows=32)[0]
        assert res.shape == (len(req.prompts), req.n_samples, 2)
        torch.testing.assert_close(res, alone, atol=1e-5, rtol=1e-4)
        if req.labels is None:  # and as response.predict answers it
            want = predict(engine, list(req.prompts), n_samples=req.n_samples, seed=req.seed, return_samples=True)
            torch.testing.assert_close(res, torch.tensor([p["samples"] for p in want["predictions"]]),
                                       atol=1e-5, rtol=1e-4)
    # every input that could run ran once, in forwards within the row limit
    assert sum(i for i, _ in forwards) == 2 + 3 + 1 + 1 and all(r <= 32 for _, r in forwards)


def test_rows_are_n_per_input_or_one_at_sigma_zero(engine, model_cfg):
    assert engine.rows(3, 5) == 15
    mean = load_engine(EngineConfig(model=model_cfg, labels=tuple(LABELS), sigma=0.0), progress=False)
    assert mean.rows(3, 5) == 3


def test_a_cancelled_request_is_skipped_before_its_next_forward_and_the_others_are_answered(engine):
    from tfb_core.serving.batch import RequestCancelled

    forwards: list[int] = []
    gone = {"flag": False}

    def on_forward(inputs, rows, seconds):
        forwards.append(inputs)
        gone["flag"] = True  # the caller of request 0 leaves after the first forward

    # max_rows = 4 rows, N = 4: one input per forward, so request 0's second input comes later
    requests = [BatchRequest(PROMPTS[:2], 4, 0, cancelled=lambda: gone["flag"]), BatchRequest(PROMPTS[2:3], 4, 5)]
    got = engine.run_batch(requests, max_rows=4, on_forward=on_forward)
    torch.testing.assert_close(got[1], engine.run_batch([requests[1]], max_rows=4)[0], atol=1e-5, rtol=1e-4)
    assert isinstance(got[0], RequestCancelled)
    assert sum(forwards) < 3  # at least one of request 0's inputs never ran


def test_token_ids_raw_texts_and_keep_last_share_a_batch(engine):
    """Prompts as token ids answer as the texts they tokenize; a RawText is tokenized without the
    special tokens; keep_last reads only each prompt's last K tokens (a long prompt then fits), and
    they all share forwards with plain texts, each as if alone."""
    from tfb_core.forward.classifier import RawText

    ids = engine.tokenize(PROMPTS[:2])
    bare = [t for t in engine.classifier.tokenizer(PROMPTS[:2], add_special_tokens=False)["input_ids"]]
    assert engine.tokenize([RawText(p) for p in PROMPTS[:2]]) == bare
    assert engine.tokenize([PROMPTS[0], ids[1]], keep_last=3) == [ids[0][-3:], ids[1][-3:]]
    long_prompt = " ".join(["word"] * 40)
    assert len(engine.tokenize([long_prompt], keep_last=24)[0]) == 24
    requests = [BatchRequest(PROMPTS[:2], 4, 0), BatchRequest(ids, 4, 0),
                BatchRequest([ids[0][-3:], PROMPTS[1]], 4, 0), BatchRequest(PROMPTS[:2], 4, 0, keep_last=3),
                BatchRequest([long_prompt], 4, 0, keep_last=24)]
    got = engine.run_batch(requests, max_rows=64)
    assert not any(isinstance(g, Exception) for g in got), got
    torch.testing.assert_close(got[1], got[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[3][0], got[2][0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got[3][0], got[0][0], atol=1e-4)
    for req, res in zip(requests, got, strict=True):
        torch.testing.assert_close(res, engine.run_batch([req], max_rows=64)[0], atol=1e-5, rtol=1e-4)
