#!/usr/bin/env bash
# Wheels that scripts/gpu_check.sh installs on a CUDA machine that has torch, transformers and peft but nothing
# else pdray needs on its Ray-free path (Python 3.12, x86-64), into build/gpu-wheels (ignored by git; name it in the
# device call's carry). Versions are this checkout's .venv's. Run from the repo root: scripts/gpu_wheels.sh
# nvdiffrast for its parity test comes from the diffrp-nvdiffrast package (nvdiffrast 0.3.3 repackaged, JIT-built
# with nvcc on first use; non-commercial licence, so only for this check, never a dependency). tinycudann has no
# wheel on the package registry, so its parity test skips there.
set -euo pipefail
dest=build/gpu-wheels
python=${PYTHON:-.venv/bin/python}
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
specs=(diffrp-nvdiffrast==0.3.3.1)
for name in diffusers pydantic pydantic-core annotated-types typing-inspection typing-extensions trimesh; do
  specs+=("$name==$("$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${specs[@]}"
ls -l "$dest"
