"""The mesh stage on the toy prior as Ray tasks: wall time for 1 and 4 particles, judge agreement of each mesh
turntable against the NeRF turntable of the same particle, triangle count, watertightness, texture resolution.

    python benchmarks/mesh_stage.py [--nerf-steps 400] [--run RUN_DIR] [--out DIR] [--set mesh.KEY=VALUE ...]

Without --run it first trains "a red cube" with 4 NeRF particles (default config, local executor). The mesh
stage then runs on a local Ray cluster, once for particle 0 alone and once for particles 0-3; the Ray cluster
is started before both, so the times hold the workers' imports and prior loads but not the cluster's start.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pdray.config import load_config
from pdray.imaging import load_gif
from pdray.priors.diffusion import TOY_MODEL_DIR
from pdray.priors.toyworld.judge import load_judge


def frames(path: Path) -> torch.Tensor:
    """A turntable GIF as [N, 3, H, W] in [0, 1]."""
    return torch.from_numpy(load_gif(path)).permute(0, 3, 1, 2).float() / 255.0


def compare_turntables(run_dir: Path, pid: int, prompt: str, judge) -> dict:
    """Judge the NeRF and mesh turntables of one particle: prompt agreement of each, and how often the judge
    names the same shape and colour for the two renders of the same camera."""
    folder = run_dir / "particles" / f"{pid:02d}"
    nerf, mesh = frames(folder / "turntable.gif"), frames(folder / "mesh" / "turntable.gif")
    nerf_labels, mesh_labels = judge.classify(nerf), judge.classify(mesh)
    same = [
        float(a == b and c == d)
        for a, b, c, d in zip(
            nerf_labels["shape"], mesh_labels["shape"], nerf_labels["colour"], mesh_labels["colour"], strict=True
        )
    ]
    return {
        "nerf_prompt_agreement": float(judge.agreement(nerf, prompt).mean()),
        "mesh_prompt_agreement": float(judge.agreement(mesh, prompt).mean()),
        "same_shape_and_colour": sum(same) / len(same),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nerf-steps", type=int, default=400)
    parser.add_argument("--run", type=Path, help="a finished 4-particle NeRF run to mesh (default: train one)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mesh_stage"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override, e.g. mesh.KEY=V")
    args = parser.parse_args()
    run_dir = args.run
    if run_dir is None:
        from pdray.run.local_executor import run_local

        run_dir = args.out / "nerf"
        nerf_config = load_config(
            "default", ["prompt=a red cube", "particles=4", f"steps={args.nerf_steps}", "executor=local", "wandb=off"]
        )
        started = time.perf_counter()
        run_local(nerf_config, run_dir)
        print(f"NeRF stage: {time.perf_counter() - started:.0f}s", flush=True)
    config = load_config(str(run_dir / "config.yaml"), [*args.overrides, "executor=ray"])

    from pdray.cluster.connect import connect
    from pdray.cluster.mesh_tasks import run_mesh_ray

    connect(config)
    table: dict = {"mesh_config": config.mesh.model_dump(mode="json"), "run": str(run_dir)}
    for ids in ([0], [0, 1, 2, 3]):
        started = time.perf_counter()
        summary = run_mesh_ray(config, run_dir, ids)
        wall = time.perf_counter() - started
        table[f"particles_{len(ids)}"] = {
            "wall_time_s": wall,
            "task_resources": summary["task_resources"],
            "per_task_s": {k: v["wall_time_s"] for k, v in summary["particles"].items()},
            "failed": summary["failed"],
        }
        print(f"mesh stage, {len(ids)} particle(s): {wall:.1f}s {summary['task_resources']}", flush=True)
    one, four = table["particles_1"]["wall_time_s"], table["particles_4"]["wall_time_s"]
    table["speedup_4_vs_1"] = 4 * one / four
    judge = load_judge(TOY_MODEL_DIR / "judge")
    table["particles"] = {}
    for key, result in summary["particles"].items():
        row = {k: result[k] for k in ("triangles", "vertices", "watertight", "texture_size")}
        row |= compare_turntables(run_dir, int(key), config.prompt, judge)
        table["particles"][key] = row
        print(f"particle {key}: {json.dumps(row)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.json").write_text(json.dumps(table, indent=2))
    print(f"4 particles took {four:.1f}s, 1 took {one:.1f}s: {table['speedup_4_vs_1']:.2f}x the throughput")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
