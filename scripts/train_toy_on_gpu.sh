#!/usr/bin/env bash
# Train the toy prior on one CUDA GPU, then benchmark it, in one go: how the shipped weights were made.
# Same code as `pdray prior train-toy` (called through Python, so typer need not be installed on the GPU box).
# Usage: scripts/train_toy_on_gpu.sh OUT_DIR [UNET_MINUTES]. Into OUT_DIR go only a few files: the prior as a
# tar split into parts under 16 MB (prior.tar.part-*), the benchmark's report.json and its CFG 7.5 samples.
# Reassemble with: cat prior.tar.part-* | tar -xf - -C DIR
set -euo pipefail
out=$1
minutes=${2:-6.5}
work=${WORK:-$(mktemp -d)}
mkdir -p "$out" "$work"
python3 -c "import diffusers" 2>/dev/null || python3 -m pip install -q --no-deps .whl/*.whl
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TQDM_MININTERVAL=30
device=${DEVICE:-cuda}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 - "$work/prior" "$minutes" "$device" <<'PY'
import json, sys
from pathlib import Path
from pdray.priors.toyworld.train import ToyTrainConfig, train_toy_prior
small = sys.argv[3] == "cpu"  # a smoke test of this script on a CPU machine
cfg = ToyTrainConfig(
    pool_size=1000 if small else 60000, render_chunk=500 if small else 4000,
    vae_steps=100 if small else 3000, vae_batch_size=128,
    unet_steps=4 if small else 100000, unet_batch_size=256, unet_lr=5e-4,
    judge_steps=40 if small else 4000, judge_batch_size=256,
    max_minutes=float(sys.argv[2]), device=sys.argv[3], bf16=not small,
)
print(json.dumps(train_toy_prior(Path(sys.argv[1]), cfg), indent=2), flush=True)
PY
tar -C "$work" -cf - prior | split -b 15m - "$out/prior.tar.part-"
[ "${BENCH:-1}" = 0 ] && exit 0  # the benchmark needs pdray's own dependencies (pydantic) installed
python3 benchmarks/toy_prior.py --model "$work/prior" --device "$device" --out "$work/bench" \
  --samples-per-prompt "${SAMPLES:-32}" --steps "${STEPS:-50}"
cp "$work/bench/report.json" "$out/report.json"
cp "$work/bench/samples_cfg7.5.png" "$out/samples_cfg7.5.png"
