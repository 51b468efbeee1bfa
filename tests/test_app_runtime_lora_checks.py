"""What a runtime load (POST /v1/load_lora_adapter) may read and set: only files under the operator's
folders (TFB_ALLOWED_LOCAL_PATHS and the bundled adapters), answered alike whether or not a file
exists; a folder without weights named as such; a bad path reported before a missing task; a sigma
no search could reach refused, at run time and at start-up."""

from __future__ import annotations

import json
import shutil

import pytest
from pydantic import ValidationError
from test_app_runtime_lora import _settings, _wait_ready
from test_app_support import LABELS, make_settings, ready_client

from app.lora_updates import LoadLoraRequest, check_local_paths
from app.settings import BUNDLED_ADAPTERS
from tfb_core.search.strategy import reachable_range
from tfb_core.serving.config import DEMO_ADAPTER


def _load(client, **body):
    return client.post("/v1/load_lora_adapter", json={"lora_name": "b", **body})


def _error(r, param):
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    return r.json()["error"]["message"]


def test_a_load_reads_only_under_the_allowed_folders(tiny, tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    shutil.copytree(tiny["adapter_qv"], allowed / "qv")
    shutil.copytree(tiny["adapter_qv"], outside / "qv")
    (outside / "anchor.jsonl").write_text("not json\n")
    (allowed / "link").symlink_to(outside / "qv")  # inside by name, outside once resolved
    with ready_client(_settings(tiny, tmp_path, allowed_local_paths=[str(allowed)])) as client:
        # the same answer for a file that exists and one that does not: nothing learnt of the server's files
        for param, extra in (("lora_path", {}), ("anchor", {"lora_path": str(allowed / "qv"), "sigma": None}),
                             ("calibration", {"lora_path": str(allowed / "qv"), "sigma": 0.1})):
            there, nowhere = str(outside / "anchor.jsonl"), str(outside / "missing.jsonl")
            messages = [_error(_load(client, **{"sigma": 0.1, **extra, param: p}), param).replace(p, "PATH")
                        for p in (there, nowhere, "/etc/passwd")]
            assert messages[0] == messages[1] == messages[2] and "TFB_ALLOWED_LOCAL_PATHS" in messages[0], messages
            assert "JSON" not in messages[0]
        for escape in (str(allowed / ".." / "outside" / "qv"), str(allowed / "link")):  # `..` and symlinks resolved
            _error(_load(client, lora_path=escape, sigma=0.1), "lora_path")
        _error(_load(client, lora_path=str(allowed), adapter_subfolder="../outside/qv", sigma=0.1), "lora_path")
        _error(_load(client, lora_path="org/adapter", adapter_subfolder="../../x", sigma=0.1), "adapter_subfolder")
        assert _load(client, lora_path=str(allowed / "qv"), sigma=0.1).status_code == 200
    # a hub id is not a local path; the bundled adapters are always readable
    roots = make_settings(tiny).local_roots()
    assert roots == [BUNDLED_ADAPTERS.resolve()] and DEMO_ADAPTER.parent == BUNDLED_ADAPTERS
    for body in ({"lora_path": "org/adapter"}, {"lora_path": str(DEMO_ADAPTER), "anchor": str(DEMO_ADAPTER / "a")}):
        check_local_paths(LoadLoraRequest(lora_name="b", **body), roots)


def test_allowed_local_paths_setting(tiny, tmp_path):
    assert make_settings(tiny, allowed_local_paths=f"{tmp_path}, {tiny['root']}").local_roots()[1:] == [
        tmp_path.resolve(), tiny["root"].resolve()]
    assert make_settings(tiny, allowed_local_paths=json.dumps([str(tmp_path)])).allowed_local_paths == (str(tmp_path),)
    with pytest.raises(ValidationError, match="allowed_local_paths: .* is not a folder"):
        make_settings(tiny, allowed_local_paths=str(tmp_path / "nowhere"))


def test_a_folder_without_weights_is_named_as_such(tiny, tmp_path):
    folder = tmp_path / "config_only"
    folder.mkdir()
    shutil.copy(f"{tiny['adapter_qv']}/adapter_config.json", folder)
    with ready_client(_settings(tiny, tmp_path)) as client:
        message = _error(_load(client, lora_path=str(folder), sigma=0.1), "lora_path")
    assert "weights file is missing" in message and "adapter_model.safetensors" in message
    assert "Repo id" not in message


def test_a_bad_path_is_reported_before_a_missing_task(tiny, tmp_path):
    """A TFB_ADAPTERS server without TFB_TASK: a load that omits ``task`` and names no adapter folder
    hears about its path first; with a good path, about the task."""
    served = [{"name": "adapter", "path": tiny["adapter"], "labels": list(LABELS), "sigma": 0.05}]
    settings = _settings(tiny, tmp_path, adapter=None, labels=None, adapters=json.dumps(served))
    with ready_client(settings) as client:
        message = _error(_load(client, lora_path=str(tmp_path / "nowhere"), sigma=0.1), "lora_path")
        assert "adapter_config.json" in message
        _error(_load(client, lora_path=tiny["adapter_qv"], sigma=0.1), "task")


def test_sigma_beyond_the_searchs_reach_is_refused(tiny, tmp_path, monkeypatch, capsys):
    settings = _settings(tiny, tmp_path)
    highest = reachable_range(settings.engine_config().search)[1]
    with ready_client(settings) as client:
        for sigma in (1e6, highest * 1.01):
            message = _error(_load(client, lora_path=tiny["adapter_qv"], sigma=sigma), "sigma")
            assert "the most a sigma search reaches" in message
        assert _load(client, lora_path=tiny["adapter_qv"], sigma=highest).status_code == 200
        _wait_ready(client, "b")
    # at start-up: a clear message naming TFB_SIGMA and a non-zero exit, before any model is loaded
    with pytest.raises(ValidationError, match="the most a sigma search reaches"):
        make_settings(tiny, sigma=1e6)
    from app import cli

    for name, value in {"TFB_MODEL": tiny["model"], "TFB_ADAPTER": tiny["adapter"], "TFB_LABELS": ",".join(LABELS),
                        "TFB_SIGMA": "1e6"}.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "TFB_SIGMA: sigma 1e+06 is above" in err and "the most a sigma search reaches" in err
