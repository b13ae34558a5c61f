"""Are the particles 3D objects? Levers of the distillation measured against the toy world itself.

    python benchmarks/views3d.py --prompts "a house;a mug;a chair" --particles 4 --seeds 0,1,2 \
        --variant "base:" --variant "vps4:camera.views_per_step=4 steps=800" [--set k=v ...] [--out DIR]

Each ``--variant NAME:OVERRIDES`` (space-separated ``--set`` overrides on the default preset) is distilled for
every prompt and seed (NeRF stage, local executor); a run whose summary.json exists is read back, not re-run, so the
benchmark can be stopped and continued. Per prompt and variant, the mean over seeds of the run's eval.json
(``pdray.evaluation.evaluate``, ``pdray.evaluation.world_eval``):

- views: the toy judge's view read right at the orbit's front / side / back cameras, as a fraction of the same read
  on the world's own renders from those cameras (the ceiling; mugs, chairs and houses only);
- shape: views judged the prompt's shape; same: views judged their particle's own colour (the world's objects are one
  colour all round); wkid: kernel distance of the views to the world's renders in the judge's
  features (``pdray.evaluation.world_eval.world_kid``; lower is closer, about 0 for the world's own renders);
- value / sat: foreground brightness and saturation over the prior's ancestral samples' (DDIM 50, CFG 7.5);
- colour H: entropy of the judged colours over log 6, beside the samples' for as many draws as particles;
- views samples (table.md): how well the prior itself binds views, the judge's read of its samples of
  "PROMPT, front view" / "side view" / "back view" (a distillation can hardly beat its prior's own read);
- haze, seconds per run.

Writes ``table.json``, ``table.md`` and one contact sheet per prompt (``sheet_<prompt>.png``: per variant, the
first seed's particles at four azimuths, 0 / 90 / 180 / 270 degrees, a row each) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from quality import sheet_row, write_sheet

from pdray.config import load_config
from pdray.evaluation.evaluate import load_views
from pdray.evaluation.metrics import foreground_brightness, foreground_saturation
from pdray.evaluation.world_eval import views_matter
from pdray.priors.diffusion import TOY_MODEL_DIR, DiffusionPrior
from pdray.priors.sampling import sample_images
from pdray.priors.toyworld.judge import colour_entropy, load_judge, max_colour_entropy
from pdray.priors.toyworld.world import VIEWS
from pdray.prompts import view_prompt
from pdray.run.local_executor import run_local

COLUMNS = ("views", "shape", "same", "wkid", "value", "sat", "colourH", "haze", "seconds")


def slug(text: str) -> str:
    return text.replace(" ", "-").replace(",", "")


def sample_reference(prompt: str, particles: int, out: Path, n: int = 64) -> dict:
    """The prior's ancestral samples of ``prompt``: brightness, saturation and the colour entropy of ``particles``
    draws (averaged over disjoint groups); cached in out/samples.json."""
    path = out / "samples.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    key = f"{prompt}|{particles}"
    if key in cache and "views_right" not in cache[key] and views_matter(prompt):
        cache[key]["views_right"] = prior_view_read(prompt)
        path.write_text(json.dumps(cache, indent=2))
    if key not in cache:
        prior = DiffusionPrior("toyworld", device="cpu")
        judge = load_judge(TOY_MODEL_DIR / "judge")
        images = sample_images(prior, [prompt] * n, cfg=7.5, seed=1000, progress=False)
        colours = judge.classify(images)["colour"]
        groups = [colours[i : i + particles] for i in range(0, n - particles + 1, particles)]
        cache[key] = {
            "brightness": foreground_brightness(images),
            "saturation": foreground_saturation(images),
            "colour_entropy_fraction": sum(colour_entropy(g) for g in groups) / len(groups) / max_colour_entropy(),
        }
        if views_matter(prompt):
            cache[key]["views_right"] = prior_view_read(prompt)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=2))
    return cache[key]


def prior_view_read(prompt: str, per_view: int = 16) -> float:
    """How well the prior itself binds views: the fraction of its samples of "PROMPT, front view" / "side view" /
    "back view" (DDIM 50, CFG 7.5) that the judge reads as the view asked for."""
    prior = DiffusionPrior("toyworld", device="cpu")
    judge = load_judge(TOY_MODEL_DIR / "judge")
    asked = [v for v in VIEWS for _ in range(per_view)]
    images = sample_images(prior, [view_prompt(prompt, v) for v in asked], cfg=7.5, seed=3000, progress=False)
    return sum(j == a for j, a in zip(judge.classify(images)["view"], asked, strict=True)) / len(asked)


def run_once(prompt: str, particles: int, seed: int, overrides: list[str], run_dir: Path) -> dict:
    """Distil (unless run_dir already holds a finished run) and return eval.json's NeRF metrics and the wall time."""
    if not (run_dir / "summary.json").exists():
        config = load_config(
            "default",
            [
                f"prompt={prompt}",
                f"particles={particles}",
                f"seed={seed}",
                "stages=[nerf]",
                "executor=local",
                "wandb=off",
                *overrides,
            ],
        )
        config = config.model_copy(update={"checkpoint_every": config.steps})
        started = time.perf_counter()
        run_local(config, run_dir)
        (run_dir / "bench_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    metrics = json.loads((run_dir / "eval.json").read_text())["stages"]["nerf"]["metrics"]
    return metrics | {"seconds": float((run_dir / "bench_seconds.txt").read_text())}


def cell(runs: list[dict], reference: dict) -> dict:
    """Means over seeds, relative to the ceiling and the samples where the column says so."""

    def mean(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    views = mean([r.get("views_right") for r in runs])
    ceiling = mean([r.get("views_right_world") for r in runs])
    return {
        "views": None if views is None or not ceiling else views / ceiling,
        "views_right": views,
        "shape": mean([r.get("shape_right") for r in runs]),
        "same": mean([r.get("colour_consistency") for r in runs]),
        "wkid": mean([r.get("world_kid") for r in runs]),
        "value": mean([r["brightness"] / reference["brightness"] for r in runs]),
        "sat": mean([r["saturation"] / reference["saturation"] for r in runs]),
        "colourH": mean([r.get("colour_entropy_fraction") for r in runs]),
        "colourH_samples": reference["colour_entropy_fraction"],
        "views_right_samples": reference.get("views_right"),
        "haze": mean([r["haze"] for r in runs]),
        "seconds": mean([r["seconds"] for r in runs]),
        "seeds": len(runs),
        "colours": [r.get("judged_colours") for r in runs],
        "views_per_particle": [r.get("views_right_per_particle") for r in runs],
    }


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="a house;a mug;a chair", help="';'-separated")
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--variant", action="append", default=[], help="NAME:OVERRIDES (space-separated k=v)")
    parser.add_argument("--set", action="append", default=[], help="config override for every run")
    parser.add_argument("--out", default="benchmarks/results/views3d")
    args = parser.parse_args()
    out = Path(args.out)
    variants = dict(v.split(":", 1) for v in args.variant or ["base:"])
    table = json.loads((out / "table.json").read_text()) if (out / "table.json").exists() else {}
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{'prompt / variant':<40}" + "".join(f"{c:>9}" for c in COLUMNS), flush=True)
    for prompt in args.prompts.split(";"):
        reference = sample_reference(prompt, args.particles, out)
        sheet = []
        for name, overrides in variants.items():
            sets = [*args.set, *overrides.split()]
            runs = []
            for seed in seeds:
                run_dir = out / "runs" / f"{slug(prompt)}-x{args.particles}" / name / f"seed{seed}"
                runs.append(run_once(prompt, args.particles, seed, sets, run_dir))
                if seed == seeds[0]:
                    views = load_views(run_dir)
                    n = next(iter(views.values())).shape[0]
                    quarter = [0, n // 4, n // 2, 3 * n // 4] if n >= 4 else list(range(n))
                    for pid, images in views.items():
                        sheet.append(sheet_row([images[i] for i in quarter], f"{name} p{pid}"))
            key = f"{prompt} x{args.particles} | {name}"
            table[key] = cell(runs, reference) | {"overrides": sets}
            row = table[key]
            print(f"{key:<40}" + "".join(f"{fmt(row[c]):>9}" for c in COLUMNS), flush=True)
            (out / "table.json").write_text(json.dumps(table, indent=2))
            write_sheet(sheet, out / f"sheet_{slug(prompt)}-x{args.particles}.png")
    lines = ["| prompt / variant | seeds | " + " | ".join(COLUMNS) + " | colour H samples | views samples |"]
    lines.append("|" + "---|" * (len(COLUMNS) + 4))
    for key, row in table.items():
        values = " | ".join(fmt(row.get(c)) for c in COLUMNS)
        samples = f"{fmt(row['colourH_samples'])} | {fmt(row.get('views_right_samples'))}"
        lines.append(f"| {key} | {row['seeds']} | {values} | {samples} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    main()
