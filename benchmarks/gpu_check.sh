#!/usr/bin/env bash
# Prepared GPU check (benchmarks/gpu_check.py): Triton kernels compiled and checked in fp32/bf16/fp16, one layer
# timed at LLaMA-2-7B shapes, a bf16 training step of a ~1 B LLaMA-like model (molora ▽ vs PEFT LoRA r8).
#
#   bash benchmarks/gpu_check.sh                 # one NVIDIA GPU; torch, transformers, triton, peft installed
#   bash benchmarks/gpu_check.sh --tiny          # toy sizes, any machine (CPU: Triton under the interpreter)
#
# Installs molora from this checkout without its dependencies (nothing is downloaded; the packages above are
# all it needs), writes runs/bench/gpu_check-<time>/ (--out DIR; --publish: benchmarks/results/) and exits non-zero
# when a correctness case fails. Under 8 minutes on an H100/H200.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
for pkg in torch transformers triton peft; do
  "$PY" -c "import $pkg" 2>/dev/null || { echo "gpu_check: $pkg is not installed" >&2; exit 2; }
done
if ! "$PY" -c "import molora, molora_kernels" 2>/dev/null; then
  "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null \
    || export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1   # no GPU: the Triton kernels run under the interpreter (only sensible with --tiny)
fi
exec "$PY" benchmarks/gpu_check.py "$@"
