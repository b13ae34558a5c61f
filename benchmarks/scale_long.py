"""The paper's appendix H at toy scale: 2D VSD with many particles (2048 by default), run to its end through the real
CLI, stopped by SIGINT midway and resumed, then the particles' diversity against the prior's own samples.

1. ``pdray run --config image2d --particles P ...`` in a subprocess; SIGINT once ``--stop-at`` steps are logged
   (the run checkpoints the step in flight and exits with 130);
2. ``pdray resume RUN``, to the end; through both, each checkpoint's evaluation (eval.json) is recorded as it is
   written, a curve of how the colours settle;
3. the particles' views from disk (particles/NN/views.png) and ``--samples`` DDIM samples of the prior (CFG 7.5),
   scored alike (``pdray.evaluation.quality.set_quality``): colour entropy (fraction of the maximum), distinct hues,
   hue entropy, saturation, brightness, haze, judge agreement, and the KID of each set to a second, independent
   draw of samples (the samples' own KID is the floor).

Prints the curve and the table and writes ``--out``/table.json and a sheet (64 particles on top, 64 samples below).

    python benchmarks/scale_long.py [--particles 2048] [--steps 150] [--stop-at 60] [--samples 512] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from pdray.evaluation.evaluate import load_views
from pdray.evaluation.quality import set_quality
from pdray.imaging import save_png
from pdray.priors.diffusion import TOY_MODEL_DIR, DiffusionPrior
from pdray.priors.sampling import image_grid, sample_images
from pdray.priors.toyworld.judge import load_judge
from pdray.vsd.checkpoint import checkpoint_folder, checkpoint_step, read_manifest

PDRAY = [str(Path(sys.executable).with_name("pdray"))]  # the installed command, as a user runs it
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def image2d_run(args: argparse.Namespace, run_dir: Path, overrides: list[str]) -> list[str]:
    """``pdray run --config image2d`` for ``args``' particles, prompt, steps and checkpoint interval, W&B off."""
    command = [*PDRAY, "run", "--config", "image2d", "--particles", str(args.particles), "--prompt", args.prompt]
    command += ["--steps", str(args.steps), "--out", str(run_dir)]
    for override in [f"checkpoint_every={args.checkpoint_every}", "wandb=off", *overrides]:
        command += ["--set", override]
    return command


COLUMNS = ("colour_entropy_fraction", "distinct_hues", "hue_entropy", "saturation", "brightness", "haze", "agreement")


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


CURVE = ("colour_entropy_fraction", "distinct_hues", "saturation", "brightness", "haze", "judge_agreement")


def watch(proc: subprocess.Popen, run_dir: Path, curve: dict[int, dict], stop_at: int | None = None) -> int:
    """Wait for ``proc`` (SIGINT once ``stop_at`` steps are logged), recording each checkpoint's evaluation
    (eval.json, rewritten atomically at every checkpoint) into ``curve``; returns its exit code."""
    while proc.poll() is None:
        if stop_at is not None and logged_steps(run_dir) >= stop_at:
            proc.send_signal(signal.SIGINT)
            stop_at = None
        record_evaluation(run_dir, curve)
        time.sleep(1.0)
    record_evaluation(run_dir, curve)
    return proc.returncode


def record_evaluation(run_dir: Path, curve: dict[int, dict]) -> None:
    try:
        report = json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return
    metrics = report["stages"]["nerf"]["metrics"]
    curve.setdefault(int(report["step"]), {k: metrics[k] for k in CURVE if k in metrics})


def run_with_stop(args: argparse.Namespace, run_dir: Path, env: dict, curve: dict[int, dict]) -> dict:
    """pdray run, SIGINT at --stop-at logged steps, pdray resume; returns what each phase did. Each checkpoint's
    evaluation goes into ``curve`` (step -> metrics): how the colours settle."""
    command = image2d_run(args, run_dir, ["log_every=1"])
    started = time.perf_counter()
    log = (run_dir.parent / "run.log").open("w")
    run = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    first_rc = watch(run, run_dir, curve, args.stop_at)
    first_s = time.perf_counter() - started
    stopped_at = checkpoint_step(run_dir)
    print(
        f"pdray run: SIGINT after {logged_steps(run_dir)} logged steps -> rc {first_rc}, checkpoint at step "
        f"{stopped_at}, {first_s:.0f} s",
        flush=True,
    )
    started = time.perf_counter()
    resume = subprocess.Popen([*PDRAY, "resume", str(run_dir)], env=env, stdout=log, stderr=subprocess.STDOUT)
    resume_rc = watch(resume, run_dir, curve)
    resume_s = time.perf_counter() - started
    folder = checkpoint_folder(run_dir)
    manifest = read_manifest(folder)
    print(
        f"pdray resume: rc {resume_rc}, {resume_s:.0f} s, last checkpoint at step {manifest['step']} "
        f"({len(manifest['particles'])} shards, {sum(p.stat().st_size for p in folder.iterdir()) / 2**20:.1f} MB)",
        flush=True,
    )
    return {
        "stop_rc": first_rc,
        "stopped_at": stopped_at,
        "first_s": first_s,
        "resume_rc": resume_rc,
        "resume_s": resume_s,
        "final_step": manifest["step"],
        "shards": len(manifest["particles"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--particles", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--stop-at", type=int, default=60)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--samples", type=int, default=512, help="prior samples per reference set")
    parser.add_argument("--prompt", default="a cube")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale_long")
    args = parser.parse_args()
    run_dir = args.out / "run"
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists: give another --out")
    args.out.mkdir(parents=True, exist_ok=True)
    curve: dict[int, dict] = {}
    phases = run_with_stop(args, run_dir, ENV, curve)
    print("step " + "".join(f"{c[:12]:>14}" for c in CURVE), flush=True)
    for step, metrics in sorted(curve.items()):
        print(f"{step:>4} " + "".join(f"{metrics.get(c, float('nan')):>14.3f}" for c in CURVE), flush=True)
    summary = json.loads((run_dir / "summary.json").read_text())

    judge = load_judge(TOY_MODEL_DIR / "judge")
    prior = DiffusionPrior("toyworld", device="cpu")
    started = time.perf_counter()
    samples = sample_images(prior, [args.prompt] * args.samples, cfg=7.5, seed=1000, progress=False)
    reference = sample_images(prior, [args.prompt] * args.samples, cfg=7.5, seed=2000, progress=False)
    sampling_s = time.perf_counter() - started
    views = load_views(run_dir)
    particles = set_quality(list(views.values()), args.prompt, judge, reference)
    prior_row = set_quality(list(samples.unsqueeze(1)), args.prompt, judge, reference)
    rows = {"VSD particles": particles, "prior samples": prior_row}
    header = f"{'set':<15}{'n':>6}" + "".join(f"{c[:12]:>14}" for c in COLUMNS) + f"{'KID':>9}"
    lines = [header]
    for name, row in rows.items():
        n = len(views) if name.startswith("VSD") else args.samples
        lines.append(f"{name:<15}{n:>6}" + "".join(f"{row[c]:>14.3f}" for c in COLUMNS) + f"{row['kid']:>9.4f}")
    print("\n".join(lines), flush=True)
    ratio = particles["colour_entropy_fraction"] / prior_row["colour_entropy_fraction"]
    print(f"colour entropy, particles / samples: {ratio:.2f}; {args.samples * 2} samples took {sampling_s:.0f} s")
    picked = torch.stack([views[pid][0] for pid in sorted(views)[:64]])
    save_png(image_grid(torch.cat([picked, samples[:64]]), columns=16), args.out / "sheet.png")
    table = {
        "particles": args.particles,
        "steps": args.steps,
        "prompt": args.prompt,
        **phases,
        "steps_per_s": summary.get("steps_per_s"),
        "time_per_step_s": summary.get("time_per_step_s"),
        "rows": {k: {c: v for c, v in r.items() if c != "judged_colours"} for k, r in rows.items()},
        "colour_entropy_ratio": ratio,
        "curve": {str(step): metrics for step, metrics in sorted(curve.items())},
    }
    (args.out / "table.json").write_text(json.dumps(table, indent=2))
    (args.out / "table.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
