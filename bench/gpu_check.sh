#!/usr/bin/env bash
# The GPU check, for a machine with one NVIDIA GPU (an H100/H200-class card runs it in under 8 minutes; see
# bench/README.md). Three steps, each logged with its time:
#   1. the gpu-marked tests (pytest -m gpu), among them tests/test_device_parity.py: a --device cuda merge
#      writes the bytes of the CPU merge of the same inputs;
#   2. bench/router_bench.py --device cuda --preset 7b: switch, load, forward and expansion timings on a
#      Llama-2-7B-shaped LLM in bf16, with the switch's memory floor measured in the same run; results in
#      bench/results/router_bench_cuda_7b.{json,md};
#   3. a summary: bench/results/gpu_check.log holds everything this script printed.
#
# Python: the interpreter of an active virtual environment ($VIRTUAL_ENV) or $PYTHON when set, as is (it must
# have a CUDA build of torch and mmer installed: pip install -e ".[test]"); otherwise .venv-gpu/, created here
# the way .ci/run creates .venv-ci/ but with PyPI's default (CUDA) torch wheel. Creating it downloads about
# 3 GB and is not counted in the 8 minutes; later runs reuse it.
#
#   bash bench/gpu_check.sh                 # all three steps
#   REPEATS=3 bash bench/gpu_check.sh       # router_bench's --repeats (default 3)
#   SKIP_BENCH=1 bash bench/gpu_check.sh    # the tests only
set -euo pipefail
cd "$(dirname "$0")/.."

mkdir -p bench/results
LOG=bench/results/gpu_check.log
exec > >(tee "$LOG") 2>&1

if [ -n "${PYTHON:-}" ]; then
    :
elif [ -n "${VIRTUAL_ENV:-}" ]; then
    PYTHON="$VIRTUAL_ENV/bin/python"
else
    if [ ! -x .venv-gpu/bin/python ]; then
        python3 -m venv .venv-gpu
        .venv-gpu/bin/python -m pip install --quiet --upgrade pip
        .venv-gpu/bin/python -m pip install --quiet torch==2.13.0
        .venv-gpu/bin/python -m pip install --quiet -e ".[test]"
    fi
    PYTHON=.venv-gpu/bin/python
fi

started=$SECONDS
step() { echo; echo "=== $1 ($((SECONDS - started)) s in)"; }

step "machine"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
git log -1 --format='mmer at %h (%cs)' 2>/dev/null || true
"$PYTHON" - <<'EOF'
import sys

import torch

print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch: this check needs one (and a CUDA build of torch)")
print(f"GPU 0: {torch.cuda.get_device_name(0)}")
EOF

status=0
step "1. the gpu-marked tests (includes the CPU-versus-CUDA merge byte check)"
"$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -rs tests || status=1

if [ -z "${SKIP_BENCH:-}" ]; then
    step "2. router_bench.py --device cuda --preset 7b"
    "$PYTHON" bench/router_bench.py --device cuda --preset 7b --repeats "${REPEATS:-3}" || status=1
fi

step "done"
echo "total $((SECONDS - started)) s; exit status $status; log in $LOG"
exit "$status"
