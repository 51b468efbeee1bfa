"""The adapter registry of the many-adapter Ray deployment (app/registry.py) and ``tfb search --registry``,
which fills the sigma cache before traffic (no Ray needed)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import LABELS
from test_app_support import make_settings, ready_client

from app.registry import NotInRegistryError, Registry, RegistryError

ANCHOR = [{"prompt": p, "label": lab} for p, lab in [
    ("a wonderful film", "positive"), ("a terrible film", "negative"), ("great acting", "positive"),
    ("boring and slow", "negative"), ("a delight", "positive"), ("a mess", "negative")]]


def write(path, entries) -> str:
    path.write_text(json.dumps(entries))
    return str(path)


def touch_later(path) -> None:
    """A new modification time for the poll to see (file systems with coarse clocks included)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_a_registry_lists_what_may_be_loaded_and_is_read_again_when_it_changes(tiny, tmp_path):
    settings = make_settings(tiny)
    path = tmp_path / "registry.json"
    write(path, [{"name": "one", "adapter": tiny["adapter"], "sigma": 0.1}])
    reg = Registry(path, settings, reserved={"sst2-mle"}, poll_s=0.0)
    assert reg.get("one").sigma == 0.1 and reg.names() == ["one"]
    with pytest.raises(NotInRegistryError, match=r"'two' is not in the adapter registry \(registry.json\)"):
        reg.get("two")
    write(path, [{"name": "one", "adapter": tiny["adapter"], "sigma": 0.1},
                 {"name": "two", "adapter": tiny["adapter_other"], "labels": LABELS}])
    touch_later(path)
    assert reg.get("two").adapter == tiny["adapter_other"] and reg.reloads == 1
    # a registry that turns bad is refused: the last good one stays, the reason is kept
    path.write_text("[{")
    touch_later(path)
    assert "two" in reg and reg.error is not None and "registry.json" in reg.error
    write(path, [{"name": "three", "adapter": tiny["adapter"]}])
    touch_later(path)
    assert reg.names() == ["three"] and reg.error is None and "one" not in reg


def test_a_registry_folder_names_its_adapters_after_their_folders(tiny, tmp_path):
    import shutil

    for name in ("alpha", "beta"):
        shutil.copytree(tiny["adapter"], tmp_path / "reg" / name)
    (tmp_path / "reg" / "beta" / "tfb.json").write_text(json.dumps({"sigma": 0.2, "labels": LABELS}))
    (tmp_path / "reg" / "notes").mkdir()  # no adapter_config.json: not an adapter
    reg = Registry(tmp_path / "reg", make_settings(tiny), poll_s=0.0)
    assert reg.names() == ["alpha", "beta"] and reg.get("beta").sigma == 0.2
    assert reg.get("alpha").adapter == str(tmp_path / "reg" / "alpha")


@pytest.mark.parametrize("entries, message", [
    ([{"name": "a", "adapter": "/no/such/folder"}], r"entry 1 \('a'\): adapter folder '/no/such/folder' does not exist"),
    ([{"name": "a", "adapter": "{adapter}"}, {"name": "a", "adapter": "{adapter}"}], r"entry 2 \('a'\): the name 'a' "
                                                                                    "is listed twice"),
    ([{"name": "base", "adapter": "{adapter}"}], "'base' is the name of an adapter every replica serves"),
    ([{"name": "a"}], r"entry 1 \('a'\): entry: Value error, adapter 'a': give its adapter"),
    ([{"name": "a", "adapter": "{adapter}", "sigma": -1}], r"entry 1 \('a'\): sigma: Input should be greater"),
    ([{"name": "a", "adapter": "{adapter}", "lora_path": "/x"}], r"lora_path: Extra inputs are not permitted"),
    ([{"name": "a", "adapter": "{adapter}", "anchor": "/no/anchor.jsonl"}], "anchor file '/no/anchor.jsonl' does not"),
    ([], "it lists no adapter"),
    ({"name": "a"}, "expected a list of adapters"),
])
def test_a_bad_registry_at_start_is_refused_naming_the_file_and_entry(tiny, tmp_path, entries, message):
    text = json.dumps(entries).replace("{adapter}", tiny["adapter"])
    (tmp_path / "registry.json").write_text(text)
    with pytest.raises(RegistryError, match=message) as info:
        Registry(tmp_path / "registry.json", make_settings(tiny), reserved={"base"})
    assert "registry.json" in str(info.value)


def test_an_entry_whose_task_is_unknown_is_refused_at_start(tiny, tmp_path):
    """Neither the entry nor the server says what it classifies: refused when the registry is read,
    not when a request first loads it."""
    path = write(tmp_path / "registry.json", [{"name": "a", "adapter": tiny["adapter"], "sigma": 0.1}])
    with pytest.raises(RegistryError, match=r"entry 1 \('a'\): .*task"):
        Registry(path, make_settings(tiny, labels=None))
    assert Registry(path, make_settings(tiny, labels=None, task="sst2")).get("a").sigma == 0.1


def test_a_missing_or_foreign_registry_is_refused(tiny, tmp_path):
    with pytest.raises(RegistryError, match="no such file or folder"):
        Registry(tmp_path / "nope.json", make_settings(tiny))
    (tmp_path / "reg.yaml").write_text("- name: a")
    with pytest.raises(RegistryError, match=r"expected a \.json or \.toml file, or a folder"):
        Registry(tmp_path / "reg.yaml", make_settings(tiny))


def test_tfb_search_over_the_registry_fills_the_cache_a_server_then_reads(tiny, tmp_path, capsys):
    """The pre-warm command: the searched adapter's sigma and calibration are cached under the keys a
    server's load computes (the server's load then reads them: sigma_source "cache", no search)."""
    from app.cli import main

    anchor = tmp_path / "anchor.jsonl"
    anchor.write_text("".join(json.dumps(r) + "\n" for r in ANCHOR))
    cache = tmp_path / "cache"
    registry = write(tmp_path / "registry.json", [
        {"name": "fixed", "adapter": tiny["adapter"], "sigma": 0.05},
        {"name": "searched", "adapter": tiny["adapter_other"], "anchor": str(anchor), "calibration": str(anchor)}])
    flags = ["--model", tiny["model"], "--adapter", tiny["adapter"], "--labels", *LABELS, "--cache-dir", str(cache),
             "--criterion", "flip", "--iters", "2", "--search-samples", "2", "--max-length", "64"]  # as make_settings
    code = main(["search", *flags, "--registry", registry, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = {d["name"]: d for d in map(json.loads, out.splitlines())}
    assert lines["fixed"]["sigma_source"] == "fixed" and lines["searched"]["sigma_source"] == "search"
    # the searched adapter's calibration (its file); the fixed one has none to calibrate on
    assert len(list((cache / "calibration").glob("*.json"))) == 1
    settings = make_settings(tiny, adapter=None, sigma=None, cache_dir=str(cache), search_criterion="flip", search_iters=2,
                             search_samples=2,
                             adapters=[{"name": "default", "adapter": tiny["adapter"], "sigma": 0.05},
                                       {"name": "searched", "adapter": tiny["adapter_other"], "anchor": str(anchor),
                                        "calibration": str(anchor)}])
    with ready_client(settings) as client:
        engine = client.app.state.tfb.predictor.adapters.engines["searched"]
        assert engine.sigma_source == "cache" and engine.sigma == lines["searched"]["sigma"]
        assert engine.calibration is not None
    # a bad registry: exit 2, the file named
    (tmp_path / "bad.json").write_text("[{}]")
    code = main(["search", *flags, "--registry", str(tmp_path / "bad.json")])
    assert code == 2 and "bad.json: entry 1" in capsys.readouterr().err
