"""The rasteriser: alignment with camera rays, gradients against finite differences, backend selection — tiny sizes."""

from __future__ import annotations

import doctest
import importlib.abc
import sys

import pytest
import torch
import torch.nn.functional as F
import trimesh

from pdray.render import raster
from pdray.render.cameras import Cameras, camera_rays
from pdray.render.raster import antialias, backend_name, interpolate, project, rasterize


def box_mesh(half: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    box = trimesh.creation.box(extents=(2 * half,) * 3)
    return torch.tensor(box.vertices, dtype=torch.float32), torch.tensor(box.faces, dtype=torch.long)


def two_cameras() -> Cameras:
    return Cameras(
        torch.tensor([20.0, -5.0]), torch.tensor([30.0, -120.0]), torch.tensor([1.5, 1.6]), torch.tensor([45.0, 40.0])
    )


def screen_triangles(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two triangles sharing an edge, in clip space with w != 1 so the perspective correction matters."""
    ndc = torch.tensor([[-0.71, -0.63, 0.1], [0.67, -0.52, 0.3], [0.08, 0.74, -0.2], [0.77, 0.59, 0.0]], dtype=dtype)
    w = torch.tensor([1.3, 0.8, 1.7, 1.1], dtype=dtype)
    verts_clip = torch.cat([ndc * w[:, None], w[:, None]], dim=-1)[None]
    return verts_clip, torch.tensor([[0, 1, 2], [1, 3, 2]])


def test_docstring_example_runs() -> None:
    assert doctest.testmod(raster).failed == 0


def test_rasterised_box_lines_up_with_camera_rays() -> None:
    """Coverage and interpolated world positions equal the analytic ray-box hits through the same pixel centres."""
    verts, faces = box_mesh()
    cameras = two_cameras()
    out = rasterize(project(verts, cameras), faces, 24, backend="torch")
    origins, dirs = camera_rays(cameras, 24)
    t_lo, t_hi = (-0.3 - origins) / dirs, (0.3 - origins) / dirs
    t_near, t_far = torch.minimum(t_lo, t_hi).amax(dim=-1), torch.maximum(t_lo, t_hi).amin(dim=-1)
    hit = (t_near < t_far) & (t_far > 0)
    assert hit.any() and not hit.all()
    assert torch.equal(out.mask, hit)
    points = interpolate(verts, out, faces)
    expected = origins + t_near[..., None] * dirs
    torch.testing.assert_close(points[hit], expected[hit], atol=1e-5, rtol=0)
    assert (points[~hit] == 0).all() and (out.depth[~hit] == 1).all() and (out.bary[~hit] == 0).all()
    assert (out.depth[hit] > -1).all() and (out.depth[hit] < 1).all()


def test_chunked_z_buffer_matches_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    verts, faces = box_mesh()
    verts_clip = project(verts, two_cameras())
    whole = rasterize(verts_clip, faces, 16, backend="torch")
    monkeypatch.setattr(raster, "_PAIRS_PER_CHUNK", 7)
    chunked = rasterize(verts_clip, faces, 16, backend="torch")
    assert torch.equal(whole.tri_id, chunked.tri_id)
    torch.testing.assert_close(whole.bary, chunked.bary)


def test_interpolation_gradients_match_finite_differences() -> None:
    verts_clip, faces = screen_triangles()
    attr = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def render(verts_clip: torch.Tensor, attr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = rasterize(verts_clip, faces, 10, backend="torch")
        return interpolate(attr, out, faces), out.depth

    assert torch.autograd.gradcheck(render, (verts_clip.requires_grad_(), attr.requires_grad_()), atol=1e-6)


def test_antialias_gradients_match_finite_differences() -> None:
    verts_clip, faces = screen_triangles()
    colour = torch.tensor([[1.0, 0.0], [0.2, 0.5], [0.0, 1.0], [0.6, 0.3]], dtype=torch.float64)

    def render(verts_clip: torch.Tensor) -> torch.Tensor:
        out = rasterize(verts_clip, faces, 10, backend="torch")
        return antialias(interpolate(colour, out, faces), out, verts_clip, faces)

    assert torch.autograd.gradcheck(render, (verts_clip.requires_grad_(),), atol=1e-6)


def test_antialias_blends_only_silhouettes() -> None:
    """Each triangle in its own flat colour: the shared interior edge stays sharp, the outline gets blended."""
    verts_clip, faces = screen_triangles(torch.float32)
    out = rasterize(verts_clip, faces, 16, backend="torch")
    colour = torch.stack([(out.tri_id == 0).float(), (out.tri_id == 1).float()], dim=-1)
    blended = antialias(colour, out, verts_clip, faces)
    changed = (blended != colour).any(dim=-1)
    inside = out.mask.float()[:, None]
    near_outline = (F.max_pool2d(inside, 3, stride=1, padding=1) > 0) & (
        F.max_pool2d(1 - inside, 3, stride=1, padding=1) > 0
    )
    near_outline = near_outline[:, 0]
    assert changed.any()
    assert not (changed & ~near_outline).any()
    assert blended.min() >= 0 and blended.max() <= 1


def test_auto_on_cpu_never_imports_nvdiffrast(monkeypatch: pytest.MonkeyPatch) -> None:
    class ImportSpy(importlib.abc.MetaPathFinder):
        def __init__(self) -> None:
            self.asked: list[str] = []

        def find_spec(self, name: str, path: object, target: object = None) -> None:
            if name.split(".")[0] == "nvdiffrast":
                self.asked.append(name)

    spy = ImportSpy()
    monkeypatch.delitem(sys.modules, "nvdiffrast", raising=False)
    monkeypatch.delitem(sys.modules, "nvdiffrast.torch", raising=False)
    monkeypatch.setattr(sys, "meta_path", [spy, *sys.meta_path])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    verts_clip, faces = screen_triangles(torch.float32)
    out = rasterize(verts_clip, faces, 8)
    antialias(interpolate(verts_clip[0, :, :3], out, faces), out, verts_clip, faces)
    assert backend_name("auto") == "torch"
    assert spy.asked == []


def test_explicit_nvdiffrast_without_it_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nvdiffrast", None)  # makes `import nvdiffrast...` fail
    monkeypatch.setitem(sys.modules, "nvdiffrast.torch", None)
    verts_clip, faces = screen_triangles(torch.float32)
    assert backend_name("nvdiffrast") == "nvdiffrast"
    with pytest.raises(ImportError, match="nvdiffrast"):
        rasterize(verts_clip, faces, 8, backend="nvdiffrast")


def sphere_and_box() -> tuple[torch.Tensor, torch.Tensor]:
    """A sphere with a box cutting into it: curved silhouettes, many interior edges, and occlusion."""
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.45)
    box = trimesh.creation.box(extents=(0.5, 0.5, 0.5))
    box.apply_translation((0.25, -0.2, 0.2))
    mesh = trimesh.util.concatenate([sphere, box])
    return torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces, dtype=torch.long)


NVDIFFRAST_REASON = raster.nvdiffrast_unavailable_reason()


@pytest.mark.skipif(NVDIFFRAST_REASON is not None, reason=f"nvdiffrast parity needs it on CUDA: {NVDIFFRAST_REASON}")
def test_nvdiffrast_matches_the_torch_rasteriser(record_parity) -> None:
    """Same mesh and cameras: coverage, visible triangles, barycentrics, interpolated attributes, antialiasing and
    the gradients reaching the vertices agree.

    nvdiffrast decides coverage on vertices snapped to 1/16 pixel, so a pixel centre that close to an edge may see
    the triangle across it; its barycentrics come from the unsnapped float positions, as the torch backend's do.
    """
    resolution = 96
    verts, faces = (t.cuda() for t in sphere_and_box())
    colour = torch.rand(verts.shape[0], 3, generator=torch.Generator().manual_seed(0)).cuda()
    verts_clip = project(verts, two_cameras().to("cuda"))

    def render(backend: str) -> tuple[torch.Tensor, raster.Raster]:
        clip = verts_clip.detach().clone().requires_grad_()
        return clip, rasterize(clip, faces, resolution, backend=backend)

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    (clip_t, r_t), (clip_n, r_n) = render("torch"), render("nvdiffrast")
    assert r_t.native is None and r_n.native is not None
    same = (r_t.tri_id == r_n.tri_id) & r_t.mask  # pixels that see the same triangle in both
    both = r_t.mask & r_n.mask
    colour_t, colour_n = interpolate(colour, r_t, faces), interpolate(colour, r_n, faces)
    points_t, points_n = interpolate(verts, r_t, faces), interpolate(verts, r_n, faces)
    upstream = torch.randn_like(colour_t) * same[..., None]  # gradients through the barycentrics of those pixels
    (colour_t * upstream).sum().backward()
    (colour_n * upstream).sum().backward()
    numbers = {
        "pixels": r_t.mask.numel(),
        "covered_torch": r_t.mask.sum(),
        "covered_nvdiffrast": r_n.mask.sum(),
        "mask_disagreement": (r_t.mask != r_n.mask).float().mean(),
        "triangle_disagreement_covered": 1.0 - same.sum() / both.sum(),
        "bary_max_abs": (r_t.bary - r_n.bary)[same].abs().max(),
        "depth_max_abs": (r_t.depth - r_n.depth)[same].abs().max(),
        "colour_max_abs": (colour_t - colour_n)[same].abs().max(),
        "points_max_abs": (points_t - points_n)[same].abs().max(),
        "interpolate_vertex_grad_relative": relative(clip_t.grad, clip_n.grad),
    }

    # Antialiasing one image (the torch backend's, detached) isolates the two antialiasers.
    image = colour_t.detach()
    (clip_t, r_t), (clip_n, r_n) = render("torch"), render("nvdiffrast")
    aa_t, aa_n = antialias(image, r_t, clip_t, faces), antialias(image, r_n, clip_n, faces)
    upstream = torch.randn_like(aa_t)
    (aa_t * upstream).sum().backward()
    (aa_n * upstream).sum().backward()
    numbers |= {
        "antialias_changed_pixels": (aa_n != image).any(dim=-1).float().mean(),
        "antialias_mean_abs_change": (aa_n - image).abs().mean(),
        "antialias_mean_abs_diff": (aa_t - aa_n).abs().mean(),
        "antialias_max_abs_diff": (aa_t - aa_n).abs().max(),
        "antialias_vertex_grad_relative": relative(clip_t.grad, clip_n.grad),
    }
    record_parity(**numbers)
    assert numbers["mask_disagreement"] < 0.01
    assert numbers["triangle_disagreement_covered"] < 0.05
    assert numbers["bary_max_abs"] < 1e-4 and numbers["depth_max_abs"] < 1e-5
    assert numbers["colour_max_abs"] < 1e-4 and numbers["points_max_abs"] < 1e-4
    assert numbers["interpolate_vertex_grad_relative"] < 1e-3
    # Both antialiasers follow nvdiffrast's analytic method: they must agree far better than no antialiasing does.
    assert numbers["antialias_mean_abs_diff"] < 0.1 * numbers["antialias_mean_abs_change"]
