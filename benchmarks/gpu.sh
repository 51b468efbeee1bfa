#!/usr/bin/env bash
# The GPU benchmark suite in one command (about 9 minutes on one H200, 11 at most):
#
#     OUT=/some/folder bash benchmarks/gpu.sh            # from the repository root
#
# Needs only torch, transformers and peft (no venv, no network: random weights, random token ids).
# Writes $OUT/<model>.json per model, $OUT/gpu.log (everything printed) and $OUT/gpu.md (the tables).
# One failing model (or configuration) does not stop the others; each model has a time budget for
# starting new configurations and a hard timeout.
#
# Dry run on a CPU machine:  OUT=/tmp/gpu-dry DEVICE=cpu QUICK=1 bash benchmarks/gpu.sh
# env: MODELS="tiny smollm2 llama8b-shape" (add "server": the app under load on the GPU; "generate": Bayesian
# decoding, benchmarks/generate_core.py, on by default on a GPU), DTYPE for the
# two larger models, PYTHON, QUICK, SERVER_SECONDS; PLAN="model:dtype:budget:timeout:sections[:grid] ..."
# runs just those entries (sections joined by '+', dtype BIG = DTYPE), e.g.
#   PLAN="llama8b-shape:BIG:60:150:overhead+memory smollm2:BIG:60:110:forward:b8" MODELS=server
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to the folder for the results}"
DEVICE="${DEVICE:-cuda}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
LOG="$OUT/gpu.log"
EXTRA=()
if [ -n "${QUICK:-}" ]; then EXTRA+=(--quick); fi

{
  echo "== tfb-serve GPU benchmarks, $(date -u +%FT%TZ), device=$DEVICE"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee -a "$LOG"

# model  dtype  budget-s (no new configuration after it)  hard timeout-s  sections  [grid]
run() {
  local model=$1 dtype=$2 budget=$3 hard=$4 sections=$5 grid=${6:-}
  local g=()
  if [ -n "$grid" ]; then g=(--grid "$grid"); fi
  echo "== $model ($dtype): budget ${budget}s, timeout ${hard}s, sections $sections ${grid:+grid $grid}" | tee -a "$LOG"
  timeout -k 10 "$hard" "$PY" benchmarks/bench.py --model "$model" --dtype "$dtype" --device "$DEVICE" \
      --weights random --budget-s "$budget" --sections "$sections" --out "$OUT/$model${grid:+-$grid}.json" \
      "${g[@]}" "${EXTRA[@]}" 2>&1 | grep --line-buffered -v -E "Warning|warnings.warn|Loading weights" | tee -a "$LOG"
  echo "== $model exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

# the app under concurrent load, coalescing on and off: a SmolLM2-shaped random model served on the GPU
# (needs the app's dependencies: fastapi, uvicorn, pydantic-settings, prometheus-client, httpx)
server() {
  local dtype=$1 seconds=$2 hard=$3
  echo "== server (smollm2 shape, $dtype): ${seconds}s per setting, timeout ${hard}s" | tee -a "$LOG"
  timeout -k 10 "$hard" "$PY" benchmarks/bench.py --model tiny --device "$DEVICE" --dtype "$dtype" --sections server \
      --server-model smollm2 --server-seconds "$seconds" --out "$OUT/server.json" "${EXTRA[@]}" 2>&1 \
      | grep --line-buffered -v -E "Warning|warnings.warn|Loading weights" | tee -a "$LOG"
  echo "== server exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

# Bayesian decoding (benchmarks/generate_core.py): N = 10 posterior samples as rows of one decode
# against N sequential decodes and against plain peft greedy (N = 1), in answer tokens per second
generate() {
  local shape=$1 dtype=$2 tokens=$3 prompts=$4 hard=$5
  echo "== generate ($shape, $dtype): $prompts prompts of 64 random tokens, $tokens tokens each, timeout ${hard}s" | tee -a "$LOG"
  timeout -k 10 "$hard" "$PY" benchmarks/generate_core.py --shape "$shape" --device "$DEVICE" --dtype "$dtype" \
      --tokens "$tokens" --prompts "$prompts" --prompt-tokens 64 --repeats 2 2>&1 \
      | grep --line-buffered -v -E "Warning|warnings.warn|Loading weights" | tee -a "$LOG" \
      | grep '^{' > "$OUT/generate-$shape.jsonl"
  echo "== generate $shape exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

# On a CPU (the dry run) bfloat16 matmuls crawl and the 8B shape needs 16 GB: float32, no 8B.
if [ "$DEVICE" = cpu ]; then BIG="${DTYPE:-float32}"; MODELS="${MODELS:-tiny smollm2}"
else BIG="${DTYPE:-bfloat16}"; MODELS="${MODELS:-tiny smollm2 llama8b-shape server generate}"; fi
ALL=equiv,peak,forward,overhead,memory,profile

# PLAN: "model:dtype:budget:timeout:sections[:grid]" entries; default, the whole suite for MODELS
if [ -z "${PLAN:-}" ]; then
  PLAN=""
  for m in $MODELS; do
    case $m in
      tiny)          PLAN+=" tiny:float32:35:70:$ALL,search" ;;
      smollm2)       PLAN+=" smollm2:$BIG:60:110:$ALL,search" ;;
      llama8b-shape) PLAN+=" llama8b-shape:$BIG:120:200:$ALL" ;;
      server|generate) ;;
      *) echo "== unknown model $m" | tee -a "$LOG" ;;
    esac
  done
fi

T0=$SECONDS
for entry in $PLAN; do
  IFS=: read -r model dtype budget hard sections grid <<<"$entry"
  if [ "$dtype" = BIG ]; then dtype=$BIG; fi
  run "$model" "$dtype" "$budget" "$hard" "${sections//+/,}" "$grid"
done
if [[ " $MODELS " == *" server "* ]]; then server "$BIG" "${SERVER_SECONDS:-30}" "${SERVER_TIMEOUT:-200}"; fi
if [[ " $MODELS " == *" generate "* ]]; then
  # the sequential reference is N x prompts one-row decodes: on the 8B shape about 40 s per repeat
  if [ "$DEVICE" = cpu ]; then generate smollm2 "$BIG" 4 2 300
  else generate llama8b-shape "$BIG" 64 2 200; generate smollm2 "$BIG" 64 4 120; fi
fi
echo "== all done in $((SECONDS - T0))s" | tee -a "$LOG"

for f in "$OUT"/*.json; do
  if [ -f "$f" ]; then "$PY" benchmarks/bench.py --markdown-from "$f"; echo; fi
done > "$OUT/gpu.md" 2>>"$LOG"
cat "$OUT/gpu.md"
