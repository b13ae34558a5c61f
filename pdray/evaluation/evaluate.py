"""Evaluation of particles from fixed cameras: views.png, turntable.gif, eval.json and the scores of every judge.

Three judges, each named beside its numbers (``Evaluation.judge_of``):
- ``toy``: with the toy prior, the toy world's judge says whether each view shows the prompt (the analogue of CLIP
  R-precision) and gives features for diversity; for NeRF particles it also reads each view's view (front / side
  / back, on mugs, chairs and houses) and shape against the world's own renders from the same cameras, and gives
  the kernel distance to those renders (``pdray.evaluation.world_eval``: is a particle a 3D object, and is it the
  world's);
- ``clip``: with ``eval.clip_model`` set, CLIP score, CLIP R-precision, diversity and Vendi score of the
  particles' CLIP embeddings, and for NeRF particles the view read (``clip_views_right``: which of "PROMPT, front
  view" / "side view" / "back view" each view is closest to) (``pdray.evaluation.clip_judge``), for any prior;
- ``pixels``: image statistics every prior gets: the foreground saturation of the views (``pdray.evaluation.metrics``),
  averaged over particles (the over-saturation symptom), their brightness, haze (faint fringe pixels per solid
  pixel), the number of distinct dominant hues, and without the toy judge a diversity fallback, the mean pairwise
  RGB distance of 32x32 renders (cruder: it also counts pose-independent colour changes).

The run's evaluation is always computed from what is on disk (``evaluate_folder``): at the end of a run, at a
checkpoint, after the mesh stage and in ``pdray eval`` alike, so the numbers do not depend on when they were taken.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import torch
import torch.nn.functional as F

from pdray.config import ConfigError, RunConfig, load_config
from pdray.evaluation.clip_judge import DISTRACTORS, ClipJudge, ClipNotFoundError, load_clip_judge
from pdray.evaluation.metrics import HUE_BINS, dominant_hue, foreground_saturation, foreground_value_total, haze_counts
from pdray.evaluation.report import write_run_report
from pdray.evaluation.tables import TABLE_METRICS
from pdray.evaluation.tracking import Tracker, mean_pairwise_distance
from pdray.evaluation.world_eval import view_read, view_targets, views_matter, world_kid, world_renders
from pdray.files import write_json
from pdray.imaging import load_gif
from pdray.priors.diffusion import TOY_MODEL, TOY_MODEL_DIR
from pdray.priors.toyworld.captions import parse_prompt
from pdray.priors.toyworld.judge import colour_entropy, load_judge, max_colour_entropy
from pdray.render.cameras import Cameras, orbit_cameras
from pdray.vsd.checkpoint import checkpoint_step

EVAL_FILE = "eval.json"
TOY_JUDGE = "the toy world's judge (a shape, colour and view classifier shipped with the toy prior)"
PIXELS = "image statistics of the renders"


def eval_cameras(config: RunConfig, n: int) -> Cameras:
    c = config.camera
    return orbit_cameras(n, elevation=15.0, distance=sum(c.distance) / 2, fov=sum(c.fov) / 2)


def render_views(config: RunConfig, group, run_dir: Path, turntable_frames: int = 24) -> None:
    """Each particle's views.png from the fixed evaluation orbit, and its turntable.gif unless ``turntable_frames``
    is 0, written by whatever holds the particles: ``group`` has ``write_views(run_dir, views, turntable)``."""
    is_3d = config.particle == "nerf"
    views = eval_cameras(config, config.eval_views if is_3d else 1)
    group.write_views(run_dir, views, eval_cameras(config, turntable_frames) if is_3d and turntable_frames else None)


def evaluate_particles(
    config: RunConfig, group, run_dir: Path, turntable_frames: int = 24, step: int | None = None
) -> dict[str, Any]:
    """At the end of a run: render the views and turntables, judge the run folder (``evaluate_folder``: eval.json,
    report.html) and return its metrics for summary.json. ``step`` defaults to the last."""
    render_views(config, group, run_dir, turntable_frames)
    report = evaluate_folder(run_dir, config, step=config.steps if step is None else step)
    return report["stages"]["nerf"]["metrics"]


def evaluate_checkpoint(config: RunConfig, group, run_dir: Path, step: int, tracker: Tracker) -> dict[str, Any]:
    """At a checkpoint: render the views (no turntables: they cost 3x the views), judge the run folder (eval.json,
    report.html, so a user can watch the run) and log the metrics and the per-particle table to W&B.
    Returns eval.json's content."""
    render_views(config, group, run_dir, turntable_frames=0)
    report = evaluate_folder(run_dir, config, step=step)
    tracker.log_evaluation(step, report)
    return report


@torch.no_grad()
def score_views(config: RunConfig, views: Mapping[int, torch.Tensor]) -> dict[str, Any]:
    """The pixel and toy-judge metrics of views {particle id: [V, 3, H, W] in [0, 1]}. Each particle's views are
    read once and reduced to a few numbers and a feature vector, so ``views`` can be a ``ViewsOnDisk`` of
    thousands of particles: the views are never all in memory at once. ``dominant_hue_per_particle`` gives each
    particle's hue bin for the per-particle rows."""
    toy = config.prior.model == TOY_MODEL and (TOY_MODEL_DIR / "judge").exists()
    judge = load_judge(TOY_MODEL_DIR / "judge") if toy else None
    saturation, value_total, value_count, faint, solid = 0.0, 0.0, 0, 0, 0
    hues, agreement, confidence, colours, same_colour = {}, {}, [], [], []
    features = small = None  # [P, D] each, filled row by row (``_put_row``)
    for i, (pid, images) in enumerate(views.items()):
        saturation += foreground_saturation(images)
        total, count = foreground_value_total(images)
        value_total, value_count = value_total + total, value_count + count
        faint_pixels, solid_pixels = haze_counts(images)
        faint, solid = faint + faint_pixels, solid + solid_pixels
        hues[pid] = dominant_hue(images)
        if judge is None:
            small = _put_row(small, i, len(views), F.interpolate(images, size=(32, 32), mode="area").flatten())
            continue
        agreement[pid] = float(judge.agreement(images, config.prompt).mean())
        confidence.append(float(judge.confidence(images, config.prompt).mean()))
        per_view = judge.classify(images)["colour"]
        colours.append(max(dict.fromkeys(per_view), key=per_view.count))
        same_colour.append(per_view.count(colours[-1]) / len(per_view))
        features = _put_row(features, i, len(views), judge.features(images).mean(0))
    result: dict[str, Any] = {
        "saturation": saturation / len(views),
        "brightness": value_total / value_count if value_count else 0.0,
        "haze": faint / max(solid, 1),
        "distinct_hues": len(set(hues.values())),
        "dominant_hue_per_particle": hues,
    }
    if judge is None:
        result["diversity"] = mean_pairwise_distance(small)
        result["diversity_measure"] = "mean pairwise RGB distance of 32x32 renders"
        return result
    result["judge_agreement"] = sum(agreement.values()) / len(agreement)
    result["judge_agreement_per_particle"] = agreement
    result["judge_confidence"] = sum(confidence) / len(confidence)
    result["judged_colours"] = colours
    # The world's objects are one colour all round: a particle painted per view is not one 3D object.
    result["colour_consistency"] = sum(same_colour) / len(same_colour)
    result["colour_entropy"] = colour_entropy(colours)
    result["colour_entropy_fraction"] = colour_entropy(colours) / max_colour_entropy()
    result["diversity"] = mean_pairwise_distance(features)
    result["diversity_measure"] = "mean pairwise distance of toy-judge features"
    if config.particle == "nerf" and parse_prompt(config.prompt).shape is not None:
        result |= world_scores(config, views, judge)
    return result


def _put_row(rows: torch.Tensor | None, index: int, count: int, row: torch.Tensor) -> torch.Tensor:
    """``row`` written into ``rows[index]``, a [count, row.numel()] tensor made at the first row. One block, not
    thousands of small tensors: those, held between large temporary allocations, fragment the heap (2048 rows of
    512 bytes kept 140 MB resident)."""
    rows = row.new_empty(count, row.numel()) if rows is None else rows
    rows[index] = row.flatten()
    return rows


def orbit_of(config: RunConfig, views: Mapping[int, torch.Tensor]) -> Cameras:
    """The cameras of views on disk: the evaluation orbit with as many cameras as each particle has views."""
    return eval_cameras(config, next(iter(views.values())).shape[0])


def world_scores(config: RunConfig, views: Mapping[int, torch.Tensor], judge) -> dict[str, Any]:
    """The toy world as the reference (``pdray.evaluation.world_eval``): each particle's view and shape read from the
    orbit's front / side / back cameras, the same read on the world's own renders of the prompt's object (the ceiling),
    and the kernel distance of all the particles' views to those renders."""
    cameras = orbit_of(config, views)
    targets = view_targets(cameras)
    world = world_renders(config.prompt, cameras, next(iter(views.values())).shape[-1], seed=config.seed)
    reads = {pid: view_read(judge, images, targets, config.prompt) for pid, images in views.items()}
    ceiling = [view_read(judge, chunk, targets, config.prompt) for chunk in world.split(len(cameras))]
    out: dict[str, Any] = {
        "shape_right": sum(r["shape_right"] for r in reads.values()) / len(reads),
        "shape_right_world": sum(r["shape_right"] for r in ceiling) / len(ceiling),
        "world_kid": world_kid(judge, views.values(), world, seed=config.seed),
    }
    if views_matter(config.prompt):
        out["views_right"] = sum(r["views_right"] for r in reads.values()) / len(reads)
        out["views_right_world"] = sum(r["views_right"] for r in ceiling) / len(ceiling)
        out["views_right_per_particle"] = {pid: r["views_right"] for pid, r in reads.items()}
    return out


@dataclass
class Evaluation:
    """What the judges say about one stage's views: the run's metrics, the judge behind each, one row per particle."""

    metrics: dict[str, Any]
    judge_of: dict[str, str]
    """Metric name -> "toy", "clip" or "pixels" (the keys of eval.json's ``judges``)."""
    particles: list[dict[str, Any]]
    """Per particle: its id, dominant hue (degrees, None when grey), CLIP score, judged colour and agreement."""


PIXEL_METRICS = ("saturation", "brightness", "haze", "distinct_hues")
"""The image statistics every prior gets (``score_views``); the rest of its metrics are the toy judge's."""


def judge_views(config: RunConfig, views: Mapping[int, torch.Tensor], clip: ClipJudge | None = None) -> Evaluation:
    """Every judge that applies to this run on views {particle id: [V, 3, H, W] in [0, 1]}; CLIP's if given.
    Each judge reads the views one particle at a time (``score_views``)."""
    metrics = score_views(config, views)
    hues = metrics.pop("dominant_hue_per_particle")  # the particle rows carry it
    toy = "judge_agreement" in metrics
    judge_of = {k: "pixels" if k in PIXEL_METRICS or not toy else "toy" for k in metrics}
    clip_scores: dict[int, float] = {}
    clip_views: dict[int, float] = {}
    if clip is not None:
        distractors = config.eval.distractors if config.eval.distractors is not None else DISTRACTORS
        targets = view_targets(orbit_of(config, views)) if config.particle == "nerf" else None
        clip_metrics, clip_scores = clip.metrics(config.prompt, views, distractors, targets)
        clip_views = clip_metrics.pop("clip_views_right_per_particle", {})  # the particle rows carry it
        metrics |= clip_metrics
        judge_of |= dict.fromkeys(clip_metrics, "clip")
    particles = []
    colours = metrics.get("judged_colours", [])
    for i, (pid, hue_bin) in enumerate(hues.items()):
        row: dict[str, Any] = {"particle": pid, "hue": None if hue_bin < 0 else hue_bin * 360 // HUE_BINS}
        if pid in clip_scores:
            row["clip_score"] = clip_scores[pid]
        if toy:
            row["judged_colour"] = colours[i]
            row["judge_agreement"] = metrics["judge_agreement_per_particle"][pid]
        if "views_right_per_particle" in metrics:
            row["views_right"] = metrics["views_right_per_particle"][pid]
        if pid in clip_views:
            row["clip_views_right"] = clip_views[pid]
        particles.append(row)
    return Evaluation(metrics, judge_of, particles)


def _frames(path: Path) -> torch.Tensor:
    """An image file (a PNG row of square views, or a GIF's frames) -> [V, 3, H, H] in [0, 1]."""
    array = torch.from_numpy(load_gif(path) if path.suffix == ".gif" else iio.imread(path, index=0))[..., :3]
    if array.ndim == 3:  # one PNG strip of square views side by side
        h = array.shape[0]
        array = array.unflatten(1, (array.shape[1] // h, h)).movedim(1, 0)
    return array.permute(0, 3, 1, 2).float() / 255


class ViewsOnDisk(Mapping[int, torch.Tensor]):
    """A run folder's particle views, {particle id: [V, 3, H, W] in [0, 1]}, each read from its file when asked for
    and not kept: judging thousands of particles holds one particle's views at a time."""

    def __init__(self, paths: dict[int, Path]):
        self.paths = paths

    def __getitem__(self, particle: int) -> torch.Tensor:
        return _frames(self.paths[particle])

    def __iter__(self) -> Iterator[int]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


def load_views(run_dir: Path, stage: str = "nerf") -> ViewsOnDisk:
    """The particles' views on disk: particles/NN/views.png (stage "nerf": NeRF or 2D particles) or
    particles/NN/mesh/turntable.gif (stage "mesh"); particles without the file are left out. Read lazily."""
    name = "views.png" if stage == "nerf" else "mesh/turntable.gif"
    folders = sorted((run_dir / "particles").glob("[0-9]*"))
    return ViewsOnDisk({int(f.name): f / name for f in folders if (f / name).is_file()})


def run_config(run_dir: Path, overrides: list[str] | None = None) -> RunConfig:
    """The run's saved config.yaml with ``--set``-style overrides (e.g. ``eval.clip_model=...``)."""
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.yaml)")
    return load_config(str(run_dir / "config.yaml"), overrides)


def run_step(run_dir: Path) -> int | None:
    """The step the run folder's particles are at: summary.json's steps done, else the latest checkpoint's."""
    try:
        return int(json.loads((run_dir / "summary.json").read_text())["steps_done"])
    except (OSError, ValueError, KeyError):
        pass
    try:
        return checkpoint_step(run_dir)
    except (OSError, ValueError, KeyError):
        return None


def evaluate_folder(
    run_dir: Path, config: RunConfig | None = None, step: int | None = None, strict: bool = False
) -> dict[str, Any]:
    """Judge a run folder from its files, write eval.json and refresh report.html; returns eval.json's content.

    Stages: "nerf" from each particle's views.png, "mesh" from its mesh turntable where the mesh stage ran.
    ``config`` defaults to the folder's config.yaml, ``step`` to the step its files record. A missing CLIP raises
    ClipNotFoundError when ``strict`` (``pdray eval``); otherwise (the end of a run) it is said in one line and
    recorded under ``judges``, and the other judges still judge: a finished run never fails on its evaluation."""
    config = config or run_config(run_dir)
    judges = {"pixels": PIXELS}
    clip = None
    if config.eval.clip_model:
        try:
            clip = load_clip_judge(config.eval.clip_model)
            judges["clip"] = f"CLIP {config.eval.clip_model}"
        except ClipNotFoundError as err:
            if strict:
                raise
            print(f"evaluation without CLIP: {err}", flush=True)
            judges["clip"] = f"unavailable: {err}"
    stages = {}
    for stage in ("nerf", "mesh"):
        views = load_views(run_dir, stage)
        if views:
            stages[stage] = asdict(judge_views(config, views, clip))
    if "nerf" not in stages:
        raise FileNotFoundError(f"{run_dir} holds no particle views yet (particles/NN/views.png)")
    if any(v == "toy" for s in stages.values() for v in s["judge_of"].values()):
        judges["toy"] = TOY_JUDGE
    report = {
        "prompt": config.prompt,
        "particles": len(stages["nerf"]["particles"]),
        "step": run_step(run_dir) if step is None else step,
        "judges": judges,
        "stages": stages,
    }
    write_json(run_dir / EVAL_FILE, report)
    write_run_report(run_dir)
    return report


def format_evaluation(report: dict[str, Any]) -> str:
    """eval.json as a plain-text table: one line per metric (a column per stage, and its judge), then particles."""
    stages = list(report["stages"])
    lines = [f"{report['prompt']!r}, {report['particles']} particles, step {report['step']}"]
    header = f"{'metric':<26}" + "".join(f"{s:>10}" for s in stages) + "  judge"
    lines += [header, "-" * len(header)]
    for name in TABLE_METRICS:
        present = [s for s in stages if name in report["stages"][s]["metrics"]]
        if not present:
            continue
        values = "".join(f"{_fmt(report['stages'][s]['metrics'].get(name)):>10}" for s in stages)
        judge = report["stages"][present[0]]["judge_of"][name]
        lines.append(f"{name:<26}{values}  {judge}")
    chance = report["stages"]["nerf"]["metrics"].get("clip_r_precision_chance")
    if chance is not None:
        lines.append(f"(R-precision by chance: {chance:.3f})")
    lines.append("")
    columns = list(dict.fromkeys(k for row in report["stages"]["nerf"]["particles"] for k in row))
    lines.append("".join(f"{c:>16}" for c in columns))
    lines += ["".join(f"{_fmt(row.get(c)):>16}" for c in columns) for row in report["stages"]["nerf"]["particles"]]
    lines.append("judges: " + "; ".join(f"{k}: {v}" for k, v in report["judges"].items()))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value + 0.0:.4g}"
    return str(value)
