"""`pdray run`, Ctrl-C (SIGINT) mid-run, `pdray resume`: is the resumed run the uninterrupted one, tensor for tensor?

For each executor: one uninterrupted `pdray run`, and one that receives SIGINT once its metrics.jsonl holds
``--stop-after`` lines and is then continued with `pdray resume`; both as real subprocesses of the CLI, on the
toy-world default. Prints the step each stop landed on (from the checkpoint), the exit codes and the largest
difference over every tensor of the final checkpoints (particles, optimiser moments, LoRA).

python benchmarks/resume_exact.py [--executors local,ray] [--steps 40] [--stop-after 13] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pdray.vsd.checkpoint import load_checkpoint


def pdray(*args: str) -> list[str]:
    return [sys.executable, "-m", "pdray.cli.main", *args]


def run_args(executor: str, steps: int, out: Path, sets: list[str]) -> list[str]:
    args = ["run", "--executor", executor, "--steps", str(steps), "--stages", "nerf", "--wandb", "off"]
    args += ["--out", str(out), "--set", "log_every=1", "--set", f"checkpoint_every={steps}"]
    for item in sets:
        args += ["--set", item]
    return pdray(*args)


def stopped_run(args: list[str], metrics: Path, after: int, log) -> int:
    """Start the run, send SIGINT once metrics holds ``after`` lines, wait; returns the exit code."""
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    while proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.01)
    return proc.wait(timeout=900)


def max_difference(a: Path, b: Path) -> float:
    _, x = load_checkpoint(a)
    _, y = load_checkpoint(b)
    if x.keys() != y.keys() or any(x[p].keys() != y[p].keys() for p in x):
        raise SystemExit(f"{a} and {b} hold different tensors")
    return max(
        float((v.double() - y[p][k].double()).abs().max()) if v.numel() else 0.0 for p in x for k, v in x[p].items()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--executors", default="local,ray")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--stop-after", type=int, default=13, help="metric lines (steps) before SIGINT")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pdray-resume-") as tmp:
        for executor in args.executors.split(","):
            root = Path(tmp) / executor
            root.mkdir()
            with (root / "log.txt").open("w") as log:
                started = time.perf_counter()
                whole = subprocess.run(run_args(executor, args.steps, root / "whole", args.set), stdout=log, stderr=log)
                stopped_dir = root / "stopped"
                cmd = run_args(executor, args.steps, stopped_dir, args.set)
                stop_code = stopped_run(cmd, stopped_dir / "metrics.jsonl", args.stop_after, log)
                stop_step = load_checkpoint(stopped_dir)[0]["step"]
                resumed = subprocess.run(pdray("resume", str(stopped_dir)), stdout=log, stderr=log)
                wall = time.perf_counter() - started
            steps = [json.loads(line)["step"] for line in (stopped_dir / "metrics.jsonl").read_text().splitlines()]
            row = {
                "executor": executor,
                "uninterrupted_rc": whole.returncode,
                "stopped_rc": stop_code,
                "stopped_at_step": stop_step,
                "resume_rc": resumed.returncode,
                "steps_logged_once_each": steps == list(range(1, args.steps + 1)),
                "max_abs_difference": max_difference(stopped_dir, root / "whole"),
                "wall_s": round(wall, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if whole.returncode or resumed.returncode:
                print((root / "log.txt").read_text()[-4000:], file=sys.stderr)
    print(f"\n{'executor':<9}{'stopped at':>11}{'exit':>6}{'resume':>8}{'max |diff|':>12}{'steps once':>12}")
    for r in rows:
        print(
            f"{r['executor']:<9}{r['stopped_at_step']:>11}{r['stopped_rc']:>6}{r['resume_rc']:>8}"
            f"{r['max_abs_difference']:>12.3g}{r['steps_logged_once_each']!s:>12}"
        )


if __name__ == "__main__":
    main()
