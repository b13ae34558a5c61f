"""Ray executor (R ScoreActor replicas) vs the local executor: seconds per step on the same config and seed, paired.

Each repetition runs the local executor and the Ray executor with every R in --replicas, one after the other in an
order that rotates between repetitions (so neither side always runs first on a warm or a busy machine); the local
run uses every core of this process (torch's threads), each Ray actor the CPUs placement gave it. Reported per
setting: the median seconds per step over repetitions with its min-max spread, and the paired ratio Ray / local of
each repetition (median and range). The Ray runs' start-up (placement group, actors importing torch + diffusers,
priors loaded) is reported apart; the steps leave it out.

python benchmarks/ray_vs_local.py [--steps 40] [--particles 8] [--replicas 1,2] [--repeats 3] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from pdray.config import load_config


def run_once(executor: str, replicas: int, args: argparse.Namespace) -> dict:
    from pdray.cluster.driver import run_ray
    from pdray.run.local_executor import run_local

    config = load_config(
        "default",
        [
            f"particles={args.particles}",
            f"steps={args.steps}",
            "stages=[nerf]",
            "wandb=off",
            f"log_every={args.steps}",
            f"checkpoint_every={args.steps}",
            "eval_views=1",
            f"executor={executor}",
            f"ray.score_replicas={replicas}",
            *args.set,
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        summary = (run_ray if executor == "ray" else run_local)(config, Path(tmp) / "run")
    return {"s_per_step": 1.0 / summary["steps_per_s"], "startup_s": summary.get("startup_s", 0.0)}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--replicas", default="1,2", help="ScoreActor replicas of the Ray runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()

    settings = [("local", 1)] + [("ray", int(r)) for r in args.replicas.split(",")]
    runs: dict[tuple[str, int], list[dict]] = {s: [] for s in settings}
    for rep in range(args.repeats):
        order = settings[rep % len(settings) :] + settings[: rep % len(settings)]
        for executor, replicas in order:
            result = run_once(executor, replicas, args)
            runs[(executor, replicas)].append(result)
            print(json.dumps({"repeat": rep, "executor": executor, "replicas": replicas, **result}), flush=True)

    local = [r["s_per_step"] for r in runs[("local", 1)]]
    print(
        f"\n{args.particles} particles, {args.steps} steps, {args.repeats} paired repetitions; median (min-max)\n"
        f"{'setting':<14}{'s / step':>24}{'Ray / local, paired':>28}{'start-up s':>20}"
    )
    for (executor, replicas), results in runs.items():
        seconds = [r["s_per_step"] for r in results]
        name = "local" if executor == "local" else f"ray R={replicas}"
        ratio = spread([s / ref for s, ref in zip(seconds, local, strict=True)]) if executor == "ray" else "-"
        startup = spread([r["startup_s"] for r in results]) if executor == "ray" else "-"
        print(f"{name:<14}{spread(seconds):>24}{ratio:>28}{startup:>20}")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
