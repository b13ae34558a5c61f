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


def hsv_value(images: torch.Tensor) -> torch.Tensor:
    """images [N, 3, H, W] in [0, 1] -> HSV value (brightness) [N, H, W]: the largest channel."""
    return images.float().clamp(0, 1).amax(dim=1)


def foreground_value_total(images: torch.Tensor, tolerance: float = 0.08) -> tuple[float, int]:
    """The sum of HSV value over the foreground pixels of images [N, 3, H, W], and their count: the parts of
    ``foreground_brightness``, to be summed over batches."""
    mask = foreground_mask(images, tolerance)
    return float(hsv_value(images)[mask].double().sum()), int(mask.sum())


def foreground_brightness(images: torch.Tensor, tolerance: float = 0.08) -> float:
    """Mean HSV value over the foreground pixels of images [N, 3, H, W]; 0.0 with no foreground."""
    total, count = foreground_value_total(images, tolerance)
    return total / count if count else 0.0


HUE_BINS = 12
"""Hue histogram bins (30 degrees each, centred on 0, 30, ... degrees) for dominant hues."""


def hue(images: torch.Tensor) -> torch.Tensor:
    """images [N, 3, H, W] in [0, 1] -> HSV hue in [0, 1) [N, H, W] (0 where the pixel is grey)."""
    r, g, b = images.float().clamp(0, 1).unbind(dim=1)
    high, low = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)
    span = (high - low).clamp(min=1e-8)
    h = torch.where(high == r, ((g - b) / span) % 6, torch.where(high == g, (b - r) / span + 2, (r - g) / span + 4))
    return torch.where(high - low > 0, h / 6, torch.zeros_like(h)) % 1.0


def dominant_hue(images: torch.Tensor, tolerance: float = 0.08, min_saturation: float = 0.2) -> int:
    """The hue bin (of HUE_BINS) holding most saturated foreground pixels over all of images [N, 3, H, W];
    -1 when the object is grey (no saturated foreground pixel)."""
    mask = foreground_mask(images, tolerance) & (hsv_saturation(images) >= min_saturation)
    if not mask.any():
        return -1
    bins = (hue(images)[mask] * HUE_BINS + 0.5).long() % HUE_BINS
    return int(torch.bincount(bins, minlength=HUE_BINS).argmax())


def entropy(labels: list) -> float:
    """Entropy (nats) of the empirical distribution of ``labels``."""
    counts = torch.tensor([labels.count(v) for v in dict.fromkeys(labels)], dtype=torch.float64)
    p = counts / counts.sum()
    return float(-(p * p.log()).sum())


def distance_to_background(images: torch.Tensor) -> torch.Tensor:
    """images [N, 3, H, W] -> [N, H, W]: the largest channel difference to the image's border colour."""
    return (images.float() - border_colour(images)[..., None, None]).abs().amax(dim=1)


def haze(images: torch.Tensor, faint: tuple[float, float] = (0.03, 0.25)) -> float:
    """Faint pixels per solid foreground pixel over images [N, 3, H, W]: the fog and fringe around an object.

    A pixel is faint when its distance to the background colour lies in ``faint`` (visible, but mostly
    background) and solid above it. A crisp object on a clean background has only its anti-aliased rim faint.
    """
    faint_pixels, solid = haze_counts(images, faint)
    return faint_pixels / max(solid, 1)


def haze_counts(images: torch.Tensor, faint: tuple[float, float] = (0.03, 0.25)) -> tuple[int, int]:
    """The faint and the solid foreground pixels of images [N, 3, H, W] (``haze``'s parts, to be summed over
    batches)."""
    d = distance_to_background(images)
    return int(((d > faint[0]) & (d <= faint[1])).sum()), int((d > faint[1]).sum())


def edge_energy(images: torch.Tensor) -> float:
    """Mean squared image gradient (finite differences, all channels) of images [N, 3, H, W], per solid
    foreground pixel: sharp outlines and shaded faces score high, blur and fog low."""
    x = images.float()
    dx, dy = x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]
    energy = dx.square().sum() + dy.square().sum()
    solid = (distance_to_background(images) > 0.25).sum()
    return float(energy / solid.clamp(min=1))


def kernel_inception_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Unbiased squared MMD with the cubic polynomial kernel (KID, Binkowski et al. 2018) between feature sets
    [n, d] and [m, d] (n, m >= 2); here in the toy judge's features rather than Inception's. 0 in expectation
    for two samples of one distribution (it can come out slightly negative)."""
    a, b = features_a.double(), features_b.double()
    d = a.shape[1]

    def kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x @ y.T / d + 1) ** 3

    n, m = a.shape[0], b.shape[0]
    kaa, kbb, kab = kernel(a, a), kernel(b, b), kernel(a, b)
    within_a = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
    within_b = (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    return float(within_a + within_b - 2 * kab.mean())
