"""The image's start and probe commands, run as the container would (without Docker):
ENTRYPOINT ``tfb serve`` configured only by TFB_* variables, and the HEALTHCHECK command, which
must fail until /readyz is 200 and pass after."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import LABELS, missing
from test_deploy import dockerfile_instructions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_entrypoint_serves_and_healthcheck_follows_readiness(tiny, tmp_path):
    ins = dockerfile_instructions()
    entry = json.loads(next(rest for op, rest in ins if op == "ENTRYPOINT"))
    health = next(rest for op, rest in ins if op == "HEALTHCHECK")
    probe = json.loads(health[health.index("CMD") + 3:].strip())
    assert entry[-2:] == ["tfb", "serve"] and probe[0] == "python3"
    tfb = Path(sys.executable).parent / "tfb"
    if not tfb.exists():
        tfb = shutil.which("tfb")
    if not tfb:
        missing("the tfb console script is not installed (pip install -e .)")
    port = free_port()
    env = {**os.environ, "TFB_MODEL": tiny["model"], "TFB_ADAPTER": tiny["adapter"], "TFB_LABELS": ",".join(LABELS),
           "TFB_SIGMA": "0.02", "TFB_CACHE_DIR": str(tmp_path / "cache"), "TFB_HOST": "127.0.0.1",
           "TFB_PORT": str(port), "TFB_LOG_LEVEL": "info"}
    probe_env = {"PATH": os.environ["PATH"], "TFB_PORT": str(port)}
    probe_cmd = [sys.executable, *probe[1:]]  # python3 of the image = this interpreter here

    def healthy() -> bool:
        return subprocess.run(probe_cmd, env=probe_env, capture_output=True, timeout=10).returncode == 0

    assert not healthy(), "the probe must fail while nothing listens"
    log_path = tmp_path / "server.log"
    log_file = open(log_path, "wb")  # a file, not a pipe: a chatty start-up must not block on a full pipe
    proc = subprocess.Popen([str(tfb), *entry[entry.index("tfb") + 1:]], env=env, stdout=log_file,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not healthy():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends (tini forwards it)
        # uvicorn drains, runs the lifespan's shutdown, then re-raises the signal (exit 143 in Docker)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        log = log_path.read_text()
        assert "Application shutdown complete" in log, log[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log_file.close()
