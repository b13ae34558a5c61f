"""Does the mesh stage keep its NeRF's colours? Per particle: the toy judge's colour of the NeRF views vs the mesh
turntable, the mean foreground hue of each (degrees) and their difference, the brightness ratio mesh / NeRF, the
pixel error of the turntable to the NeRF's views and of model.glb (rendered through its baked texture) to the
turntable from the same cameras, the judge's p(prompt's shape), crispness (edge energy and haze,
``pdray.evaluation.metrics``) and surface speckle of each; then the same over all particles, with
``pdray.evaluation.world_eval.world_kid`` of the NeRF views and of the mesh frames to the toy world's own renders
from the same cameras.

    python benchmarks/mesh_texture.py RUN_DIR [RUN_DIR ...]                     # the meshes already on disk
    python benchmarks/mesh_texture.py --prompt "a cube" --particles 4 --out DIR  # NeRF stage first, into DIR
    python benchmarks/mesh_texture.py RUN_DIR --variant base= \\
        --variant "low-t=mesh.t_range.start=[0.02,0.5]" --variant "slow=nerf.lr_grid=3e-3;mesh.texture_steps=50"

A variant is ``NAME=OVERRIDE;OVERRIDE...`` (``--set`` syntax; empty: the run's own config): the mesh stage runs
once per variant and particle on the same NeRFs, in this process (``run_mesh_stage``), into
``RUN_DIR/variants/NAME/particles/NN/mesh/``, so the run's own meshes and summary stay as they were. Without a
variant the meshes in the run folder are measured as they are. Keep torch at one thread beside other work
(``OMP_NUM_THREADS=1``); the script sets it.

Mean hue is the circular mean of HSV hue over the saturated foreground pixels (those ``dominant_hue`` counts); the
NeRF's are its views.png (the fixed evaluation orbit), the mesh's its turntable.gif (the same orbit, 24 frames).
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import trimesh

from pdray.config import load_config
from pdray.evaluation.evaluate import eval_cameras, load_views, run_config
from pdray.evaluation.metrics import edge_energy, foreground_brightness, foreground_mask, haze, hsv_saturation, hue
from pdray.evaluation.world_eval import world_kid, world_renders
from pdray.priors.diffusion import TOY_MODEL_DIR
from pdray.priors.toyworld.captions import parse_prompt
from pdray.priors.toyworld.judge import load_judge
from pdray.render.raster import antialias, interpolate, project, rasterize
from pdray.run.mesh_stage import mesh_folder


def mean_hue(images: torch.Tensor, tolerance: float = 0.08, min_saturation: float = 0.2) -> float | None:
    """Circular mean hue (degrees) of the saturated foreground pixels of images [N, 3, H, W]; None when grey."""
    mask = foreground_mask(images, tolerance) & (hsv_saturation(images) >= min_saturation)
    if not mask.any():
        return None
    angle = hue(images)[mask].double() * 2 * math.pi
    return math.degrees(math.atan2(float(angle.sin().mean()), float(angle.cos().mean()))) % 360.0


def hue_difference(a: float | None, b: float | None) -> float | None:
    """b - a in degrees, wrapped into [-180, 180)."""
    return None if a is None or b is None else (b - a + 180.0) % 360.0 - 180.0


def speckle(images: torch.Tensor) -> float:
    """Mean distance (rgb, max channel) of each inner foreground pixel of images [N, 3, H, W] to its 3x3 mean: the
    pixel noise on the surface, which edge energy also counts; 0 on flat colour."""
    inner = -F.max_pool2d(-foreground_mask(images).float()[:, None], 3, stride=1, padding=1)[:, 0] > 0
    blurred = F.avg_pool2d(images.float(), 3, stride=1, padding=1, count_include_pad=False)
    return float((images.float() - blurred).abs().amax(dim=1)[inner].mean()) if inner.any() else 0.0


def describe(images: torch.Tensor, judge, prompt: str) -> dict:
    return {
        "colour": judge.dominant_colour(images),
        "confidence": float(judge.confidence(images, prompt).mean()),
        "hue": mean_hue(images),
        "brightness": foreground_brightness(images),
        "edge_energy": edge_energy(images),
        "haze": haze(images),
        "speckle": speckle(images),
    }


def same_cameras(nerf: torch.Tensor, mesh: torch.Tensor) -> torch.Tensor:
    """The turntable frames [M, 3, H, W] from the NeRF views' cameras: both are the evaluation orbit from the front,
    so with M a multiple of the V views, every (M / V)-th frame."""
    if len(mesh) % len(nerf) or nerf.shape[-2:] != mesh.shape[-2:]:
        raise ValueError(f"{len(mesh)} turntable frames do not hold the orbit of {len(nerf)} views at its size")
    return mesh[:: len(mesh) // len(nerf)]


def pixel_error(nerf: torch.Tensor, mesh: torch.Tensor) -> float:
    """Mean absolute rgb difference over the pixels either render covers, views [V, 3, H, W] from the same cameras."""
    covered = foreground_mask(nerf) | foreground_mask(mesh)
    return float((nerf - mesh).abs().mean(dim=1)[covered].mean())


def render_glb(path: Path, cameras, resolution: int) -> torch.Tensor:
    """A model.glb as a viewer shows it, unlit: its baked texture through its UVs, rasterised from ``cameras`` over
    white, [B, 3, H, W]; beside the turntable it checks the export (UV bake, texture orientation)."""
    mesh = trimesh.load(path, force="mesh")
    verts = torch.tensor(mesh.vertices, dtype=torch.float32)
    faces = torch.tensor(mesh.faces, dtype=torch.long)
    texture = torch.from_numpy(np.asarray(mesh.visual.material.baseColorTexture.convert("RGB")).copy())
    verts_clip = project(verts, cameras)
    raster = rasterize(verts_clip, faces, resolution)
    uv = interpolate(torch.tensor(mesh.visual.uv, dtype=torch.float32), raster, faces)
    grid = torch.stack([uv[..., 0] * 2 - 1, 1 - uv[..., 1] * 2], dim=-1)  # v = 0 is the image's bottom row
    texels = texture.permute(2, 0, 1)[None].float().div(255).expand(len(cameras), -1, -1, -1)
    colour = F.grid_sample(texels, grid, align_corners=False).permute(0, 2, 3, 1)
    image = torch.where(raster.mask[..., None], colour, torch.ones_like(colour))
    return antialias(image, raster, verts_clip, faces).permute(0, 3, 1, 2)


def compare(
    nerf: dict[int, torch.Tensor], mesh: dict[int, torch.Tensor], glb: dict[int, torch.Tensor], judge, prompt: str
) -> list[dict]:
    rows = []
    for pid in sorted(mesh):
        a, b = describe(nerf[pid], judge, prompt), describe(mesh[pid], judge, prompt)
        rows.append(
            {
                "particle": pid,
                "nerf": a,
                "mesh": b,
                "same_colour": a["colour"] == b["colour"],
                "hue_shift": hue_difference(a["hue"], b["hue"]),
                "brightness_ratio": b["brightness"] / a["brightness"] if a["brightness"] else float("nan"),
                "pixel_error": pixel_error(nerf[pid], same_cameras(nerf[pid], mesh[pid])),
                "glb_error": pixel_error(glb[pid], same_cameras(nerf[pid], mesh[pid])),
            }
        )
    return rows


def world_distances(config, nerf: dict[int, torch.Tensor], mesh: dict[int, torch.Tensor], judge) -> dict | None:
    """``world_kid`` of all particles' NeRF views, and of their mesh frames from the same cameras, to the world's
    renders of the prompt's object from those cameras (None when the prompt names no shape of the world)."""
    if parse_prompt(config.prompt).shape is None:
        return None
    first = next(iter(nerf.values()))
    world = world_renders(config.prompt, eval_cameras(config, len(first)), first.shape[-1], seed=config.seed)
    ids = sorted(mesh)
    return {
        "nerf": world_kid(judge, torch.cat([nerf[i] for i in ids]), world, seed=config.seed),
        "mesh": world_kid(judge, torch.cat([same_cameras(nerf[i], mesh[i]) for i in ids]), world, seed=config.seed),
    }


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = (
    f"{'particle':>8}  {'judged NeRF -> mesh':<20} {'hue NeRF':>8} {'hue mesh':>8} {'shift':>7} {'bright x':>8} "
    f"{'px err':>6} {'glb err':>7} {'p(shape) NeRF/mesh':>18} {'edges NeRF/mesh':>16} {'haze NeRF/mesh':>15} "
    f"{'speckle NeRF/mesh':>17} {'s':>4}"
)


def row_text(r: dict, seconds: float | None) -> str:
    n, m = r["nerf"], r["mesh"]
    colours = f"{n['colour']} -> {m['colour']}" + ("" if r["same_colour"] else " *")
    pairs = "".join(
        f" {n[k]:>{w}.3f}/{m[k]:<{w}.3f}"
        for k, w in (("confidence", 8), ("edge_energy", 7), ("haze", 7), ("speckle", 8))
    )
    return (
        f"{r['particle']:>8}  {colours:<20} {_f(n['hue'], '.1f'):>8} {_f(m['hue'], '.1f'):>8} "
        f"{_f(r['hue_shift'], '+.1f'):>7} {r['brightness_ratio']:>8.2f} {r['pixel_error']:>6.3f} "
        f"{r['glb_error']:>7.3f}{pairs} {_f(seconds, '.0f'):>4}"
    )


def overall(rows: list[dict]) -> dict:
    shifts = [abs(r["hue_shift"]) for r in rows if r["hue_shift"] is not None]
    ratios = [r["brightness_ratio"] for r in rows]
    return {
        "colours_kept": sum(r["same_colour"] for r in rows),
        "mean_abs_hue_shift": sum(shifts) / len(shifts) if shifts else None,
        "max_abs_hue_shift": max(shifts, default=None),
        "mean_brightness_ratio": sum(ratios) / len(ratios),
        "mean_pixel_error": sum(r["pixel_error"] for r in rows) / len(rows),
        "max_glb_error": max(r["glb_error"] for r in rows),
        "worst_brightness_change": max(abs(x - 1.0) for x in ratios),
        "within_bounds": sum(
            r["same_colour"]
            and r["hue_shift"] is not None
            and abs(r["hue_shift"]) <= 15
            and abs(r["brightness_ratio"] - 1) <= 0.15
            for r in rows
        ),
        "mean": {
            k: {s: sum(r[s][k] for r in rows) / len(rows) for s in ("nerf", "mesh")}
            for k in ("confidence", "speckle", "haze")
        },
    }


def print_table(title: str, rows: list[dict], world: dict | None, seconds: dict[int, float] | None = None) -> None:
    print(f"\n== {title}\n{COLUMNS}")
    for r in rows:
        print(row_text(r, (seconds or {}).get(r["particle"])))
    o, n = overall(rows), len(rows)
    means = ", ".join(f"{k} {v['nerf']:.3f} -> {v['mesh']:.3f}" for k, v in o["mean"].items())
    print(
        f"overall: colours kept {o['colours_kept']}/{n}; |hue shift| mean {_f(o['mean_abs_hue_shift'], '.1f')}, "
        f"max {_f(o['max_abs_hue_shift'], '.1f')} deg; brightness ratio mean {o['mean_brightness_ratio']:.2f}, worst "
        f"change {o['worst_brightness_change']:.0%}; same colour, within 15 deg and 15%: {o['within_bounds']}/{n}; "
        f"pixel error {o['mean_pixel_error']:.3f} (GLB vs turntable at most {o['max_glb_error']:.3f}); mean {means}"
        + (f"; world_kid {world['nerf']:.2f} -> {world['mesh']:.2f}" if world else "")
        + (f"; {sum(seconds.values()) / len(seconds):.0f}s per particle" if seconds else ""),
        flush=True,
    )


def report(run_dir: Path, title: str, mesh_dir: Path, judge, seconds: dict[int, float] | None = None) -> None:
    """Print the table of the NeRF views in ``run_dir`` against the mesh turntables in ``mesh_dir``."""
    config, nerf, mesh = run_config(run_dir), load_views(run_dir, "nerf"), load_views(mesh_dir, "mesh")
    if not mesh:
        print(f"\n== {title}: no mesh turntables (pdray export {run_dir}, or give --variant)")
        return
    cameras = eval_cameras(config, len(next(iter(nerf.values()))))
    glb = {
        pid: render_glb(mesh_folder(mesh_dir, pid) / "model.glb", cameras, images.shape[-1])
        for pid, images in mesh.items()
    }
    rows = compare(nerf, mesh, glb, judge, config.prompt)
    print_table(title, rows, world_distances(config, nerf, mesh, judge), seconds)


def run_variant(run_dir: Path, name: str, overrides: list[str]) -> tuple[Path, dict[int, float]]:
    """The mesh stage of every particle with ``overrides``, into RUN_DIR/variants/NAME; seconds per particle. Prints
    the density level each particle was meshed at (``mesh.threshold``; "silhouette" chooses one per particle)."""
    from pdray.run.mesh_stage import run_mesh_stage
    from pdray.vsd.checkpoint import load_particle_tensors

    config = run_config(run_dir, overrides)
    out = run_dir / "variants" / name
    shutil.rmtree(out, ignore_errors=True)
    seconds, levels = {}, []
    for pid in range(config.particles):
        started = time.perf_counter()
        stats = run_mesh_stage(config, load_particle_tensors(run_dir, pid)[1], pid, mesh_folder(out, pid))
        seconds[pid] = time.perf_counter() - started
        iou = f" (silhouette IoU {stats['silhouette_iou']:.3f})" if "silhouette_iou" in stats else ""
        levels.append(f"{pid}: {stats['threshold']:g}{iou}")
    print(f"{name}: meshed at mesh.threshold " + ", ".join(levels))
    return out, seconds


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    if not name:
        raise SystemExit(f"--variant {text!r}: give it a name, NAME=OVERRIDE;OVERRIDE...")
    return name, [o for o in overrides.split(";") if o]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="finished run folders")
    parser.add_argument("--prompt", help="run the NeRF stage of this prompt first (into --out)")
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="NeRF steps (default: the config's)")
    parser.add_argument("--out", type=Path, default=Path("runs/mesh-texture"), help="the NeRF run's folder")
    parser.add_argument("--variant", action="append", default=[], help="NAME=OVERRIDE;OVERRIDE... (repeat)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = list(args.runs)
    if args.prompt:
        from pdray.run.local_executor import run_local

        overrides = [f"prompt={args.prompt}", f"particles={args.particles}", f"seed={args.seed}"]
        overrides += ["executor=local", "wandb=off", "stages=[nerf]"]
        overrides += [f"steps={args.steps}"] if args.steps else []
        started = time.perf_counter()
        run_local(load_config("default", overrides), args.out)
        print(
            f"NeRF stage of {args.prompt!r} x{args.particles}, seed {args.seed}: {time.perf_counter() - started:.0f}s"
        )
        runs.append(args.out)
    if not runs:
        parser.error("give run folders or --prompt")
    judge = load_judge(TOY_MODEL_DIR / "judge")
    variants = [parse_variant(v) for v in args.variant]
    for run_dir in runs:
        if not variants:
            report(run_dir, f"{run_dir}: the meshes on disk", run_dir, judge)
        for name, overrides in variants:
            out, seconds = run_variant(run_dir, name, overrides)
            report(
                run_dir, f"{run_dir}: variant {name} ({'; '.join(overrides) or 'the run config'})", out, judge, seconds
            )


if __name__ == "__main__":
    main()
