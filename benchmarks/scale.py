"""Scale-out on a real local Ray cluster: seconds per step per particle, driver and actor memory, and bytes moved
per step, as the particle count grows (the paper's appendix H runs 2D VSD with 2048 particles).

Each particle count runs in its own process (`pdray run`'s code path: run_ray, with checkpoints and the final
evaluation) so its driver memory is its own. Per count it prints:
- s/step/particle: the median of metrics.jsonl's time/step after the first two steps, over the particle count;
- driver RSS while the steps run (sampled every 0.2 s over the steps before the midway checkpoint's evaluation)
  and the driver's peak over the whole run, which includes the two evaluations (each reads every particle's
  views from disk and judges them);
- the particle actors' and the score actor's peak RSS (summary.json's actor_memory);
- bytes/step: the tensors one step's calls return (renders and per-camera moments, gradients; metrics.jsonl);
- the checkpoint's size on disk and how many shards it has.

    python benchmarks/scale.py [--particles 8,64,512,2048] [--steps 12] [--config image2d] [--set k=v ...]
    python benchmarks/scale.py --config default --particles 8,32,64 --steps 6       # 3D NeRF particles
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def measure(particles: int, steps: int, config_name: str, overrides: list[str], run_dir: Path) -> dict:
    """One run in this process; returns its numbers."""
    import psutil

    from pdray.cluster.driver import run_ray
    from pdray.config import load_config
    from pdray.vsd.checkpoint import checkpoint_folder, read_manifest

    every = max(2, steps // 2)
    config = load_config(
        config_name,
        [
            f"particles={particles}",
            f"steps={steps}",
            "executor=ray",
            "wandb=off",
            "log_every=1",
            f"checkpoint_every={every}",  # one checkpoint (and evaluation) midway, one at the end
            *overrides,
        ],
    )
    metrics, me, rss, done = run_dir / "metrics.jsonl", psutil.Process(), [], threading.Event()

    def sample() -> None:
        while not done.is_set():
            logged = len(metrics.read_text().splitlines()) if metrics.exists() else -1
            if 0 <= logged < every - 1:  # the steps before the midway checkpoint's evaluation starts
                rss.append(me.memory_info().rss)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    summary = run_ray(config, run_dir)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    step_times = [r["time/step"] for r in records[2:]] or [r["time/step"] for r in records]
    folder = checkpoint_folder(run_dir)
    memory = summary["actor_memory"]
    actors = [m["peak_rss_mb"] for name, m in memory.items() if name.startswith("particles_")]
    return {
        "particles": particles,
        "config": config_name,
        "steps": steps,
        "actors": len(summary["placement"]["actors"]),
        "s_per_step": statistics.median(step_times),
        "s_per_step_per_particle": statistics.median(step_times) / particles,
        "driver_rss_steps_mb": max(rss) / 2**20 if rss else None,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "particle_actor_peak_rss_mb": max(actors),
        "score_actor_peak_rss_mb": max(m["peak_rss_mb"] for n, m in memory.items() if n.startswith("score")),
        "bytes_per_step": statistics.median(r["bytes/step"] for r in records),
        "checkpoint_mb": sum(p.stat().st_size for p in folder.iterdir()) / 2**20,
        "checkpoint_shards": len(read_manifest(folder)["particles"]),
        "wall_s": wall,
        "unet_s_per_step": summary["time_per_step_s"].get("unet"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--particles", default="8,64,512,2048")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--config", default="image2d")
    parser.add_argument("--prompt", default="a cube")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=None, help="a JSON file for the rows (default: results/)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child: one particle count
    args = parser.parse_args()
    overrides = [f"prompt={args.prompt}", *args.overrides]
    if args.one is not None:
        with tempfile.TemporaryDirectory(prefix="pdray-scale-") as tmp:
            row = measure(args.one, args.steps, args.config, overrides, Path(tmp) / "run")
        print("ROW " + json.dumps(row), flush=True)
        return
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    rows = []
    header = (
        f"{'P':>5}{'actors':>7}{'s/step':>9}{'ms/step/particle':>18}{'driver MB':>11}{'driver peak':>13}"
        f"{'actor MB':>10}{'score MB':>10}{'KB/step':>10}{'ckpt MB':>9}{'shards':>8}"
    )
    print(f"{args.config}, {args.prompt!r}, {args.steps} steps, {os.cpu_count()} CPUs\n{header}", flush=True)
    for p in [int(x) for x in args.particles.split(",")]:
        command = [sys.executable, __file__, "--one", str(p), "--steps", str(args.steps), "--config", args.config]
        command += ["--prompt", args.prompt, *(f"--set={o}" for o in args.overrides)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if done.returncode or not lines:
            print(f"P={p} failed (rc {done.returncode}):\n{done.stderr[-3000:]}", flush=True)
            break
        row = json.loads(lines[0][4:])
        rows.append(row)
        print(
            f"{p:>5}{row['actors']:>7}{row['s_per_step']:>9.2f}{1e3 * row['s_per_step_per_particle']:>18.2f}"
            f"{row['driver_rss_steps_mb']:>11.0f}{row['driver_peak_rss_mb']:>13.0f}"
            f"{row['particle_actor_peak_rss_mb']:>10.0f}{row['score_actor_peak_rss_mb']:>10.0f}"
            f"{row['bytes_per_step'] / 1024:>10.1f}{row['checkpoint_mb']:>9.2f}{row['checkpoint_shards']:>8}",
            flush=True,
        )
    out = args.out or RESULTS / f"scale_{args.config}.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"rows: {out}")


if __name__ == "__main__":
    main()
