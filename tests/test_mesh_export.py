"""Mesh export: the GLB and OBJ reload in trimesh with their UVs and the baked texture."""

from __future__ import annotations

import numpy as np
import torch
import trimesh
from PIL import Image
from trimesh.visual.material import PBRMaterial

from pdray.geometry.mesh import export_mesh


def icosphere() -> tuple[torch.Tensor, torch.Tensor]:
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    return torch.tensor(sphere.vertices, dtype=torch.float32), torch.tensor(sphere.faces, dtype=torch.long)


def position_colour(points: torch.Tensor) -> torch.Tensor:
    return (points + 1.0) / 2.0


def texture_image(mesh: trimesh.Trimesh) -> Image.Image:
    """The base colour image: GLB loads a PBR material, OBJ a simple one."""
    material = mesh.visual.material
    return material.baseColorTexture if isinstance(material, PBRMaterial) else material.image


def sample_texture(mesh: trimesh.Trimesh) -> np.ndarray:
    """The texel under each vertex's UV (trimesh UVs: v = 0 at the bottom row), rgb in [0, 1]."""
    image = np.asarray(texture_image(mesh).convert("RGB"), dtype=np.float64) / 255.0
    height, width = image.shape[:2]
    cols = np.clip((mesh.visual.uv[:, 0] * width).astype(int), 0, width - 1)
    rows = np.clip(((1.0 - mesh.visual.uv[:, 1]) * height).astype(int), 0, height - 1)
    return image[rows, cols]


def test_exported_glb_and_obj_reload_with_uvs_and_texture(tmp_path) -> None:
    verts, faces = icosphere()
    stats = export_mesh(verts, faces, position_colour, tmp_path / "mesh", texture_size=64)
    assert (stats.triangles, stats.watertight, stats.texture_size) == (len(faces), True, 64)
    assert sorted(p.name for p in (tmp_path / "mesh").iterdir()) == [
        "model.glb",
        "model.mtl",
        "model.obj",
        "texture.png",
    ]
    for name in ("model.glb", "model.obj"):
        mesh = trimesh.load(tmp_path / "mesh" / name, force="mesh")
        assert len(mesh.faces) == len(faces)
        assert mesh.visual.uv is not None and mesh.visual.uv.shape == (len(mesh.vertices), 2)
        assert texture_image(mesh).size == (64, 64)
        error = np.abs(sample_texture(mesh) - position_colour(torch.tensor(mesh.vertices)).numpy())
        assert error.mean() < 0.03


def test_per_vertex_albedo_is_baked(tmp_path) -> None:
    verts, faces = icosphere()
    red = torch.tensor([1.0, 0.0, 0.0]).expand(len(verts), 3)
    export_mesh(verts, faces, red, tmp_path, texture_size=32)
    mesh = trimesh.load(tmp_path / "model.glb", force="mesh")
    image = np.asarray(texture_image(mesh).convert("RGB"))
    assert (image == [255, 0, 0]).all()
