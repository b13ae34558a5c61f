"""Choosing the NeRF density level to mesh by the NeRF's own silhouette."""

from __future__ import annotations

import torch

from pdray.geometry.surface_level import silhouette_iou, silhouette_threshold
from pdray.render.cameras import camera_rays, orbit_cameras


def sphere_silhouette(cameras, resolution: int, radius: float) -> torch.Tensor:
    """[B, H, W]: the pixels whose ray meets the origin-centred sphere of ``radius`` (closed form)."""
    origins, dirs = camera_rays(cameras, resolution)
    along = -(origins * dirs).sum(-1)  # distance to the ray's closest point to the origin
    closest = origins + along[..., None] * dirs
    return closest.norm(dim=-1) < radius


def test_iou_counts_overlap_over_union() -> None:
    a = torch.tensor([[True, True, False, False]])
    b = torch.tensor([[False, True, True, False]])
    assert silhouette_iou(a, b) == 1 / 3 and silhouette_iou(a, a) == 1.0
    assert silhouette_iou(torch.zeros(1, 4, dtype=torch.bool), torch.zeros(1, 4, dtype=torch.bool)) == 1.0


def test_the_level_whose_surface_has_the_target_silhouette_wins() -> None:
    """A density falling linearly from the centre (level L is the sphere of radius 1 - L / 20): a sphere of radius
    0.7 seen from an orbit is level 6, whichever side of it the other candidates lie."""
    cams = orbit_cameras(4, elevation=20.0, distance=3.0)
    target = sphere_silhouette(cams, 48, 0.7)
    density = lambda x: 20.0 * (1.0 - x.norm(dim=-1))  # noqa: E731
    for fit_grid in (True, False):
        level, scores = silhouette_threshold(
            density, target, cams, 16, 1.0, fit_grid, candidates=(4.0, 5.0, 6.0, 7.0, 8.0)
        )
        assert level == 6.0 and scores[6.0] > 0.95
        assert scores[4.0] < scores[5.0] < scores[6.0] > scores[7.0] > scores[8.0]


def test_no_surface_at_any_level_scores_zero() -> None:
    cams = orbit_cameras(2)
    target = sphere_silhouette(cams, 16, 0.5)
    _, scores = silhouette_threshold(lambda x: torch.zeros(len(x)), target, cams, 8, 1.0, True, candidates=(1.0, 2.0))
    assert scores == {1.0: 0.0, 2.0: 0.0}
