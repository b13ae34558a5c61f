"""Do distilled particles look like the prior's own samples? VSD vs SDS at CFG 7.5 and 100 vs ancestral samples.

    python benchmarks/quality.py [--dims 3d,2d] [--prompts "a cube;a sphere"] [--methods vsd,sds7.5,sds100]
                                 [--particles 8] [--set key=value ...] [--out DIR]

For every prompt and dimension it distils ``--particles`` particles with each method (the default config for 3D,
image2d for 2D, both at ``--steps``), draws the prior's ancestral samples (DDIM 50, CFG 7.5) as the reference, and
prints one row per method (pdray.evaluation.quality.set_quality):

- colour H: entropy of the judged colours over particles, a fraction of log 6; hues: distinct dominant hues;
- KID: kernel distance of the particles' views to 64 reference samples (``--reference-samples``) in judge
  features, beside the floor (another draw of as many ancestral samples as the particles have views, against the
  same reference);
- haze (faint fringe pixels per solid pixel; lower is crisper), edge energy, saturation, brightness;
- agreement (judge sees the prompt's shape / colour) and confidence (the judge's probability of it);
- 3D only, from the run's eval.json (``pdray.evaluation.world_eval``): views, the judge's view read right at the
  orbit's front / side / back cameras (mugs, chairs, houses; the world's own renders score 1.0), shape right per
  view, and wKID, the kernel distance to the world's renders of the prompt's object from the same cameras; wall time.

Writes ``table.json``, ``table.md`` and one contact sheet per prompt and dimension (ancestral samples on top,
then each method's particles, at azimuths 0 / 90 / 180 / 270 in 3D) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pdray.config import load_config
from pdray.evaluation.quality import set_quality
from pdray.imaging import to_uint8
from pdray.priors.diffusion import TOY_MODEL_DIR, DiffusionPrior
from pdray.priors.sampling import sample_images
from pdray.priors.toyworld.judge import load_judge
from pdray.run.local_executor import run_local

PROMPTS = "a cube;a sphere;a cone;a mug;a chair;a house;a red cube;a blue mug"
METHODS = {
    "vsd": ["guidance=vsd", "cfg=7.5"],
    "sds7.5": ["guidance=sds", "cfg=7.5"],
    "sds100": ["guidance=sds", "cfg=100"],
}
REFERENCE_SAMPLES = 64
SCALE = 4  # contact-sheet pixels per render pixel


def particle_views(run_dir: Path, n_views: int) -> list[torch.Tensor]:
    """Each particle's evaluation views [V, 3, H, W] read back from the run folder's views.png."""
    out = []
    for path in sorted((run_dir / "particles").glob("*/views.png")):
        strip = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
        out.append(torch.stack(strip.chunk(n_views, dim=2)))
    return out


def sheet_row(images: list[torch.Tensor], label: str) -> np.ndarray:
    """Images [3, H, W] side by side, scaled up, with a label strip on the left."""
    row = to_uint8(torch.cat(images, dim=2)).repeat(SCALE, 0).repeat(SCALE, 1)
    tag = Image.new("RGB", (110, row.shape[0]), "white")
    ImageDraw.Draw(tag).text((4, row.shape[0] // 2 - 6), label, fill="black")
    return np.concatenate([np.asarray(tag), row], axis=1)


def write_sheet(rows: list[np.ndarray], path: Path) -> None:
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(padded, axis=0)).save(path)


def ancestral_row(
    floor: torch.Tensor, particles: int, n_views: int, prompt: str, judge, reference: torch.Tensor, seconds: float
) -> dict:
    """The floor of every column: independent ancestral samples scored as if each were a particle.

    Set statistics (colour entropy, hues) are averaged over disjoint groups of ``particles`` samples, so they are
    what ``particles`` draws of the prior give; the KID takes as many samples as the particles have views."""
    groups = [floor[i : i + particles] for i in range(0, len(floor) - particles + 1, particles)]
    rows = [set_quality(list(g.unsqueeze(1)), prompt, judge) for g in groups]
    row = {k: (sum(r[k] for r in rows) / len(rows) if isinstance(v, float | int) else v) for k, v in rows[0].items()}
    row["kid"] = set_quality([floor[: particles * n_views]], prompt, judge, reference)["kid"]
    return row | {"seconds": seconds, "groups": len(groups)}


def fmt(row: dict) -> str:
    kid = f"{row['kid']:.3f}" if "kid" in row else "-"

    def opt(key: str, spec: str) -> str:
        return "-" if row.get(key) is None else format(row[key], spec)

    return (
        f"{row['colour_entropy_fraction']:>8.2f}{row['distinct_hues']:>6.1f}{kid:>8}{row['haze']:>7.3f}"
        f"{row['edge_energy']:>7.3f}{row['saturation']:>6.2f}{row['brightness']:>6.2f}"
        f"{row['agreement']:>6.2f}{row['confidence']:>6.2f}"
        f"{opt('views_right', '.2f'):>6}{opt('shape_right', '.2f'):>6}{opt('world_kid', '.1f'):>7}"
        f"{row['seconds']:>7.0f}"
    )


WORLD_READ = ("views_right", "views_right_world", "shape_right", "world_kid")
"""What a 3D run's eval.json says against the toy world itself (``pdray.evaluation.world_eval``), copied into its
row."""


def write_markdown(table: dict, path: Path) -> None:
    lines = [
        "| dim / prompt / method | colour H | hues | KID | haze | edge | sat | value | agree | conf | views | shape"
        " | wKID | s |"
    ]
    lines.append("|" + "---|" * 14)
    for key, rows in table.items():
        for name, row in rows.items():
            lines.append(f"| {key} / {name} | " + " | ".join(fmt(row).split()) + " |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="3d,2d")
    parser.add_argument("--prompts", default=PROMPTS, help="';'-separated")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--set", action="append", default=[], help="config override for every distillation run")
    parser.add_argument("--reference-samples", type=int, default=REFERENCE_SAMPLES, help="ancestral samples per set")
    parser.add_argument("--out", default="benchmarks/results/quality")
    args = parser.parse_args()
    out = Path(args.out)
    prior = DiffusionPrior("toyworld", device="cpu")
    judge = load_judge(TOY_MODEL_DIR / "judge")
    table = json.loads((out / "table.json").read_text()) if (out / "table.json").exists() else {}
    header = f"{'':<30}{'colourH':>8}{'hues':>6}{'KID':>8}{'haze':>7}{'edge':>7}{'sat':>6}{'value':>6}"
    header += f"{'agree':>6}{'conf':>6}{'views':>6}{'shape':>6}{'wKID':>7}{'sec':>7}"
    for prompt in args.prompts.split(";"):
        started = time.perf_counter()
        reference = sample_images(prior, [prompt] * args.reference_samples, cfg=7.5, seed=1000, progress=False)
        n_floor = max(args.reference_samples, args.particles * 8)
        floor = sample_images(prior, [prompt] * n_floor, cfg=7.5, seed=2000, progress=False)
        sampled = (time.perf_counter() - started) / (n_floor + len(reference)) * args.particles
        for dim in args.dims.split(","):
            preset = "default" if dim == "3d" else "image2d"
            n_views = load_config(preset).eval_views if dim == "3d" else 1
            rows = {"ancestral": ancestral_row(floor, args.particles, n_views, prompt, judge, reference, sampled)}
            sheet = [sheet_row(list(floor[: args.particles]), "ancestral")]
            for method in args.methods.split(","):
                config = load_config(
                    preset,
                    [
                        f"prompt={prompt}",
                        f"particles={args.particles}",
                        f"steps={args.steps}",
                        "stages=[nerf]",
                        "executor=local",
                        "wandb=off",
                        f"checkpoint_every={args.steps}",
                        *METHODS[method],
                        *args.set,
                    ],
                )
                run_dir = out / "runs" / dim / prompt.replace(" ", "-") / method
                started = time.perf_counter()
                run_local(config, run_dir)
                seconds = time.perf_counter() - started
                views = particle_views(run_dir, n_views)
                rows[method] = set_quality(views, prompt, judge, reference) | {"seconds": seconds}
                if dim == "3d":
                    metrics = json.loads((run_dir / "eval.json").read_text())["stages"]["nerf"]["metrics"]
                    rows[method] |= {k: metrics.get(k) for k in WORLD_READ}
                shown = [0, n_views // 4, n_views // 2, 3 * n_views // 4] if dim == "3d" else [0]
                for v in shown:
                    sheet.append(sheet_row([p[v] for p in views], f"{method}" + (f" view {v}" if dim == "3d" else "")))
            key = f"{dim} | {prompt}"
            table[key] = rows
            write_sheet(sheet, out / f"sheet_{dim}_{prompt.replace(' ', '-')}.png")
            (out / "table.json").write_text(json.dumps(table, indent=2))
            write_markdown(table, out / "table.md")
            print(f"\n{key}\n{header}")
            for name, row in rows.items():
                print(f"{name:<30}{fmt(row)}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
