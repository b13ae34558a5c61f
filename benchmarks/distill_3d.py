"""3D distillation on the toy prior with the local executor: wall time, judge agreement, diversity, time split.

    python benchmarks/distill_3d.py [--steps 400] [--out DIR]

Runs "a red cube" with 4 particles (VSD, default config), then "a cube" with 8 particles, VSD vs SDS at 7.5.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pdray.config import load_config
from pdray.run.local_executor import run_local


def run(name: str, out: Path, overrides: list[str]) -> dict:
    summary = run_local(load_config("default", [*overrides, "wandb=off"]), out / name)
    keys = (
        "wall_time_s",
        "steps_per_s",
        "judge_agreement",
        "colour_entropy_fraction",
        "diversity",
        "judged_colours",
        "time_per_step_s",
    )
    row = {k: summary.get(k) for k in keys}
    print(name, json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", default="benchmarks/results/distill_3d")
    parser.add_argument("--skip-diversity", action="store_true", help="only the 4-particle 'a red cube' run")
    parser.add_argument("--skip-fidelity", action="store_true", help="only the 8-particle 'a cube' runs")
    args = parser.parse_args()
    out = Path(args.out)
    rows = {}
    if not args.skip_fidelity:
        overrides = ["prompt=a red cube", "particles=4", f"steps={args.steps}"]
        rows["red_cube_vsd_x4"] = run("red_cube_vsd_x4", out, overrides)
    if not args.skip_diversity:
        for guidance in ("vsd", "sds"):
            rows[f"cube_{guidance}_x8"] = run(
                f"cube_{guidance}_x8",
                out,
                ["prompt=a cube", "particles=8", f"steps={args.steps}", f"guidance={guidance}", "cfg=7.5"],
            )
    (out / "table.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
