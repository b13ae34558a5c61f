"""DMTet: a deformable tetrahedral grid carrying a signed distance, meshed by marching tetrahedra.

The grid is generated here at any resolution: a cube lattice of ``resolution^3`` cells over
``[-radius, radius]^3``, each cell split into the 6 tetrahedra of its Kuhn (Freudenthal) subdivision, which all share
the cell's main diagonal, so neighbouring cells meet face to face and the tetrahedra tile the cube.

Sign convention: the SDF is negative inside the surface and positive outside; from a NeRF it is
``threshold - density``. Marching tetrahedra places a vertex on every grid edge whose ends differ in sign, at the
linear zero crossing, so the mesh is differentiable with respect to the SDF and the vertex deformation. Faces are
oriented so their normals (right-hand rule) point to positive SDF, i.e. outwards.

Example (a sphere of radius 0.6)::

    >>> dmtet = DMTet(resolution=8)
    >>> dmtet.init_sdf_from_density(lambda x: 1.0 - x.norm(dim=-1), threshold=0.4)
    >>> verts, faces = dmtet()
    >>> verts.shape[1], faces.shape[1], bool(verts.norm(dim=-1).sub(0.6).abs().max() < 0.1)
    (3, 3, True)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn

DensityFn = Callable[[torch.Tensor], torch.Tensor]
"""World points ``[N, 3]`` -> density ``[N]`` (e.g. ``NeRFField.density``)."""

_TET_EDGES = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
"""The six edges of a tetrahedron, as pairs of its corners."""
_TRIANGLES = torch.tensor(
    [
        [-1, -1, -1, -1, -1, -1],
        [1, 0, 2, -1, -1, -1],
        [4, 0, 3, -1, -1, -1],
        [1, 4, 2, 1, 3, 4],
        [3, 1, 5, -1, -1, -1],
        [2, 3, 0, 2, 5, 3],
        [1, 4, 0, 1, 5, 4],
        [4, 2, 5, -1, -1, -1],
        [4, 5, 2, -1, -1, -1],
        [4, 1, 0, 4, 5, 1],
        [3, 2, 0, 3, 5, 2],
        [1, 3, 5, -1, -1, -1],
        [4, 1, 2, 4, 3, 1],
        [3, 0, 4, -1, -1, -1],
        [2, 0, 1, -1, -1, -1],
        [-1, -1, -1, -1, -1, -1],
    ]
)
"""Marching-tetrahedra table: for each sign case (bit k set when corner k is outside), the crossed edges (indices
into ``_TET_EDGES``) forming its triangles; one triangle, or a quad as two. Orientation is fixed afterwards."""
_N_TRIANGLES = torch.tensor([0, 1, 1, 2, 1, 2, 2, 1, 1, 2, 2, 1, 2, 1, 1, 0])
_BOUNDARY_SDF = 1e-4
"""Boundary vertices keep at least this SDF, so they stay outside and every extracted surface is closed."""


def tet_grid(resolution: int, radius: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid vertices ``[(n+1)^3, 3]`` in ``[-radius, radius]^3`` and tetrahedra ``[6 n^3, 4]`` (int64), n = resolution.

    Tetrahedra of both handednesses occur; nothing here depends on it.
    """
    n = resolution
    axis = torch.linspace(-radius, radius, n + 1)
    verts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    steps = torch.tensor([(n + 1) ** 2, n + 1, 1])  # index offset of one step along x, y, z
    cells = torch.arange(n)
    i, j, k = torch.meshgrid(cells, cells, cells, indexing="ij")
    base = (i * steps[0] + j * steps[1] + k * steps[2]).reshape(-1)  # the cell's (0, 0, 0) corner
    # Kuhn subdivision: walk from corner (0, 0, 0) to (1, 1, 1) one axis at a time, in each of the 6 axis orders.
    paths = torch.tensor(
        [[0, steps[a], steps[a] + steps[b], int(steps.sum())] for a, b, _ in itertools.permutations(range(3))]
    )
    tets = (base[:, None, None] + paths[None]).reshape(-1, 4)
    return verts, tets


def marching_tetrahedra(
    verts: torch.Tensor, tets: torch.Tensor, sdf: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The zero level set of ``sdf: [V]`` on tetrahedra ``tets: [T, 4]`` over ``verts: [V, 3]``.

    Returns mesh vertices ``[N, 3]`` (differentiable w.r.t. ``verts`` and ``sdf``) and faces ``[M, 3]`` (int64),
    oriented with normals towards positive SDF. A vertex with SDF exactly 0 counts as inside.
    """
    device, n_verts = verts.device, verts.shape[0]
    with torch.no_grad():
        outside = sdf > 0
        corner_outside = outside[tets]  # [T, 4]
        n_outside = corner_outside.sum(dim=-1)
        crossed_tets = (n_outside > 0) & (n_outside < 4)
        tets, corner_outside = tets[crossed_tets], corner_outside[crossed_tets]
        edges = tets[:, _TET_EDGES.to(device)].sort(dim=-1).values  # [T', 6, 2]
        keys, edge_of_tet = torch.unique(edges[..., 0] * n_verts + edges[..., 1], return_inverse=True)
        ends_a, ends_b = keys // n_verts, keys % n_verts
        crossed = outside[ends_a] != outside[ends_b]
        # One mesh vertex per crossed grid edge, shared by all the tetrahedra around that edge.
        mesh_vertex = torch.where(crossed, crossed.cumsum(0) - 1, -1)[edge_of_tet]  # [T', 6]
        ends_a, ends_b = ends_a[crossed], ends_b[crossed]

        case = (corner_outside.long() * torch.tensor([1, 2, 4, 8], device=device)).sum(dim=-1)
        n_triangles = _N_TRIANGLES.to(device)[case]
        table = _TRIANGLES.to(device)[case]
        one, two = n_triangles == 1, n_triangles == 2
        faces = torch.cat(
            [mesh_vertex[one].gather(1, table[one, :3]), mesh_vertex[two].gather(1, table[two]).reshape(-1, 3)]
        )
        source = torch.cat([tets[one], tets[two].repeat_interleave(2, dim=0)])  # the tetrahedron of each face
        source_outside = torch.cat([corner_outside[one], corner_outside[two].repeat_interleave(2, dim=0)])

    sdf_a, sdf_b = sdf[ends_a], sdf[ends_b]
    t = (sdf_a / (sdf_a - sdf_b))[:, None]
    mesh_verts = verts[ends_a] + t * (verts[ends_b] - verts[ends_a])

    with torch.no_grad():
        # SDF is affine inside a tetrahedron, so it grows from the mean inside corner towards the mean outside one.
        corners = verts.detach()[source]  # [M, 4, 3]
        weight_out = source_outside[..., None].to(corners.dtype)
        mean_out = (corners * weight_out).sum(dim=1) / weight_out.sum(dim=1)
        mean_in = (corners * (1 - weight_out)).sum(dim=1) / (1 - weight_out).sum(dim=1)
        tri = mesh_verts.detach()[faces]
        normal = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        inward = (normal * (mean_out - mean_in)).sum(dim=-1) < 0
        faces = torch.where(inward[:, None], faces[:, [0, 2, 1]], faces)
    return mesh_verts, faces


def occupied_radius(
    density_fn: DensityFn, radius: float, threshold: float, probe: int = 64, margin_cells: int = 3
) -> float:
    """Half the side of the smallest origin-centred cube holding every point of ``[-radius, radius]^3`` where the
    density exceeds ``threshold``, read on a ``probe``^3 lattice and padded by ``margin_cells`` of its cells (capped
    at ``radius``; ``radius`` when nothing is occupied). A DMTet grid over this cube spends its cells on the object
    rather than on the empty rest of the field's bounding cube."""
    return occupied_radii(density_fn, radius, [threshold], probe, margin_cells)[0]


@torch.no_grad()
def occupied_radii(
    density_fn: DensityFn, radius: float, thresholds: list[float], probe: int = 64, margin_cells: int = 3
) -> list[float]:
    """``occupied_radius`` at each of ``thresholds``, from one read of the lattice."""
    axis = torch.linspace(-radius, radius, probe + 1)
    points = torch.cartesian_prod(axis, axis, axis)
    density = torch.cat([density_fn(part).reshape(-1) for part in points.split(1 << 16)])
    extent = points.abs().amax(dim=-1)
    radii = []
    for threshold in thresholds:
        occupied = density > threshold
        if not occupied.any():
            radii.append(radius)
            continue
        radii.append(min(radius, float(extent[occupied].max()) + margin_cells * 2 * radius / probe))
    return radii


class DMTet(nn.Module):
    """A tetrahedral grid with a learnable SDF and a learnable, bounded deformation per vertex.

    The deformation is ``tanh``-squashed to at most half a cell along each axis, as in DMTet, so vertices stay near
    their grid positions. Only ``sdf`` and ``deform`` are saved in the state dict; the grid is rebuilt from
    ``resolution`` and ``radius``.
    """

    def __init__(self, resolution: int = 64, radius: float = 1.0) -> None:
        super().__init__()
        self.resolution = resolution
        self.radius = radius
        grid_verts, tets = tet_grid(resolution, radius)
        self.register_buffer("grid_verts", grid_verts, persistent=False)
        self.register_buffer("tets", tets, persistent=False)
        self.register_buffer("on_boundary", (grid_verts.abs() >= radius * (1 - 1e-6)).any(dim=-1), persistent=False)
        self.sdf = nn.Parameter(torch.zeros(grid_verts.shape[0]))
        """[V] signed distance (negative inside)."""
        self.deform = nn.Parameter(torch.zeros_like(grid_verts))
        """[V, 3] unbounded deformation, squashed by ``tanh``."""
        self.max_deform = radius / resolution
        """Half of the cell size ``2 * radius / resolution``."""

    def vertices(self) -> torch.Tensor:
        """Deformed grid vertices ``[V, 3]``."""
        return self.grid_verts + self.max_deform * torch.tanh(self.deform)

    def signed_distance(self) -> torch.Tensor:
        """The SDF ``[V]`` that is meshed: ``sdf`` with boundary vertices kept outside, so the mesh is closed."""
        return torch.where(self.on_boundary, self.sdf.clamp_min(_BOUNDARY_SDF), self.sdf)

    @torch.no_grad()
    def init_sdf_from_density(self, density_fn: DensityFn, threshold: float, chunk: int = 1 << 16) -> None:
        """Set ``sdf = threshold - density`` at the (deformed) vertices: inside is where the density exceeds
        ``threshold``. ``density_fn`` is evaluated in chunks of ``chunk`` points."""
        points = self.vertices()
        density = torch.cat([density_fn(part).reshape(-1) for part in points.split(chunk)])
        self.sdf.copy_(threshold - density)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Marching tetrahedra: mesh vertices ``[N, 3]`` (differentiable) and outward faces ``[M, 3]`` (int64)."""
        return marching_tetrahedra(self.vertices(), self.tets, self.signed_distance())
