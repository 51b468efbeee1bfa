"""First start and warm restart of the embedded default, idle and beside a CPU-bound neighbour.

    python benchmarks/startup.py --json benchmarks/results/startup-cpu.json

For each condition (idle; ``--neighbours`` busy processes): ``tfb serve`` on an empty cache folder
(model conversion, the default adapter's sigma search, then ready; the other adapters' searches and
the calibration in the background), then again on the same folder (everything cached). Reported per
start: seconds to the first /readyz 200, to every adapter ready (/info), and to the calibration done.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TFB = ROOT / ".venv" / "bin" / "tfb"


def _spin() -> None:  # a CPU-bound neighbour
    x = 0
    while True:
        x = (x * 1103515245 + 12345) % 2**31


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None
    except (OSError, ValueError):
        return 0, None


def one_start(cache: Path, port: int, timeout_s: float, log: Path) -> dict[str, float | None]:
    env = {**os.environ, "TFB_CACHE_DIR": str(cache), "TFB_PORT": str(port)}
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([str(TFB), "serve", "--port", str(port)], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    marks: dict[str, float | None] = {"ready_s": None, "all_adapters_s": None, "calibrated_s": None}
    base = f"http://127.0.0.1:{port}"
    try:
        while time.monotonic() - started < timeout_s and proc.poll() is None:
            now = time.monotonic() - started
            if marks["ready_s"] is None and _get(base + "/readyz")[0] == 200:
                marks["ready_s"] = now
            if marks["ready_s"] is not None:
                status, info = _get(base + "/info")
                if status == 200 and info:
                    adapters = info.get("adapters") or []
                    if marks["all_adapters_s"] is None and adapters and all(
                            a.get("state", "ready") == "ready" for a in adapters):
                        marks["all_adapters_s"] = now
                    cal = [a.get("calibration") or {} for a in adapters]
                    if (marks["calibrated_s"] is None and marks["all_adapters_s"] is not None
                            and not any(c.get("state") == "running" for c in cal)):
                        marks["calibrated_s"] = now
            if all(v is not None for v in marks.values()):
                break
            time.sleep(0.5)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {k: None if v is None else round(v, 1) for k, v in marks.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--neighbours", type=int, default=1, help="busy processes beside the server in the second condition")
    ap.add_argument("--port", type=int, default=8731)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results: dict[str, Any] = {"cpus": os.cpu_count(), "neighbours": args.neighbours}
    for condition, k in (("idle", 0), ("neighbour", args.neighbours)):
        spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(k)]
        for p in spinners:
            p.start()
        cache = Path(tempfile.mkdtemp(prefix="tfb-startup-"))
        try:
            first = one_start(cache, args.port, args.timeout, cache.parent / f"{cache.name}-first.log")
            warm = one_start(cache, args.port, args.timeout, cache.parent / f"{cache.name}-warm.log")
        finally:
            for p in spinners:
                p.terminate()
            shutil.rmtree(cache, ignore_errors=True)
        results[condition] = {"first_start": first, "warm_restart": warm}
        print(condition, json.dumps(results[condition]), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
