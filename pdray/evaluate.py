"""Evaluation of particles from fixed cameras: views.png, turntable.gif, judge scores, diversity and saturation.

With the toy prior, the judge says whether each view shows the prompt (the analogue of CLIP R-precision)
and gives features for diversity. With any other prior the diversity fallback is the mean pairwise RGB
distance of 32x32 renders (documented, cruder: it also counts pose-independent colour changes). Every prior gets
the foreground saturation of the views (``pdray.metrics``), averaged over particles (the over-saturation symptom),
their brightness, haze (faint fringe pixels per solid pixel) and the number of distinct dominant hues.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pdray.cameras import Cameras, orbit_cameras
from pdray.config import RunConfig
from pdray.imaging import save_gif, save_png
from pdray.metrics import dominant_hue, foreground_brightness, foreground_saturation, haze
from pdray.priors.diffusion import TOY_MODEL, TOY_MODEL_DIR
from pdray.priors.toyworld.judge import colour_entropy, load_judge, max_colour_entropy
from pdray.tracking import mean_pairwise_distance


def eval_cameras(config: RunConfig, n: int) -> Cameras:
    c = config.camera
    return orbit_cameras(n, elevation=15.0, distance=sum(c.distance) / 2, fov=sum(c.fov) / 2)


def evaluate_particles(config: RunConfig, group, run_dir: Path, turntable_frames: int = 24) -> dict[str, Any]:
    """Write each particle's views.png and turntable.gif, and return judge scores and diversity."""
    is_3d = config.particle == "nerf"
    views = group.images(eval_cameras(config, config.eval_views if is_3d else 1))
    turntables = group.images(eval_cameras(config, turntable_frames)) if is_3d else {}
    for pid, images in views.items():
        folder = run_dir / "particles" / f"{pid:02d}"
        save_png(torch.cat(list(images), dim=2), folder / "views.png")
        if is_3d:
            save_gif(turntables[pid], folder / "turntable.gif")
    return score_views(config, views)


@torch.no_grad()
def score_views(config: RunConfig, views: dict[int, torch.Tensor]) -> dict[str, Any]:
    everything = torch.cat(list(views.values()))
    result: dict[str, Any] = {
        "saturation": sum(foreground_saturation(v) for v in views.values()) / len(views),
        "brightness": foreground_brightness(everything),
        "haze": haze(everything),
        "distinct_hues": len({dominant_hue(v) for v in views.values()}),
    }
    if config.prior.model == TOY_MODEL and (TOY_MODEL_DIR / "judge").exists():
        judge = load_judge(TOY_MODEL_DIR / "judge")
        agreement, confidence, colours, features = {}, [], [], []
        for pid, images in views.items():
            agreement[pid] = float(judge.agreement(images, config.prompt).mean())
            confidence.append(float(judge.confidence(images, config.prompt).mean()))
            colours.append(judge.dominant_colour(images))
            features.append(judge.features(images).mean(0))
        result["judge_agreement"] = sum(agreement.values()) / len(agreement)
        result["judge_agreement_per_particle"] = agreement
        result["judge_confidence"] = sum(confidence) / len(confidence)
        result["judged_colours"] = colours
        result["colour_entropy"] = colour_entropy(colours)
        result["colour_entropy_fraction"] = colour_entropy(colours) / max_colour_entropy()
        result["diversity"] = mean_pairwise_distance(torch.stack(features))
        result["diversity_measure"] = "mean pairwise distance of toy-judge features"
    else:
        small = [F.interpolate(v, size=(32, 32), mode="area").flatten() for v in views.values()]
        result["diversity"] = mean_pairwise_distance(torch.stack(small))
        result["diversity_measure"] = "mean pairwise RGB distance of 32x32 renders"
    return result
