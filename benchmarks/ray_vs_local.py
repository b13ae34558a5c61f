"""Ray executor vs local executor: steps/s for 1, 2, 4 and 8 particles, same config and seed; and the Ray run's
start-up (placement group, actor processes importing torch + diffusers, priors loaded), which steps/s leaves out.

python benchmarks/ray_vs_local.py [--steps 20] [--particles 1,2,4,8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from pdray.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--particles", default="1,2,4,8")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    from pdray.cluster.driver import run_ray
    from pdray.local_executor import run_local

    rows = []
    for n in [int(p) for p in args.particles.split(",")]:
        row = {"particles": n}
        for executor, fn in (("local", run_local), ("ray", run_ray)):
            config = load_config(
                "default",
                [
                    f"particles={n}",
                    f"steps={args.steps}",
                    "wandb=off",
                    f"log_every={args.steps}",
                    f"checkpoint_every={args.steps}",
                    "eval_views=1",
                    f"executor={executor}",
                    *args.set,
                ],
            )
            with tempfile.TemporaryDirectory() as tmp:
                summary = fn(config, Path(tmp) / "run")
            row[f"{executor}_steps_per_s"] = summary["steps_per_s"]
            row[f"{executor}_time_per_step_s"] = summary["time_per_step_s"]
            if executor == "ray":
                row["ray_startup_s"] = summary["startup_s"]
        row["ray_overhead"] = row["local_steps_per_s"] / row["ray_steps_per_s"] - 1
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'particles':>9}{'local steps/s':>15}{'ray steps/s':>13}{'ray overhead':>14}{'ray start-up':>14}")
    for r in rows:
        print(
            f"{r['particles']:>9}{r['local_steps_per_s']:>15.3f}{r['ray_steps_per_s']:>13.3f}{r['ray_overhead']:>13.0%}"
            f"{r['ray_startup_s']:>13.1f}s"
        )


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
