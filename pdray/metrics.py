"""Image metrics of a run's renders, as pure tensor functions: saturation of the foreground.

Over-saturation is the symptom ProlificDreamer attributes to SDS at a large CFG (their Fig. 3): colours pushed to
their extremes. It is measured here as the mean HSV saturation of foreground pixels, the background being the
median colour of the image's one-pixel border (white in the toy world, whatever a learned background became
otherwise), so a tinted background does not count as a saturated object. HSV saturation, (max - min) / max, is
high for dark, muddy colours too (brown (0.5, 0.3, 0.1) reads 0.8): read it beside the images.
"""

from __future__ import annotations

import torch


def hsv_saturation(images: torch.Tensor) -> torch.Tensor:
    """images [N, 3, H, W] in [0, 1] -> HSV saturation [N, H, W]: (max - min) / max, 0 where max is 0."""
    images = images.float().clamp(0, 1)
    high, low = images.amax(dim=1), images.amin(dim=1)
    return torch.where(high > 0, (high - low) / high.clamp(min=1e-8), torch.zeros_like(high))


def border_colour(images: torch.Tensor) -> torch.Tensor:
    """images [N, 3, H, W] -> the median colour of each image's one-pixel border [N, 3]."""
    top, bottom = images[..., 0, :], images[..., -1, :]
    left, right = images[..., 1:-1, 0], images[..., 1:-1, -1]
    return torch.cat([top, bottom, left, right], dim=-1).float().median(dim=-1).values


def foreground_mask(images: torch.Tensor, tolerance: float = 0.08) -> torch.Tensor:
    """images [N, 3, H, W] -> bool [N, H, W]: pixels farther than ``tolerance`` (any channel) from the border colour."""
    background = border_colour(images)[..., None, None]
    return (images.float() - background).abs().amax(dim=1) > tolerance


def foreground_saturation(images: torch.Tensor, tolerance: float = 0.08) -> float:
    """Mean HSV saturation over the foreground pixels of images [N, 3, H, W] in [0, 1]; 0.0 with no foreground."""
    mask = foreground_mask(images, tolerance)
    if not mask.any():
        return 0.0
    return float(hsv_saturation(images)[mask].mean())
