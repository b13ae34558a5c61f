"""How good a set of particles is, measured against the prior's own samples (the toy judge's world).

One row of numbers per set of images: diversity (judged colours, dominant hues), closeness to the prior's
sample distribution (KID in judge features, with the sample-vs-sample distance as its floor), crispness
(haze, edge energy), saturation, brightness and fidelity (judge agreement, and the stricter judge
confidence). ``benchmarks/quality.py`` fills its table with these rows; the math lives in ``pdray.evaluation.metrics``.
"""

from __future__ import annotations

import torch

from pdray.evaluation.metrics import (
    dominant_hue,
    edge_energy,
    entropy,
    foreground_brightness,
    foreground_saturation,
    haze,
    kernel_inception_distance,
)
from pdray.priors.toyworld.judge import Judge, colour_entropy, max_colour_entropy


@torch.no_grad()
def set_quality(
    particles: list[torch.Tensor], prompt: str, judge: Judge, reference: torch.Tensor | None = None
) -> dict[str, float | list]:
    """Scores of ``particles`` (one [V, 3, H, W] tensor of views per particle, in [0, 1]) for ``prompt``.

    ``reference``: the prior's samples [M, 3, H, W]; with it, ``kid`` is the KID between all the particles'
    views and the samples in judge features.
    """
    views = torch.cat(particles)
    colours = [judge.dominant_colour(p) for p in particles]
    hues = [dominant_hue(p) for p in particles]
    row: dict[str, float | list] = {
        "colour_entropy_fraction": colour_entropy(colours) / max_colour_entropy(),
        "judged_colours": colours,
        "distinct_hues": len(set(hues)),
        "hue_entropy": entropy(hues),
        "haze": haze(views),
        "edge_energy": edge_energy(views),
        "saturation": foreground_saturation(views),
        "brightness": foreground_brightness(views),
        "agreement": float(judge.agreement(views, prompt).mean()),
        "confidence": float(judge.confidence(views, prompt).mean()),
    }
    if reference is not None:
        row["kid"] = kernel_inception_distance(judge.features(views), judge.features(reference))
    return row
