"""The toy world as the reference of a run: is each particle a 3D object, and how close is it to the world itself?

The world is known, so a particle's views from the evaluation orbit can be set beside the world's own renders of the
prompt's object from the very same cameras:

- ``view_read``: the toy judge's view head on each view whose camera is clearly a front, side or back view (an
  azimuth at least ``VIEW_MARGIN`` degrees from a boundary: at 8 orbit views, azimuth 0 / 90 / 180 / 270), against
  the camera's own label; and its shape head against the prompt's shape. A particle that looks alike from every
  side cannot score well on the views of a mug, a chair or a house (the shapes whose views differ).
- ``world_renders`` of the prompt's object from the same cameras: the same read on them is the ceiling (the judge
  reads the world's renders right on nearly every view), and ``world_kid`` is a kernel distance (KID, torchmetrics)
  of the particles' views to them in the judge's features, a second fidelity reference beside the prior's
  ancestral samples (which are 2D, from random cameras).

CLIP's version of the view read, for any prior, is ``pdray.evaluation.clip_judge.ClipJudge.view_read``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from pdray.priors.toyworld.captions import parse_prompt
from pdray.priors.toyworld.judge import Judge
from pdray.priors.toyworld.world import (
    ASYMMETRIC_SHAPES,
    COLOUR_NAMES,
    SHAPES,
    VIEWS,
    object_jitter,
    render_objects,
)
from pdray.render.cameras import Cameras

VIEW_MARGIN = 20.0
"""Degrees an azimuth must keep from a front/side (45) or side/back (135) boundary for its view to be judged."""

WORLD_INSTANCES = 6
"""World renders per camera: one per colour when the prompt leaves the colour open, else jittered copies of it."""


def view_targets(cameras: Cameras, margin: float = VIEW_MARGIN) -> list[str | None]:
    """The view each camera shows (front / side / back, as the prompts' suffixes name them), or None where the
    azimuth is within ``margin`` degrees of a boundary or the camera looks from overhead."""
    out: list[str | None] = []
    for label, azimuth in zip(cameras.view_labels(), cameras.azimuth.tolist(), strict=True):
        off = abs((azimuth + 180.0) % 360.0 - 180.0)
        near_boundary = min(abs(off - 45.0), abs(off - 135.0)) < margin
        out.append(None if near_boundary or label not in VIEWS else label)
    return out


def views_matter(prompt: str) -> bool:
    """The view read means something only for shapes that look different from the front, side and back."""
    return parse_prompt(prompt).shape in ASYMMETRIC_SHAPES


@torch.no_grad()
def view_read(judge: Judge, views: torch.Tensor, targets: list[str | None], prompt: str) -> dict[str, float | None]:
    """The judge's read of one set of views [V, 3, H, W] from cameras with ``targets`` (``view_targets``):
    ``views_right``, the fraction of judged views (target not None) read as their camera's view (None unless the
    prompt's shape is a mug, chair or house); ``shape_right``, the fraction of all views read as the prompt's shape
    (None when the prompt names no shape of the world)."""
    judged = judge.classify(views)
    wanted = parse_prompt(prompt).shape
    keep = [i for i, target in enumerate(targets) if target is not None]
    views_right = None
    if views_matter(prompt) and keep:
        views_right = sum(judged["view"][i] == targets[i] for i in keep) / len(keep)
    shape_right = None if wanted is None else sum(s == wanted for s in judged["shape"]) / len(judged["shape"])
    return {"views_right": views_right, "shape_right": shape_right}


def world_renders(prompt: str, cameras: Cameras, resolution: int, seed: int = 0) -> torch.Tensor:
    """The world's own renders of the prompt's object from ``cameras``: [WORLD_INSTANCES * V, 3, R, R] in [0, 1],
    instance-major. A prompt without a colour gets one instance per colour; one with a colour, jittered copies of
    that colour (the world's own size and colour jitter, seeded). Raises ValueError for a prompt naming no shape."""
    wanted = parse_prompt(prompt)
    if wanted.shape is None:
        raise ValueError(f"{prompt!r} names no shape of the toy world ({', '.join(SHAPES)})")
    v, k = len(cameras), WORLD_INSTANCES
    generator = torch.Generator().manual_seed(seed)
    if wanted.colour is None:
        colours = torch.arange(k) % len(COLOUR_NAMES)
        scales, jitter = torch.ones(k), torch.zeros(k, 3)
    else:
        colours = torch.full((k,), COLOUR_NAMES.index(wanted.colour))
        scales, jitter = object_jitter(k, generator)
    repeat = Cameras.cat([cameras] * k)
    return render_objects(
        torch.full((k * v,), SHAPES.index(wanted.shape)),
        colours.repeat_interleave(v),
        repeat,
        resolution,
        scales=scales.repeat_interleave(v),
        colour_jitter=jitter.repeat_interleave(v, dim=0),
    )


class _JudgeFeatures(nn.Module):
    """The judge's feature vector as a torchmetrics feature extractor (images in [0, 1] -> [B, FEATURE_DIM])."""

    def __init__(self, judge: Judge):
        super().__init__()
        self.judge = judge

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.judge.features(images.float())


@torch.no_grad()
def world_kid(
    judge: Judge, views: torch.Tensor | Iterable[torch.Tensor], world: torch.Tensor, subsets: int = 50, seed: int = 0
) -> float:
    """KID (torchmetrics' KernelInceptionDistance, in the judge's features) between views [N, 3, H, W] (or batches
    of them, judged one at a time, so a run's views need not be in memory at once) and the world's renders
    [M, 3, H, W], over ``subsets`` random subsets of min(N, M) of each (drawn from a forked, seeded generator, so
    the number is reproducible). 0 in expectation for the world's own distribution."""
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():  # "will save all extracted features": a few hundred vectors here
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_JudgeFeatures(judge), subsets=subsets, subset_size=world.shape[0])
    metric.update(world, real=True)
    count = 0
    for batch in [views] if isinstance(views, torch.Tensor) else views:
        metric.update(batch, real=False)
        count += batch.shape[0]
    metric.subset_size = min(count, world.shape[0])  # known only once every batch is in
    if metric.subset_size < 2:
        raise ValueError("world_kid needs at least 2 views and 2 world renders")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, _ = metric.compute()
    return float(mean)
