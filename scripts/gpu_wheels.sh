#!/usr/bin/env bash
# Wheels that scripts/gpu_check.sh installs (pip --target, no network) on a CUDA machine that has torch, transformers,
# peft, huggingface_hub, safetensors and tokenizers but nothing else pdray needs on its Ray-free path: a wheel of
# pdray itself (its configs and the toy prior's weights inside) and one wheel of each missing package, at the
# versions of this checkout's .venv. Run from the repo root, with network to the package registry:
#   scripts/gpu_wheels.sh                                       # cp312 for the GPU machine, into build/gpu-wheels
#   WHEELS_PYTHON_VERSION=3.11 WHEELS_DEST=build/twin-wheels \
#     WHEELS_EXTRA="requests urllib3 charset-normalizer" scripts/gpu_wheels.sh   # the CPU twin of that machine
# Variables: WHEELS_DEST (folder, emptied of wheels first; build/ is ignored by git, so name it in the device call's
# carry), WHEELS_PYTHON_VERSION (3.12), WHEELS_PLATFORMS (manylinux x86-64 tags, space-separated), WHEELS_EXTRA (more
# names, NAME or NAME==VERSION, for a machine that lacks more than the GPU machine does), PYTHON (the interpreter whose
# pip downloads and whose installed versions are pinned: .venv/bin/python).
# nvdiffrast comes from the diffrp-nvdiffrast package (nvdiffrast 0.3.3 repackaged, JIT-built with nvcc on first use;
# non-commercial licence, so only for the parity check, never a dependency) and nerfacc 0.5.3 is pure Python (it
# JIT-builds its CUDA code with nvcc on first use). tinycudann has no wheel on the package registry, so its parity test
# skips there. The GPU machine already has requests, rich (nerfacc's need), torchmetrics and lightning-utilities.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${WHEELS_DEST:-build/gpu-wheels}
python=${PYTHON:-.venv/bin/python}
pyver=${WHEELS_PYTHON_VERSION:-3.12}
read -r -a tags <<<"${WHEELS_PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64}"
read -r -a extra <<<"${WHEELS_EXTRA:-}"

mkdir -p "$dest"
rm -f "$dest"/*.whl # one version of each package: two stop the whole install

# 1. pdray, built from a staging copy of what git would send (tracked and untracked-not-ignored files), so that no
#    stale file of an earlier build (build/lib) and nothing ignored gets into the wheel.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
git ls-files -z -co --exclude-standard -- pyproject.toml README.md pdray cli configs |
  while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done |
  xargs -0 cp --parents -t "$stage"
"$python" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w "$dest" "$stage"
"$python" - "$stage" "$dest"/pdray-*.whl <<'PY'
"""Every module, config and toy prior weight of the source is in the wheel."""
import sys, zipfile
from pathlib import Path

stage, wheel = Path(sys.argv[1]), sys.argv[2]
names = set(zipfile.ZipFile(wheel).namelist())
where = {"pdray": "pdray", "cli": "pdray/cli", "configs": "pdray/configs"}
want = [
    f"{where[p.relative_to(stage).parts[0]]}/{Path(*p.relative_to(stage).parts[1:])}"
    for top in where
    for p in sorted((stage / top).rglob("*"))
    if p.is_file() and p.suffix in {".py", ".yaml", ".json", ".safetensors"}
]
missing = [n for n in want if n not in names]
if missing:
    sys.exit(f"the pdray wheel lacks {len(missing)} files of the source, e.g. {missing[:5]} (pyproject.toml)")
print(f"pdray wheel: {len(want)} source files, configs and toy prior weights all inside")
PY

# 2. every package the GPU machine lacks for pdray's Ray-free path, pinned to .venv's versions.
version() { "$python" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
specs=(nerfacc==0.5.3 diffrp-nvdiffrast==0.3.3.1)
for name in diffusers pydantic pydantic-core annotated-types typing-inspection typing-extensions trimesh xatlas \
  "${extra[@]}"; do
  case $name in *==*) specs+=("$name") ;; *) specs+=("$name==$(version "$name")") ;; esac
done
platforms=()
for tag in "${tags[@]}"; do platforms+=(--platform "$tag"); done
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  "${platforms[@]}" -d "$dest" "${specs[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

ls -l "$dest"
echo "wheels: $(du -cb "$dest"/*.whl | tail -1 | cut -f1) bytes in $dest"
checkout=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total=$((checkout + $(du -cb "$dest"/*.whl | tail -1 | cut -f1)))
echo "checkout (what git sends) $checkout bytes; with the wheels $total bytes of the 67108864 (64 MiB) that may travel"
if [ "$total" -gt 60000000 ]; then
  echo "warning: checkout and wheels leave under 4 MiB of the 64 MiB travel limit" >&2
fi
