"""Which NeRF density to mesh: the level whose marched surface has the NeRF's own silhouette.

A fixed ``mesh.threshold`` fits some NeRFs and not others: the toy NeRFs' densities at their visible surface differ
by particle (about 9 to 17 where the transmittance halves), so a level that keeps one mug's handle hole open bites the
corners off another particle's cube. ``silhouette_threshold`` marches the grid at each candidate level and keeps the
one whose silhouettes, from cameras around the object, overlap the NeRF's opacity (> 0.5) best: intersection over
union, pixels of all views together. Hand-written: no library meshes a NeRF at a level chosen per object.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pdray.geometry.dmtet import DensityFn, DMTet, occupied_radii
from pdray.render.cameras import Cameras
from pdray.render.raster import project, rasterize

CANDIDATES = (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 14.0, 17.0, 20.0, 25.0)
"""Levels tried, from the toy NeRFs' softest shells to the paper's fixed 25."""


def silhouette_iou(mask: torch.Tensor, target: torch.Tensor) -> float:
    """Intersection over union of two boolean masks of the same shape (1 when both are empty)."""
    union = int((mask | target).sum())
    return 1.0 if union == 0 else int((mask & target).sum()) / union


@torch.no_grad()
def silhouette_threshold(
    density_fn: DensityFn,
    target: torch.Tensor,
    cameras: Cameras,
    tet_resolution: int,
    radius: float,
    fit_grid: bool,
    candidates: Sequence[float] = CANDIDATES,
) -> tuple[float, dict[float, float]]:
    """The candidate level whose DMTet surface (``tet_resolution`` cells over ``[-radius, radius]^3``, fitted to the
    level's occupied cube when ``fit_grid``) best matches ``target: [B, H, W]`` (bool, the NeRF's opacity > 0.5 from
    ``cameras``), and the IoU of every candidate (0 where nothing is inside)."""
    scores: dict[float, float] = {}
    radii = occupied_radii(density_fn, radius, list(candidates)) if fit_grid else [radius] * len(candidates)
    for level, grid_radius in zip(candidates, radii, strict=True):
        dmtet = DMTet(tet_resolution, grid_radius).to(target.device)
        dmtet.init_sdf_from_density(density_fn, level)
        verts, faces = dmtet()
        if len(faces) == 0:
            scores[level] = 0.0
            continue
        mask = rasterize(project(verts, cameras), faces, tuple(target.shape[1:])).mask
        scores[level] = silhouette_iou(mask, target)
    return max(scores, key=scores.get), scores
