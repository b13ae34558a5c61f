"""Rasterised renders of a triangle mesh: normal maps (the geometry stage) and a colour field on the surface (the
texture stage, turntables). Pure functions: a mesh, cameras and callables in, images out, differentiable with
respect to the vertices (through barycentrics and ``antialias``) and to whatever the callables hold.

Example (a cube's normal map and its colour by position, from two orbit cameras)::

    >>> import trimesh
    >>> from pdray.render.cameras import orbit_cameras
    >>> box = trimesh.creation.box(extents=(0.6, 0.6, 0.6))
    >>> verts = torch.tensor(box.vertices, dtype=torch.float32)
    >>> faces = torch.tensor(box.faces, dtype=torch.long)
    >>> render_normals(verts, faces, orbit_cameras(2), 16, background=1.0).shape
    torch.Size([2, 3, 16, 16])
    >>> render_color(verts, faces, orbit_cameras(2), 16, lambda x: (x + 1) / 2, torch.ones_like).shape
    torch.Size([2, 3, 16, 16])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from pdray.render.cameras import Cameras, camera_rays
from pdray.render.raster import Backend, antialias, interpolate, project, rasterize

ColorFn = Callable[[torch.Tensor], torch.Tensor]
"""World points ``[N, 3]`` -> rgb ``[N, 3]`` in [0, 1]."""
BackgroundFn = Callable[[torch.Tensor], torch.Tensor]
"""Unit view directions ``[N, 3]`` -> rgb ``[N, 3]`` in [0, 1]."""


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals ``[V, 3]`` of ``verts: [V, 3]``, ``faces: [F, 3]`` (outward faces)."""
    tri = verts[faces]
    face_normals = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = twice the area
    summed = torch.zeros_like(verts).index_add(0, faces.reshape(-1), face_normals.repeat_interleave(3, dim=0))
    return F.normalize(summed, dim=-1)


def render_normals(
    verts: torch.Tensor,
    faces: torch.Tensor,
    cameras: Cameras,
    resolution: int,
    background: float,
    backend: Backend = "auto",
) -> torch.Tensor:
    """World-space normal maps ``[B, 3, H, W]``, ``(n + 1) / 2`` on the surface and ``background`` elsewhere."""
    verts_clip = project(verts, cameras)
    raster = rasterize(verts_clip, faces, resolution, backend)
    normals = F.normalize(interpolate(vertex_normals(verts, faces), raster, faces), dim=-1)
    image = torch.where(raster.mask[..., None], (normals + 1.0) / 2.0, torch.full_like(normals, background))
    return antialias(image, raster, verts_clip, faces).permute(0, 3, 1, 2)


def render_color(
    verts: torch.Tensor,
    faces: torch.Tensor,
    cameras: Cameras,
    resolution: int,
    color: ColorFn,
    background: BackgroundFn,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` of the colour field on the surface, over ``background`` of each pixel's ray."""
    verts_clip = project(verts, cameras)
    raster = rasterize(verts_clip, faces, resolution, backend)
    _, dirs = camera_rays(cameras.to(verts.device), resolution)
    image = background(dirs.reshape(-1, 3)).reshape(dirs.shape).to(verts.dtype)
    mask = raster.mask
    if mask.any():
        points = interpolate(verts, raster, faces)[mask]
        image = image.index_put((*mask.nonzero(as_tuple=True),), color(points).to(image.dtype))
    return antialias(image, raster, verts_clip, faces).permute(0, 3, 1, 2)
