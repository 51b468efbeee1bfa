"""Hostile and careless clients (issue 13): inputs that cannot be classified, body parsing, content
types, API docs under a key, clients that go away, and shutdown with work in flight.

Every test is bounded in count and time and uses loopback only; ordering is forced with events.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from prometheus_client import CollectorRegistry
from test_app_support import PROMPTS, assert_close, make_settings, ready_client, strip_ids
from tokenizers.processors import TemplateProcessing

from app.batching import BatchLimits, ModelWorker, Work
from app.metrics import Metrics
from tfb_core.engine import TFBEngine
from tfb_core.sampling import EmptyPromptError, Job


@pytest.fixture(scope="module")
def client(tiny):
    with ready_client(make_settings(tiny, max_wait_ms=20.0)) as c:
        yield c


@pytest.fixture()
def no_bos_engine(tiny):
    """The tiny engine with a tokenizer that adds no BOS (as SmolLM2's): an empty prompt has no tokens."""
    engine = TFBEngine.load(make_settings(tiny).engine_config(), progress=False)
    engine.classifier.tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="$A", special_tokens=[])
    assert engine.classifier.tokenizer([""], add_special_tokens=True)["input_ids"] == [[]]
    return engine


# --- 1. inputs that cannot be classified ------------------------------------------------------------
@pytest.mark.parametrize("inputs,index", [(["   "], 0), (["a great film", " \n\t "], 1),
                                          ([{"prompt": "ok"}, "  "], 1)])
def test_blank_prompt_is_422_naming_it(client, inputs, index):
    r = client.post("/predict", json={"inputs": inputs})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert f"input {index}" in detail and "blank" in detail


def test_answers_do_not_depend_on_blank_company(client):
    """Valid requests coalesced with blank ones answer as they do alone; the blank ones are 422."""
    bodies = [{"inputs": [PROMPTS[i % 4]]} if i % 2 else {"inputs": [PROMPTS[i % 4], "   "]} for i in range(12)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(lambda b: client.post("/predict", json=b), bodies))
    for body, r in zip(bodies, responses, strict=True):
        if len(body["inputs"]) == 2:
            assert r.status_code == 422 and "input 1" in r.json()["detail"]
        else:
            alone = client.post("/predict", json=body)
            assert r.status_code == 200 and alone.status_code == 200
            assert_close(strip_ids(r.json()), strip_ids(alone.json()))


def test_prompt_without_tokens_is_an_error_naming_it(no_bos_engine):
    clf = no_bos_engine.classifier
    with pytest.raises(EmptyPromptError, match="input 1 has no tokens"):
        clf.tokenize(["good", ""])
    with pytest.raises(EmptyPromptError):  # never padded into a batch of only padding
        clf.run_jobs([Job(clf.tokenize(["good"])[0], 1, None), Job([], 1, None)], sigma=0.0)


def test_worker_answers_others_when_one_work_has_no_tokens(no_bos_engine):
    """A work whose prompt has no tokens fails alone; the works sharing its batch answer as alone."""
    engine = no_bos_engine

    async def scenario():
        ready = asyncio.Event()
        worker = ModelWorker(lambda: engine, BatchLimits(max_rows=64, max_wait_s=0.2), Metrics(CollectorRegistry()),
                             lambda e: ready.set(), lambda exc: pytest.fail(f"load failed: {exc}"), warmup=False)
        worker.start(asyncio.get_running_loop())
        await asyncio.wait_for(ready.wait(), 60)
        works = [Work(prompts=p, n_samples=4, seed=0, labels=None, finish=lambda probs: probs)
                 for p in (PROMPTS[:2], ["good", ""], PROMPTS[2:3])]
        results = await asyncio.gather(*(worker.submit(w) for w in works), return_exceptions=True)
        await worker.drain(10)
        return results

    good, bad, other = asyncio.run(scenario())
    assert isinstance(bad, EmptyPromptError) and "input 1" in str(bad)
    for prompts, got in ((PROMPTS[:2], good), (PROMPTS[2:3], other)):
        alone = engine.predict(prompts, n_samples=4, seed=0, return_samples=True)
        assert torch.allclose(got, torch.tensor([p["samples"] for p in alone["predictions"]]), atol=1e-5)
