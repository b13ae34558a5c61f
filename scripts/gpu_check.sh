#!/usr/bin/env bash
# GPU check, in one call of at most 8 minutes, from the repo root of a CUDA machine that has torch, transformers and
# peft but neither Ray nor pdray installed (pdray runs from this folder on PYTHONPATH):
#   1. nvidia-smi, versions, and the backends pdray selects there;
#   2. the parity tests of the accelerated backends (tinycudann vs the torch hash grid, nvdiffrast vs the torch
#      rasteriser; each skips with its reason where its backend does not import), numbers into OUT/parity.jsonl,
#      and the score-replica parity (two replicas' sharded scores and LoRA all-reduce equal one replica's, bit for
#      bit, tests/test_replicas.py) on this device;
#   3. benchmarks/gpu_step.py at 512 px, fp16, 1, 2 and 4 particles: per-component times, peak memory and the
#      weak-scaling projection, into OUT/gpu_step.{json,md}.
# Wheels in build/gpu-wheels (made by scripts/gpu_wheels.sh: diffusers, pydantic, trimesh, nvdiffrast...) are
# installed into a temporary folder first. Usage: scripts/gpu_check.sh [OUT_DIR] (default: $OUT, else a temp dir).
set -uo pipefail
out=${1:-${OUT:-$(mktemp -d)}}
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
end=$((SECONDS + 470)) # 8 minutes, less a margin for the summary
python=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
# nvdiffrast compiles its CUDA plugin on first use: for this GPU only, with the interpreter's ninja on PATH.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/pdray-torch-extensions} MAX_JOBS=${MAX_JOBS:-16}
PATH="$("$python" -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH"

site=$(mktemp -d)
if compgen -G "build/gpu-wheels/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" build/gpu-wheels/*.whl ||
    echo "installing build/gpu-wheels failed"
else
  echo "no build/gpu-wheels (scripts/gpu_wheels.sh makes them): using what is installed"
fi
export PYTHONPATH=".:$site${PYTHONPATH:+:$PYTHONPATH}"

echo "== nvidia-smi"
nvidia-smi || echo "nvidia-smi failed"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$python" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)
  export TORCH_CUDA_ARCH_LIST
fi

echo "== versions and backends"
"$python" - <<'PY'
import importlib
import torch
for name in ("torch", "diffusers", "transformers", "peft", "pydantic", "pytest", "tinycudann", "nvdiffrast"):
    try:
        print(f"{name:<13}", getattr(importlib.import_module(name), "__version__", "installed"))
    except Exception as error:
        print(f"{name:<13} not importable ({type(error).__name__})")
print("cuda         ", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "")
from pdray.geometry.hashgrid import encoding_backend_name, tcnn_unavailable_reason
from pdray.render.raster import backend_name, nvdiffrast_unavailable_reason
print("hash grid    ", encoding_backend_name("auto"), tcnn_unavailable_reason() or "")
print("rasteriser   ", backend_name("auto"), nvdiffrast_unavailable_reason() or "")
PY

echo "== parity tests"
if "$python" -c "import pytest" 2>/dev/null; then
  PDRAY_PARITY_OUT="$out" timeout 210 "$python" -m pytest -q -rs -p no:cacheprovider tests/test_hashgrid.py tests/test_raster.py
  echo "pytest exit code $?"
  timeout 90 "$python" -m pytest -q -rs -p no:cacheprovider tests/test_replicas.py
  echo "replica parity pytest exit code $?"
else
  echo "pytest is not installed: parity tests not run"
fi

echo "== benchmarks/gpu_step.py (512 px, fp16, 1, 2, 4 particles)"
left=$((end - SECONDS))
timeout "$left" "$python" benchmarks/gpu_step.py --resolution 512 --dtype fp16 --particles 1,2,4 \
  --prior-dir /tmp/pdray-sd21 --out "$out"
echo "gpu_step exit code $? (time left was ${left} s)"

echo "== parity numbers"
cat "$out/parity.jsonl" 2>/dev/null || echo "none recorded (every parity test skipped or failed before recording)"
echo "== done in ${SECONDS} s; files in $out"
