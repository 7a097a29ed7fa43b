#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu/README.md): runs on the GPU host, in the
# repository root of a copy of the checkout with benchmarks/gpu/payload carried.
# Writes into $OUT: check.log, summary.json and one <dataset>_<preset>.npz per run
# (at most 6 files). Environment: DEVICE (cuda), BUDGET (s for the app runs, 420),
# PRESETS ("fast paper"), EPOCHS (epoch budget of every run; default: the presets'),
# OVERRIDES (space-separated KEY=VALUE engine overrides of every INR run, e.g.
# "precision=bfloat16"), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
PAYLOAD=benchmarks/gpu/payload
OUT=${OUT:-/tmp/mcsr-gpu-check}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-420}
PRESETS=${PRESETS:-fast paper}
PYTHON=${PYTHON:-python3}
RUN_ARGS=()
[ -n "${EPOCHS:-}" ] && RUN_ARGS=(--epochs "$EPOCHS")
for item in ${OVERRIDES:-}; do RUN_ARGS+=(--override "$item"); done
mkdir -p "$OUT"
LOG="$OUT/check.log"
if [ ! -f "$PAYLOAD/manifest.json" ]; then
    echo "no $PAYLOAD/manifest.json; fix: run 'python -m bids_mcsr.benchmark.gpu prepare' first" >&2
    exit 2
fi
if compgen -G "$PAYLOAD/wheels/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/mcsr-site "$PAYLOAD"/wheels/*.whl > "$LOG" 2>&1 || { cat "$LOG"; exit 3; }
    export PYTHONPATH="/tmp/mcsr-site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    # The CUDA unit tests (seconds); they skip on a machine without CUDA.
    "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/test_gpu.py 2>&1 | tail -5
} >> "$LOG" 2>&1
# shellcheck disable=SC2086  # PRESETS is a list
"$PYTHON" -m bids_mcsr.benchmark.gpu run --payload "$PAYLOAD" --out "$OUT" \
    --device "$DEVICE" --budget "$BUDGET" --presets $PRESETS "${RUN_ARGS[@]}" >> "$LOG" 2>&1
code=$?
tail -20 "$LOG"
exit $code
