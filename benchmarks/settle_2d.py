"""How the 2D colours form and settle under levers of the image2d preset: each ``--variant NAME:OVERRIDES`` is a
``pdray run --config image2d`` (space-separated ``--set`` overrides), and every checkpoint's evaluation (eval.json)
is recorded as it is written, a curve per variant.

    python benchmarks/settle_2d.py --particles 64 --steps 400 --variant "preset:" \
        --variant "rep1:gaussian_repulsion=1.0" [--prompt "a cube"] [--out DIR]

Prints each curve (colour entropy as a fraction of its maximum, distinct hues, saturation, brightness, haze, judge
agreement) and writes ``--out``/curves.json; a variant whose curve is there is not re-run. The prior's own samples
give the reference: ``benchmarks/scale_long.py`` scores them (512 DDIM samples of "a cube": colour entropy 0.95,
saturation 0.75, brightness 0.48, haze 0.07).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from scale_long import CURVE, ENV, image2d_run, watch


def run_variant(args: argparse.Namespace, name: str, overrides: str) -> dict[int, dict]:
    run_dir = args.out / name
    command = image2d_run(args, run_dir, overrides.split())
    curve: dict[int, dict] = {}
    started = time.perf_counter()
    with (args.out / f"{name}.log").open("w") as log:
        rc = watch(subprocess.Popen(command, env=ENV, stdout=log, stderr=subprocess.STDOUT), run_dir, curve)
    if rc != 0:
        raise SystemExit(f"{name}: pdray run exited {rc}; see {args.out / f'{name}.log'}")
    print(f"{name} [{overrides}]: {time.perf_counter() - started:.0f} s", flush=True)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--prompt", default="a cube")
    parser.add_argument("--variant", action="append", required=True, help="NAME:OVERRIDES (space-separated)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "settle_2d")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "curves.json"
    curves = json.loads(path.read_text()) if path.exists() else {}
    for spec in args.variant:
        name, _, overrides = spec.partition(":")
        if name not in curves:
            curves[name] = {"overrides": overrides, "curve": run_variant(args, name, overrides)}
            path.write_text(json.dumps(curves, indent=2))
    for name, entry in curves.items():
        print(f"\n{name} [{entry['overrides']}]")
        print("step " + "".join(f"{c[:12]:>14}" for c in CURVE))
        for step, metrics in sorted(entry["curve"].items(), key=lambda item: int(item[0])):
            print(f"{int(step):>4} " + "".join(f"{metrics.get(c, float('nan')):>14.3f}" for c in CURVE))


if __name__ == "__main__":
    main()
