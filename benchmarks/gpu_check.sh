#!/usr/bin/env bash
# The GPU check: fedhog's CUDA tests, then benchmark P5 (K workers sharing one GPU, and the cost of a consensus).
#
#   bash benchmarks/gpu_check.sh            # about 5 minutes on one H100; needs one CUDA GPU
#
# Writes benchmarks/results/p5_gpu.json (RESULTS=DIR to write elsewhere) and logs to LOGS (default: a temp dir).
# P5 runs one repeat of each of its 8 launches here (REPEATS=N for more; each launch takes ~25 s on an H100, most of
# it start-up); `python -m benchmarks --only p5_gpu` is the full measurement with 5 interleaved repeats.
# Uses .venv/bin/python when `make setup` made one, else python3 with this checkout on PYTHONPATH (a machine where
# torch and lightning are installed but fedhog is not). Each part has its own time limit, and the P5 run goes
# ahead when a test fails, so one run shows everything; the exit status is non-zero when any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
RESULTS=${RESULTS:-benchmarks/results}
LOGS=${LOGS:-$(mktemp -d -t fedhog-gpu-check-XXXX)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
mkdir -p "$LOGS" "$RESULTS"
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch, lightning; print("torch", torch.__version__, "cuda", torch.version.cuda, "lightning",
lightning.__version__, "gpus", torch.cuda.device_count())' || exit 1
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: nothing to check")' || exit 1

# each test launches 1-4 processes that spend most of their ~35 s starting (imports, CUDA contexts): run all 8 at once
# where pytest-xdist is installed, so the longest (resume: two launches, ~65 s) sets the pace. On one H100, 8 at a time
# took 101 s (4 at a time: 144 s); the GPU has room for the ~22 processes' contexts.
parallel=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 8")
echo "== GPU tests (limit 150 s) ${parallel:-one at a time}"
began=$SECONDS
timeout -k 5 150 "$PY" -m pytest -m gpu tests/test_gpu.py -v -rP --durations=0 -p no:cacheprovider $parallel 2>&1 \
    | tee "$LOGS/tests.log"
code=${PIPESTATUS[0]}
echo "== GPU tests: exit $code after $((SECONDS - began)) s"
[ "$code" -eq 0 ] || status=1

echo "== P5 (limit 330 s)"
began=$SECONDS
timeout -k 5 330 "$PY" -m benchmarks --only p5_gpu --repeats "${REPEATS:-1}" --output "$RESULTS" 2>&1 \
    | tee "$LOGS/p5.log"
code=${PIPESTATUS[0]}
echo "== P5: exit $code after $((SECONDS - began)) s; $RESULTS/p5_gpu.json"
[ "$code" -eq 0 ] || status=1
echo "logs: $LOGS"
exit $status
