#!/usr/bin/env bash
# GPU check (CUDA machine with pdray installed): a short 8-particle Ray run on the toy prior; prints steps/s
# and the peak GPU memory of every actor. Usage: scripts/gpu_check.sh [OUT_DIR]
set -euo pipefail
out=${1:-$(mktemp -d)/gpu-check}
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
pdray run --executor ray --particles 8 --prompt "a cube" --steps 30 --stages nerf --wandb off \
  --set log_every=10 --set checkpoint_every=30 --out "$out"
python3 - "$out/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"steps/s: {s['steps_per_s']:.3f}   placement: {s['placement']['actors']}")
for name, m in s["actor_memory"].items():
    print(f"{name:<14} pid {m['pid']:<8} peak GPU {m['peak_cuda_mb']:8.1f} MB   peak RSS {m['peak_rss_mb']:8.1f} MB")
PY
