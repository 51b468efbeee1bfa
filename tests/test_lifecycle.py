"""The lifecycle of adapters loaded at run time or searched after start-up (tfb_core.serving.lifecycle).

Each race of a load and an unload is played without HTTP: the load and unload handlers' coroutines
run on the app's own event loop (the test client's portal), the app's worker held at the point of
the race (a background step that blocks, or a wrapped install or read that waits)."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager

import pytest
from test_app_runtime_lora import PROMPTS, _anchor, _entry, _routed, _settings, _wait, _wait_ready
from test_app_support import chat_templated, ready_client

from app.lora_updates import LoadLoraRequest, LoraConflictError, LoraRequestError, UnloadLoraRequest
from tfb_core.serving import lifecycle, runtime
from tfb_core.serving.gate import ForwardGate


class Held:
    """The app's worker held by a background step until :meth:`release`; ``queued`` is set when the
    next background work (a load's install) is queued behind it."""

    def __init__(self, worker, monkeypatch):
        self.hold, self.held, self.queued = threading.Event(), threading.Event(), threading.Event()

        def block() -> bool:
            self.held.set()
            self.hold.wait()
            return True

        worker.add_background(block, lambda: None)
        assert self.held.wait(30)
        real = worker.add_background

        def spy(*args, **kwargs):
            real(*args, **kwargs)
            self.queued.set()

        monkeypatch.setattr(worker, "add_background", spy)

    def release(self) -> None:
        self.hold.set()

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()  # a failed test must not leave the worker (and the app's shutdown) held


def _parts(client):
    state = client.app.state.tfb
    return state, state.runtime_loras, state.predictor.adapters.lifecycle


@contextmanager
def _app(settings, calibrated=True):
    """:func:`ready_client`; handlers still running at the end (a failed test's) are cancelled: the
    stopped worker would never answer them, and the app's loop would wait for them."""
    with ready_client(settings, calibrated=calibrated) as client:
        client.running = []
        try:
            yield client
        finally:
            for future in client.running:
                future.cancel()


def _start(client, fn, *args):
    future = client.portal.start_task_soon(fn, *args)
    client.running.append(future)
    return future


def _load(client, **body):
    """The load handler's coroutine on the app's loop: a future of (status, body), or its error."""
    return _start(client, client.app.state.tfb.runtime_loras.load, LoadLoraRequest(**body))


def _unload(client, name):
    return _start(client, client.app.state.tfb.runtime_loras.unload, UnloadLoraRequest(lora_name=name))


def _left_nothing(client, before, name="b"):
    """Nothing of adapter ``name`` is left: no slot in any layer, no record, not served, no search."""
    _, _, life = _parts(client)
    assert _routed(client) == before
    assert name not in life.records and name not in life.engines
    assert not [t for t in threading.enumerate() if t.name == f"tfb-sigma-search-{name}" and t.is_alive()]


@pytest.mark.parametrize("sigma", [0.1, None], ids=["fixed", "search"])
def test_an_unload_while_the_install_waits_for_the_worker_ends_the_load(tiny, tmp_path, monkeypatch, sigma):
    """The load's files are read and its install is queued behind a held worker when the unload
    arrives: the unload wins (the load: 409; nothing installed, no search started), the name is
    taken until then, and free again after."""
    anchor = _anchor(tmp_path)
    installs = []
    real = runtime.install
    monkeypatch.setattr(runtime, "install", lambda *a, **k: installs.append(a[1].record.name) or real(*a, **k))
    with _app(_settings(tiny, tmp_path, sigma=None, anchor=anchor)) as client:
        state, loras, life = _parts(client)
        before = _routed(client)
        with Held(state.worker, monkeypatch) as held:
            load = _load(client, lora_name="b", lora_path=tiny["adapter_other"], sigma=sigma, anchor=anchor)
            assert held.queued.wait(60)
            assert life.state("b") == "loading"
            unload = _unload(client, "b")
            _wait(lambda: life.state("b") == "unloading", "the unload began")
            with pytest.raises(LoraRequestError, match="being unloaded") as busy:
                _load(client, lora_name="b", lora_path=tiny["adapter_qv"], sigma=0.1).result(60)
            assert busy.value.param == "lora_name"
            held.release()
            with pytest.raises(LoraConflictError, match="unloaded while it loaded"):
                load.result(60)
            assert unload.result(60)["lora_name"] == "b"
            _left_nothing(client, before)
            assert installs == []  # the install step found it unloading: nothing was put into the model
            status, out = client.portal.call(loras.load, LoadLoraRequest(lora_name="b", lora_path=tiny["adapter_qv"],
                                                                         sigma=0.1))
            assert status == 200 and out["state"] == "ready"


def test_an_unload_while_the_install_runs_frees_what_it_installed(tiny, tmp_path, monkeypatch):
    """The unload arrives while the worker is inside the install (the adapter's slots are in the
    model): the install's own transition finds it unloading, the load answers 409, and the unload
    frees the slots before it answers."""
    inside, go = threading.Event(), threading.Event()
    real = runtime.install

    def install(*args, **kwargs):
        out = real(*args, **kwargs)
        inside.set()
        assert go.wait(60)
        return out

    monkeypatch.setattr(runtime, "install", install)
    with _app(_settings(tiny, tmp_path)) as client:
        state, _, life = _parts(client)
        before = _routed(client)
        load = _load(client, lora_name="b", lora_path=tiny["adapter_other"], sigma=0.2)
        assert inside.wait(60)
        assert _routed(client) != before  # installed, not yet served
        unload = _unload(client, "b")
        _wait(lambda: life.state("b") == "unloading", "the unload began")
        go.set()
        with pytest.raises(LoraConflictError):
            load.result(60)
        unload.result(60)
        _left_nothing(client, before)
        assert client.post("/predict", json={"adapter": "b", "inputs": PROMPTS}).status_code == 404


def test_an_unload_while_the_files_are_read_waits_for_the_load(tiny, tmp_path, monkeypatch):
    """The unload arrives while the load reads its files (nothing installed yet): its free waits
    until the load is over (the worker runs other work meanwhile), then both end, nothing left."""
    reading, go = threading.Event(), threading.Event()
    real = runtime.prepare

    def prepare(*args):
        reading.set()
        assert go.wait(60)
        return real(*args)

    monkeypatch.setattr(runtime, "prepare", prepare)
    with _app(_settings(tiny, tmp_path)) as client:
        state, _, life = _parts(client)
        before = _routed(client)
        load = _load(client, lora_name="b", lora_path=tiny["adapter_other"], sigma=0.2)
        assert reading.wait(60)
        unload = _unload(client, "b")
        _wait(lambda: life.state("b") == "unloading", "the unload began")
        client.portal.call(state.worker.call, lambda: None)  # the worker turned: the free was not ready
        assert not unload.done() and life.state("b") == "unloading"
        go.set()
        with pytest.raises(LoraConflictError):
            load.result(60)
        unload.result(60)
        _left_nothing(client, before)


def test_two_loads_of_one_name_at_once_one_wins(tiny, tmp_path, monkeypatch):
    with _app(_settings(tiny, tmp_path)) as client:
        state, loras, life = _parts(client)
        with Held(state.worker, monkeypatch) as held:
            first = _load(client, lora_name="b", lora_path=tiny["adapter_other"], sigma=0.2)
            assert held.queued.wait(60)
            with pytest.raises(LoraRequestError, match="already been loaded") as second:
                _load(client, lora_name="b", lora_path=tiny["adapter_qv"], sigma=0.3).result(60)
            assert second.value.param == "lora_name"
            held.release()
            status, out = first.result(60)
            assert status == 200 and life.engines["b"].sigma == 0.2


def test_a_load_whose_caller_left_during_the_install_is_served_and_can_be_unloaded(tiny, tmp_path, monkeypatch):
    """The load's handler is cancelled while its install waits for the worker: the install still
    runs, and does the rest itself: the adapter is served (nothing leaks), and an unload frees it."""
    with _app(_settings(tiny, tmp_path)) as client:
        state, loras, life = _parts(client)
        before = _routed(client)
        with Held(state.worker, monkeypatch) as held:
            load = _load(client, lora_name="b", lora_path=tiny["adapter_other"], sigma=0.2)
            assert held.queued.wait(60)
            load.cancel()
            _wait(load.done, "the load's handler cancelled")
            held.release()
            _wait_ready(client, "b")
            assert client.post("/predict", json={"adapter": "b", "inputs": PROMPTS}).status_code == 200
            client.portal.call(loras.unload, UnloadLoraRequest(lora_name="b"))
            _left_nothing(client, before)


def test_unload_drops_the_decodes_kept_rows_of_the_adapter(tiny, tmp_path):
    """A generative adapter's chat requests leave kept rows of the template's head (per posterior
    sample) in the served generator; its unload drops them, and only them."""
    with _app(_settings(tiny, tmp_path)) as client, chat_templated(client):
        state, loras, life = _parts(client)
        status, _ = client.portal.call(loras.load, LoadLoraRequest(lora_name="b", lora_path=tiny["adapter_other"],
                                                                   task="generation", sigma=0.2))
        assert status == 200
        index = life.engines["b"].adapter
        for model in ("b", "adapter"):
            r = client.post("/v1/chat/completions", json={"model": model, "max_tokens": 2, "n_samples": 3,
                                                          "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
        kept = state.worker._service.generator.prefix_rows
        adapters = [k[0] for k in kept.keys()]
        assert adapters.count(index) == 3 and adapters.count(0) == 3
        client.portal.call(loras.unload, UnloadLoraRequest(lora_name="b"))
        assert [k[0] for k in kept.keys()] == [0, 0, 0]


def test_startup_adapters_other_than_the_default_are_searched_in_the_background(tiny, tmp_path, monkeypatch):
    """Two start-up adapters, the second's sigma to search (held at its gate): the server is ready
    with the default; the second answers 503 with Retry-After, /info shows it searching; released,
    it answers with the sigma the library's foreground search gives (``tfb search``'s path)."""
    from tfb_core.serving.startup import load_engines

    anchor = _anchor(tmp_path)
    startup = [{"name": "adapter", "path": tiny["adapter"], "sigma": 0.05},
               {"name": "other", "path": tiny["adapter_other"], "anchor": anchor}]

    def settings(cache):
        return _settings(tiny, tmp_path / cache, adapter=None, adapters=json.dumps(startup), sigma=None, anchor=anchor)

    want = load_engines(settings("foreground").engine_configs(), progress=False)[1]
    assert want.sigma_source == "search"
    gates: list[ForwardGate] = []

    class Paused(ForwardGate):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.pause()
            gates.append(self)

    monkeypatch.setattr(lifecycle, "ForwardGate", Paused)
    with _app(settings("server"), calibrated=False) as client:
        assert client.get("/readyz").status_code == 200 and len(gates) == 1
        entry = _entry(client, "other")
        assert entry["state"] == "searching" and "search_progress" in entry
        r = client.post("/predict", json={"adapter": "other", "inputs": PROMPTS})
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1, r.text
        assert client.post("/predict", json={"inputs": PROMPTS}).status_code == 200
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["adapter", "other"]
        gates[0].resume()
        _wait_ready(client, "other")
        entry = _entry(client, "other")
        assert entry["sigma_source"] == "search" and entry["sigma"] == want.sigma
        assert client.post("/predict", json={"adapter": "other", "inputs": PROMPTS}).status_code == 200


def test_an_unload_during_a_drain_frees_the_adapter_before_it_answers(tiny, tmp_path, monkeypatch):
    """SIGTERM's drain refuses new work, but an unload it accepted is awaited: its free still runs on
    the worker (background work nobody awaits does not), so it answers 200 with nothing left."""
    with _app(_settings(tiny, tmp_path)) as client:
        state, loras, life = _parts(client)
        before = _routed(client)
        status, _ = client.portal.call(loras.load, LoadLoraRequest(lora_name="b", lora_path=tiny["adapter_other"],
                                                                   sigma=0.2))
        assert status == 200
        with Held(state.worker, monkeypatch) as held:
            assert state.worker.begin_drain(60)
            unload = _unload(client, "b")
            _wait(lambda: life.state("b") == "unloading", "the unload began")
            held.release()
            assert unload.result(60)["lora_name"] == "b"
        _left_nothing(client, before)
