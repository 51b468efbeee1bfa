"""End to end with a real Prometheus: it scrapes a running tfb-serve (tiny model) and evaluates
deploy/prometheus/rules.yml as shipped; the recording rules must give back the accuracy, NLL,
Brier and 15-bin ECE computed here from the predictions and labels the test sent.

The server runs under uvicorn in a thread on a free loopback port; Prometheus (Debian's binary,
installed by scripts/ci_deps.sh) on another, with a 1 s scrape and evaluation interval. Every
counter starts at zero before the first label arrives, so increase() over the rules' windows
covers exactly what was sent (its extrapolation factor is the same for every series of one
scrape and cancels in the ratios).
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import LABELS, missing
from test_deploy import DASHBOARD, EXPORTED, RULES, dashboard_exprs, promql_metric_names, rules

PROMETHEUS = shutil.which("prometheus")


@pytest.fixture(autouse=True)
def _prometheus_installed():
    if PROMETHEUS is None:
        missing("prometheus is not installed (scripts/ci_deps.sh)")
TEXTS = ["a great film with a wonderful cast", "a dull and tedious mess of a movie",
         "the plot is thin but the acting is superb", "I would not watch it again", "a great film", "a dull movie"]
TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float = TIMEOUT_S, every: float = 0.25):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    import uvicorn

    from app.main import create_app
    from app.settings import Settings

    port = free_port()
    calibration = tmp_path_factory.mktemp("calibration") / "cal.jsonl"  # the drift rules' reference
    calibration.write_text("".join(json.dumps({"prompt": t, "label": LABELS[i % 2]}) + "\n"
                                   for i, t in enumerate(TEXTS)))
    settings = Settings(model=tiny["model"], adapter=tiny["adapter"], labels=LABELS, sigma=0.05, n_samples=4,
                        cache_dir=str(tiny["root"] / "cache-prom"), warmup=False, calibration=str(calibration))
    srv = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning",
                                       lifespan="on"))
    thread = threading.Thread(target=srv.run, name="tfb-uvicorn", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("tfb-serve /readyz", lambda: httpx.get(f"{base}/readyz", timeout=2).status_code == 200)
        yield {"base": base, "port": port}
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("prometheus")
    shutil.copy(RULES, root / "rules.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": ["rules.yml"],
        "scrape_configs": [{"job_name": "tfb-serve", "static_configs": [{"targets": [f"127.0.0.1:{server['port']}"]}]}],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(root / "prometheus.log", "wb")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={root / 'prometheus.yml'}",
                             f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        wait_for("Prometheus to start", lambda: proc.poll() is None
                 and httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=2).status_code == 200, timeout=30)
        yield {"api": api, "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        if proc.returncode not in (0, -15):
            print((root / "prometheus.log").read_text()[-3000:])


def query(api: str, expr: str) -> list[dict]:
    r = httpx.get(f"{api}/query", params={"query": expr}, timeout=5)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def scalar(api: str, expr: str) -> float | None:
    result = query(api, expr)
    return float(result[0]["value"][1]) if result else None


def expected_metrics(preds: list[dict], targets: list[int]) -> dict[str, float]:
    """Accuracy, NLL, Brier and 15-bin top-label ECE (TFB.md section 5) of the labelled predictions."""
    n = len(preds)
    bins: dict[int, list[float]] = {}
    correct = nll = brier = 0.0
    for p, y in zip(preds, targets, strict=True):
        probs = p["probs"]
        conf = max(probs)
        hit = float(probs.index(conf) == y)
        b = bins.setdefault(min(int(math.floor(conf * 15)), 14), [0.0, 0.0])
        b[0] += hit
        b[1] += conf
        correct += hit
        nll += -math.log(max(probs[y], 1e-12))
        brier += sum((q - (1.0 if c == y else 0.0)) ** 2 for c, q in enumerate(probs))
    return {"accuracy": correct / n, "nll": nll / n, "brier": brier / n,
            "ece": sum(abs(c - s) for c, s in bins.values()) / n, "bins": len(bins)}


def test_prometheus_scrapes_and_rules_match(server, prometheus):
    api, base = prometheus["api"], server["base"]
    # 1. Prometheus has the zero-valued counters (two scrapes) before any label is sent.
    wait_for("two scrapes of the idle server", lambda: (scalar(
        api, 'count_over_time(tfb_calibration_bin_count_total{bin="0"}[5m])') or 0) >= 2)
    assert scalar(api, 'up{job="tfb-serve"}') == 1.0
    assert scalar(api, "tfb_ready") == 1.0
    assert scalar(api, "tfb_sigma") == pytest.approx(0.05)

    # 2. Predictions, then labels for all of them (a fixed pattern: some right, some wrong).
    preds = []
    n_requests = 4
    for k in range(n_requests):
        r = httpx.post(f"{base}/predict", json={"inputs": TEXTS, "seed": k}, timeout=30)
        assert r.status_code == 200, r.text
        preds += r.json()["predictions"]
    targets = [(i * 7 + 3) % 5 % 2 for i in range(len(preds))]
    for p, y in zip(preds, targets, strict=True):
        r = httpx.post(f"{base}/feedback", json={"id": p["id"], "label": LABELS[y]}, timeout=10)
        assert r.status_code == 200, r.text
    want = expected_metrics(preds, targets)
    n = len(preds)
    assert 0 < want["accuracy"] < 1 and want["ece"] > 0, want  # a pattern the rules can get wrong

    # 3. The raw series, as scraped.
    wait_for("the labels in Prometheus", lambda: scalar(api, "tfb_feedback_total") == n)
    assert scalar(api, 'sum(tfb_requests_total{route="/predict",status="200"})') == n_requests
    assert scalar(api, "sum(tfb_predictions_total)") == n
    assert scalar(api, "tfb_prediction_confidence_count") == n
    assert scalar(api, "tfb_prediction_mutual_information_count") == n
    assert scalar(api, "sum(tfb_calibration_bin_count_total)") == n
    assert scalar(api, "tfb_feedback_correct_total") == pytest.approx(want["accuracy"] * n)
    assert scalar(api, "tfb_recent_ece") == pytest.approx(want["ece"], abs=1e-6)

    # 4. The recording rules, once evaluated on a scrape that has every label.
    def rules_caught_up():
        fb = scalar(api, "tfb:feedback:1h")
        return fb is not None and fb > 0 and scalar(api, "tfb:ece:1h") is not None \
            and scalar(api, "tfb_feedback_total offset 2s") == n
    wait_for("the recording rules to see every label", rules_caught_up)
    assert scalar(api, 'tfb:ece:1h{job="tfb-serve"}') == pytest.approx(want["ece"], rel=1e-6, abs=1e-9)
    assert scalar(api, "tfb:accuracy:1h") == pytest.approx(want["accuracy"], rel=1e-6)
    assert scalar(api, "tfb:nll:1h") == pytest.approx(want["nll"], rel=1e-6)
    assert scalar(api, "tfb:brier:1h") == pytest.approx(want["brier"], rel=1e-6)
    mean_conf = sum(max(p["probs"]) for p in preds) / n
    assert scalar(api, "tfb:confidence_gap:1h") == pytest.approx(mean_conf - want["accuracy"], rel=1e-5, abs=1e-9)
    # the issue's own windowed-ECE expression, evaluated ad hoc, agrees with the recording rule
    issue_ece = ("sum(abs(sum by (bin) (increase(tfb_calibration_bin_correct_total[1h])) - sum by (bin) "
                 "(increase(tfb_calibration_bin_confidence_sum_total[1h])))) "
                 "/ sum(increase(tfb_calibration_bin_count_total[1h]))")
    assert scalar(api, issue_ece) == pytest.approx(want["ece"], rel=1e-6, abs=1e-9)
    # uncertainty drift: served mean MI and entropy over the calibration set's (from /info)
    reference = httpx.get(f"{base}/info", timeout=5).json()["calibration"]
    mean_mi = sum(p["mutual_information"] for p in preds) / n
    mean_h = sum(p["predictive_entropy"] for p in preds) / n
    assert scalar(api, "tfb_calibration_mutual_information") == pytest.approx(reference["mean_mutual_information"])
    assert scalar(api, "tfb:mutual_information_drift:30m") == pytest.approx(
        mean_mi / reference["mean_mutual_information"], rel=1e-5)
    assert scalar(api, "tfb:predictive_entropy_drift:30m") == pytest.approx(
        mean_h / reference["mean_predictive_entropy"], rel=1e-5)

    # 5. Every rule loaded and healthy (none failing to evaluate).
    groups = httpx.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
    loaded = [r for g in groups for r in g["rules"]]
    assert len(loaded) == len(rules())
    assert all(r["health"] == "ok" for r in loaded), [(r["name"], r.get("lastError")) for r in loaded]
    firing = [r["name"] for r in loaded if r["type"] == "alerting" and r["state"] == "firing"]
    assert "TFBServerDown" not in firing


def test_live_scrape_names_match_the_interface(server):
    """A real /metrics scrape carries only documented names, and every name deploy/ uses."""
    text = httpx.get(f"{server['base']}/metrics", timeout=5).text
    series = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    series = {s for s in series if not s.endswith("_created")}
    assert series <= EXPORTED, series - EXPORTED
    used = set()
    for expr in dashboard_exprs() + [r["expr"] for r in rules()]:
        used |= promql_metric_names(expr)
    raw = {u for u in used if ":" not in u and u != "up"}
    assert raw <= series, f"deploy/ uses names the server does not export: {raw - series}"
    assert DASHBOARD.exists()


def test_recording_rules_file_is_used_verbatim():
    assert Path(RULES).read_text().count("record:") == sum(1 for r in rules() if "record" in r)
