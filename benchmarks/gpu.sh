#!/usr/bin/env bash
# The GPU benchmark suite in one command (about 6 minutes on one H200, 6.5 at most):
#
#     OUT=/some/folder bash benchmarks/gpu.sh            # from the repository root
#
# Needs only torch, transformers and peft (no venv, no network: random weights, random token ids).
# Writes $OUT/<model>.json per model, $OUT/gpu.log (everything printed) and $OUT/gpu.md (the tables).
# One failing model (or configuration) does not stop the others; each model has a time budget for
# starting new configurations and a hard timeout.
#
# Dry run on a CPU machine:  OUT=/tmp/gpu-dry DEVICE=cpu QUICK=1 bash benchmarks/gpu.sh
# (env: MODELS="tiny smollm2 llama8b-shape", DTYPE for the two larger models, PYTHON, QUICK)
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

# model  dtype  budget-s (no new configuration after it)  hard timeout-s  sections
run() {
  local model=$1 dtype=$2 budget=$3 hard=$4 sections=$5
  echo "== $model ($dtype): budget ${budget}s, timeout ${hard}s" | tee -a "$LOG"
  timeout -k 10 "$hard" "$PY" benchmarks/bench.py --model "$model" --dtype "$dtype" --device "$DEVICE" \
      --weights random --budget-s "$budget" --sections "$sections" --out "$OUT/$model.json" "${EXTRA[@]}" \
      2>&1 | grep --line-buffered -v -E "Warning|warnings.warn|Loading weights" | tee -a "$LOG"
  echo "== $model exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

# On a CPU (the dry run) bfloat16 matmuls crawl and the 8B shape needs 16 GB: float32, no 8B.
if [ "$DEVICE" = cpu ]; then BIG="${DTYPE:-float32}"; MODELS="${MODELS:-tiny smollm2}"
else BIG="${DTYPE:-bfloat16}"; MODELS="${MODELS:-tiny smollm2 llama8b-shape}"; fi

T0=$SECONDS
for m in $MODELS; do
  case $m in
    tiny)          run tiny          float32 35  70  equiv,peak,forward,overhead,memory,profile,search ;;
    smollm2)       run smollm2       "$BIG"  60  110 equiv,peak,forward,overhead,memory,profile,search ;;
    llama8b-shape) run llama8b-shape "$BIG"  120 200 equiv,peak,forward,overhead,memory,profile ;;
    *) echo "== unknown model $m" | tee -a "$LOG" ;;
  esac
done
echo "== all done in $((SECONDS - T0))s" | tee -a "$LOG"

for m in $MODELS; do
  if [ -f "$OUT/$m.json" ]; then "$PY" benchmarks/bench.py --markdown-from "$OUT/$m.json"; echo; fi
done > "$OUT/gpu.md" 2>>"$LOG"
cat "$OUT/gpu.md"
