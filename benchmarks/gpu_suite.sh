#!/usr/bin/env bash
# Run hutch's GPU checks and benchmarks in one go; the step limits add up to 750 s.
#
# Meant for a machine with one CUDA GPU and torch, scikit-learn and pytest
# already installed, where nothing can be downloaded: hutch runs from this
# checkout through PYTHONPATH, and the peers are measured only if installed.
# Every step has its own time limit, so a slow step cannot starve the others.
# Results and a log go to OUT (default: benchmarks/results), the JSON files
# named by device as the scripts always do.
#
#   bash benchmarks/gpu_suite.sh            # on the GPU machine
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_suite.sh   # a dry run of the steps on a CPU
set -u

cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-benchmarks/results}"
PYTHON="${PYTHON:-python3}"
QUICK="${QUICK:-0}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="$OUT/gpu-suite-$DEVICE.log"
: >"$LOG"

if [ "$QUICK" = 1 ]; then
    matvecs=4; resnet_matvecs=2; repeats=1; workloads=mlp
else
    matvecs=100; resnet_matvecs=100; repeats=3; workloads=mlp,cnn,transformer
fi

step() {
    # step SECONDS NAME COMMAND...: run COMMAND with a time limit and record how it ended.
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s)" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local status=$?
    echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$LOG"
}

step 60 "environment" "$PYTHON" -c "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
# The whole test suite: its CUDA tests run only where CUDA is present.
step 240 "tests" "$PYTHON" -m pytest -q -x -p no:cacheprovider tests
step 180 "compare, small workloads" "$PYTHON" benchmarks/compare.py --device "$DEVICE" \
    --workloads "$workloads" --repeats "$repeats" --num-matvecs "$matvecs" --out "$OUT"
step 150 "compare, ResNet-18" "$PYTHON" benchmarks/compare.py --device "$DEVICE" --workloads resnet18 \
    --resnet18-matvecs "$resnet_matvecs" --resnet18-repeats "$repeats" --tag resnet18 \
    --methods gradients,hutch,raw:double-backward,peer --out "$OUT"
step 120 "product cost" "$PYTHON" benchmarks/product_cost.py --device "$DEVICE" --workloads "$workloads" \
    --repeats "$repeats" --num-matvecs "$((matvecs < 50 ? matvecs : 50))" --out "$OUT"
echo "log: $LOG"
