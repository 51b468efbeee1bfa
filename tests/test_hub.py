"""Hub ids (with revision and subfolder) go through the real hub code path, served from a local cache.

The published adapters live in subfolders of one repository; here a fake hub cache holds a tiny
base model and an adapter repository with the adapter in a subfolder, and HF_HUB_OFFLINE=1 makes
huggingface_hub resolve the ids from it without any network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import LABELS

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_repo(cache: Path, repo_id: str, src: Path, subfolder: str = "") -> None:
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snap = root / "snapshots" / COMMIT / subfolder
    shutil.copytree(src, snap, dirs_exist_ok=True)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)


def test_hub_ids_with_subfolder_load_offline(tiny, tmp_path):
    hub = tmp_path / "hub"
    fake_hub_repo(hub, "tiny-org/tiny-llama", Path(tiny["model"]))
    fake_hub_repo(hub, "tiny-org/tfb-adapters", Path(tiny["adapter"]), subfolder="sst2/mle")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "HF_HOME": str(tmp_path / "hf"),
           "TFB_CACHE_DIR": str(tmp_path / "tfb")}
    cmd = [sys.executable, "-m", "tfb_core.cli", "predict", "--model", "tiny-org/tiny-llama", "--adapter",
           "tiny-org/tfb-adapters", "--adapter-subfolder", "sst2/mle", "--labels", *LABELS, "--sigma", "0.2",
           "--samples", "3", "--prompt", "a great film", "--json"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hub_out = json.loads(proc.stdout)
    local = subprocess.run([sys.executable, "-m", "tfb_core.cli", "predict", "--model", tiny["model"], "--adapter",
                            tiny["adapter"], *cmd[cmd.index("--labels"):]], env=env, capture_output=True, text=True,
                           timeout=300)
    assert local.returncode == 0, local.stderr[-2000:]
    assert hub_out == json.loads(local.stdout)
    # a subfolder that does not exist is an error that names the adapter
    bad = subprocess.run(cmd[:cmd.index("sst2/mle")] + ["sst2/nope"] + cmd[cmd.index("sst2/mle") + 1:], env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "tiny-org/tfb-adapters" in bad.stderr
