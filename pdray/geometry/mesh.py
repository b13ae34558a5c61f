"""Triangle meshes: smoothness regularisers, and textured export (xatlas UVs, a texture baked from a colour field,
GLB and OBJ + MTL + PNG through trimesh).

Baking rasterises the mesh in UV space (UVs as clip-space positions, the torch or nvdiffrast rasteriser), reads the
3D point behind each covered texel from the interpolated vertex positions and asks the colour field for its colour.
Empty texels around the charts are filled from their neighbours so that bilinear filtering and mipmaps do not pull
in black at the seams. Texture rows run top to bottom and UVs follow trimesh's (OBJ) convention, v = 0 at the bottom.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
import xatlas
from PIL import Image

from pdray.files import write_bytes
from pdray.render.raster import interpolate, rasterize

ColorFn = Callable[[torch.Tensor], torch.Tensor]
"""World points ``[N, 3]`` -> rgb ``[N, 3]`` in [0, 1] (e.g. the albedo of a texture field)."""

_CHART_PADDING = 4
"""Texels xatlas leaves between charts (of its own atlas, which is rescaled to the texture)."""
_FILL_TEXELS = 8
"""How far colours are spread into empty texels around the charts; texels further out get the mean colour."""
_POINTS_PER_CALL = 1 << 16
"""Points per call of the colour field while baking."""


@dataclass
class MeshStats:
    """What ``export_mesh`` wrote."""

    triangles: int
    """Number of triangles."""
    vertices: int
    """Number of vertices after UV unwrapping (seams split vertices)."""
    watertight: bool
    """Whether the input mesh is closed: every edge is shared by exactly two triangles."""
    texture_size: int
    """Side of the square texture image, in texels."""


def _interior_edges(faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each edge shared by two triangles of ``faces: [F, 3]``: the two triangles' indices ``[E]``, ``[E]``."""
    edges = faces[:, [[1, 2], [2, 0], [0, 1]]].sort(dim=-1).values.reshape(-1, 2)
    key = edges[:, 0] * (int(faces.max()) + 1) + edges[:, 1]
    order = key.argsort()
    same = key[order[1:]] == key[order[:-1]]
    return order[:-1][same] // 3, order[1:][same] // 3


def normal_consistency(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos`` between the normals of the two triangles at each shared edge (0 for a flat sheet).

    ``verts: [V, 3]`` (differentiable), ``faces: [F, 3]``."""
    tri = verts[faces]
    normals = torch.nn.functional.normalize(torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), dim=-1)
    a, b = _interior_edges(faces)
    return (1.0 - (normals[a] * normals[b]).sum(dim=-1)).mean()


def laplacian_smoothness(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean norm of the uniform graph Laplacian ``deg(i) v_i - sum of v_i's neighbours`` (threestudio's form, which
    the paper's weight goes with). ``verts: [V, 3]`` (differentiable), ``faces: [F, 3]``."""
    edges = torch.unique(faces[:, [[0, 1], [1, 2], [2, 0]]].reshape(-1, 2).sort(dim=-1).values, dim=0)
    i, j = torch.cat([edges[:, 0], edges[:, 1]]), torch.cat([edges[:, 1], edges[:, 0]])
    degree = torch.bincount(i, minlength=len(verts)).to(verts.dtype)
    laplacian = degree[:, None] * verts - torch.zeros_like(verts).index_add(0, i, verts[j])
    return laplacian[degree > 0].norm(dim=-1).mean()


def unwrap_uv(verts: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xatlas charts: for ``verts: [V, 3]``, ``faces: [F, 3]`` returns ``vmapping: [V']`` (the source vertex of each
    new vertex), new ``faces: [F, 3]`` and ``uvs: [V', 2]`` in [0, 1]."""
    atlas = xatlas.Atlas()
    atlas.add_mesh(verts.astype(np.float32), faces.astype(np.uint32))
    pack = xatlas.PackOptions()
    pack.padding = _CHART_PADDING
    atlas.generate(pack_options=pack)
    vmapping, uv_faces, uvs = atlas[0]
    return vmapping.astype(np.int64), uv_faces.astype(np.int64), uvs


def bake_texture(
    positions: torch.Tensor, faces: torch.Tensor, uvs: torch.Tensor, color: ColorFn | torch.Tensor, size: int
) -> torch.Tensor:
    """Texture image ``[size, size, 3]`` in [0, 1] of a UV-mapped mesh.

    ``positions: [V, 3]`` and ``uvs: [V, 2]`` per vertex, ``faces: [F, 3]``; ``color`` is a colour field or per-vertex
    rgb ``[V, 3]``.
    """
    uv_clip = torch.cat([uvs * 2.0 - 1.0, torch.zeros_like(uvs[:, :1]), torch.ones_like(uvs[:, :1])], dim=-1)
    raster = rasterize(uv_clip[None], faces, size)
    covered = raster.mask[0]
    if callable(color):
        points = interpolate(positions, raster, faces)[0][covered]
        rgb = torch.cat([color(part) for part in points.split(_POINTS_PER_CALL)]) if len(points) else points
    else:
        rgb = interpolate(color, raster, faces)[0][covered]
    image = positions.new_zeros(size, size, 3)
    image[covered] = rgb.to(image.dtype).clamp(0.0, 1.0)
    return _fill_empty_texels(image, covered)


def _fill_empty_texels(image: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """Spread colours ``[H, W, 3]`` from covered texels ``[H, W]`` into empty ones, one texel per round."""
    rgb = image.permute(2, 0, 1)[None]
    known = covered[None, None].to(image.dtype)
    for _ in range(_FILL_TEXELS):
        total = F.avg_pool2d(rgb * known, 3, stride=1, padding=1, count_include_pad=False)
        count = F.avg_pool2d(known, 3, stride=1, padding=1, count_include_pad=False)
        new = (count > 0) & (known == 0)
        rgb = torch.where(new, total / count.clamp_min(1e-12), rgb)
        known = torch.maximum(known, new.to(known.dtype))
    mean = (rgb * known).sum(dim=(2, 3), keepdim=True) / known.sum().clamp_min(1.0)
    rgb = torch.where(known > 0, rgb, mean)
    return rgb[0].permute(1, 2, 0)


@torch.no_grad()
def export_mesh(
    verts: torch.Tensor,
    faces: torch.Tensor,
    color: ColorFn | torch.Tensor,
    folder: Path | str,
    texture_size: int = 256,
) -> MeshStats:
    """Write ``model.glb``, ``model.obj`` + ``model.mtl`` + ``texture.png`` of a textured mesh into ``folder``.

    ``verts: [V, 3]``, ``faces: [F, 3]``; ``color`` is a colour field (world points ``[N, 3]`` -> rgb in [0, 1])
    or per-vertex rgb ``[V, 3]``. Each file is written atomically.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    verts_np, faces_np = verts.detach().cpu().double().numpy(), faces.detach().cpu().long().numpy()
    watertight = trimesh.Trimesh(verts_np, faces_np, process=False).is_watertight

    vmapping, uv_faces, uvs = unwrap_uv(verts_np, faces_np)
    index = torch.from_numpy(vmapping).to(verts.device)
    field_or_rgb = color if callable(color) else color[index].float()
    texture = bake_texture(
        verts[index].float(),
        torch.from_numpy(uv_faces).to(verts.device),
        torch.from_numpy(uvs).to(verts.device),
        field_or_rgb,
        texture_size,
    )
    image = Image.fromarray((texture.cpu().numpy() * 255.0).round().astype(np.uint8))
    material = trimesh.visual.material.PBRMaterial(
        name="texture",  # the OBJ exporter names the image after the material: texture.png
        baseColorTexture=image,
        baseColorFactor=[255, 255, 255, 255],
        metallicFactor=0.0,
        roughnessFactor=1.0,
    )
    mesh = trimesh.Trimesh(
        vertices=verts_np[vmapping],
        faces=uv_faces,
        visual=trimesh.visual.TextureVisuals(uv=uvs, material=material),
        process=False,
    )
    obj_text, obj_files = trimesh.exchange.obj.export_obj(
        mesh, include_normals=False, include_texture=True, return_texture=True, mtl_name="model.mtl"
    )
    for name, data in obj_files.items():
        write_bytes(folder / name, data)
    write_bytes(folder / "model.obj", obj_text.encode())
    write_bytes(folder / "model.glb", mesh.export(file_type="glb"))
    return MeshStats(len(uv_faces), len(vmapping), watertight, texture_size)
