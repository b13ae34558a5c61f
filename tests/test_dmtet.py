"""DMTet: the generated grid tiles the cube; marching tetrahedra gives closed, outward, differentiable meshes."""

from __future__ import annotations

import doctest
import math

import torch
import trimesh

from pdray.geometry import dmtet
from pdray.geometry.dmtet import DMTet, tet_grid


def as_trimesh(verts: torch.Tensor, faces: torch.Tensor) -> trimesh.Trimesh:
    return trimesh.Trimesh(verts.detach().numpy(), faces.numpy(), process=False)


def test_docstring_example_runs() -> None:
    assert doctest.testmod(dmtet).failed == 0


def test_tet_grid_tiles_the_cube() -> None:
    """Equal-volume tetrahedra filling the cube, meeting face to face: every inner face is shared by exactly two."""
    n, radius = 3, 0.8
    verts, tets = tet_grid(n, radius)
    assert verts.shape == ((n + 1) ** 3, 3) and tets.shape == (6 * n**3, 4)
    assert verts.abs().max() == radius
    corners = verts[tets].double()
    volumes = torch.linalg.det(corners[:, 1:] - corners[:, :1]).abs() / 6
    torch.testing.assert_close(volumes, torch.full_like(volumes, (2 * radius / n) ** 3 / 6))
    tri_faces = tets[:, [[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]]].reshape(-1, 3).sort(dim=-1).values
    _, uses = torch.unique(tri_faces, dim=0, return_counts=True)
    assert set(uses.tolist()) == {1, 2}
    assert (uses == 1).sum() == 6 * 2 * n**2  # two triangles per boundary square


def test_sphere_mesh_is_closed_outward_with_the_right_area() -> None:
    radius = 0.61
    grid = DMTet(resolution=16)
    grid.init_sdf_from_density(lambda x: -x.norm(dim=-1), threshold=-radius)  # sdf = |x| - radius
    verts, faces = grid()
    mesh = as_trimesh(verts, faces)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert abs(mesh.area / (4 * math.pi * radius**2) - 1) < 0.03
    assert abs(mesh.volume / (4 / 3 * math.pi * radius**3) - 1) < 0.05  # positive: normals point outwards


def test_mesh_reaching_the_grid_boundary_is_still_closed() -> None:
    grid = DMTet(resolution=4)
    grid.init_sdf_from_density(lambda x: torch.ones(x.shape[0]), threshold=0.5)  # inside everywhere
    mesh = as_trimesh(*grid())
    assert len(mesh.faces) > 0 and mesh.is_watertight and mesh.volume > 0


def test_mesh_is_differentiable_and_deformation_is_bounded() -> None:
    grid = DMTet(resolution=6)
    grid.init_sdf_from_density(lambda x: -x.norm(dim=-1), threshold=-0.55)
    verts, faces = grid()
    tri = verts[faces]
    area = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]).norm(dim=-1).sum() / 2
    area.backward()
    for grad in (grid.sdf.grad, grid.deform.grad):
        assert grad is not None and grad.isfinite().all() and grad.abs().sum() > 0
    with torch.no_grad():
        grid.deform.fill_(100.0)
    half_cell = 2 * grid.radius / grid.resolution / 2
    assert (grid.vertices() - grid.grid_verts).abs().max() <= half_cell + 1e-6
    assert set(grid.state_dict()) == {"sdf", "deform"}


def test_the_fitted_grid_holds_the_object_and_no_more() -> None:
    """A sphere of radius 0.3 in a field of radius 1: the cube holds it with a margin of three probe cells, so a
    DMTet of the same resolution over it meshes the sphere about 3x finer and as closed; an empty field keeps the
    whole cube, and the fit never exceeds it."""
    sphere = lambda x: 1.0 - x.norm(dim=-1) / 0.3  # noqa: E731 - density above 0 inside the sphere
    fitted = dmtet.occupied_radius(sphere, 1.0, threshold=0.0)
    assert 0.3 < fitted <= 0.3 + 3 * 2 / 64 + 1e-6
    assert dmtet.occupied_radius(lambda x: torch.zeros(len(x)), 1.0, threshold=0.0) == 1.0
    assert dmtet.occupied_radius(lambda x: torch.ones(len(x)), 0.5, threshold=0.0) == 0.5
    coarse, fine = DMTet(resolution=8), DMTet(resolution=8, radius=fitted)
    for grid in (coarse, fine):
        grid.init_sdf_from_density(sphere, threshold=0.0)
    with torch.no_grad():
        (cv, cf), (fv, ff) = coarse(), fine()
    assert len(ff) > 4 * len(cf) and as_trimesh(fv, ff).is_watertight
    assert float((fv.norm(dim=-1) - 0.3).abs().max()) < float((cv.norm(dim=-1) - 0.3).abs().max())
