"""Differentiable triangle rasterisation (``rasterize``, ``interpolate``, ``antialias``) and ``project`` for cameras.

Conventions (nvdiffrast's, in pdray's image orientation):

- vertices come in clip space, ``verts_clip: [B, V, 4]``; the pixel at row ``i``, column ``j`` of an H x W image sees
  NDC ``x = (j + 0.5) / W * 2 - 1``, ``y = 1 - (i + 0.5) / H * 2``: row 0 is the top, as in ``camera_rays``;
- both facings are drawn; ``depth`` is NDC ``z / w`` (nearer is smaller) and fragments outside [-1, 1] are clipped;
- ``bary`` holds perspective-correct weights of a triangle's three vertices and is differentiable with respect to
  ``verts_clip``. Which triangle a pixel sees is discrete, so silhouettes get gradients only through ``antialias``.

Two backends with one interface: ``nvdiffrast`` (CUDA; non-commercial licence, so never required and imported only
when chosen) and ``torch`` (pure PyTorch, any device). The torch rasteriser finds the nearest triangle per pixel
without autograd, enumerating (triangle, pixel) pairs in each triangle's bounding box in chunks so memory stays
bounded, then recomputes the winners' barycentrics with autograd. It drops whole triangles with a vertex at
``w <= 0`` (behind the camera) where nvdiffrast would clip them.

Example (a cube seen by two orbit cameras)::

    >>> import trimesh
    >>> from pdray.render.cameras import orbit_cameras
    >>> box = trimesh.creation.box(extents=(0.6, 0.6, 0.6))
    >>> verts = torch.tensor(box.vertices, dtype=torch.float32)
    >>> faces = torch.tensor(box.faces, dtype=torch.long)
    >>> verts_clip = project(verts, orbit_cameras(2)).requires_grad_()
    >>> raster = rasterize(verts_clip, faces, 16, backend="torch")
    >>> colour = interpolate((verts + 1.0) / 2.0, raster, faces)
    >>> image = antialias(colour, raster, verts_clip, faces)
    >>> image.shape, raster.tri_id.shape
    (torch.Size([2, 16, 16, 3]), torch.Size([2, 16, 16]))
    >>> image.sum().backward()
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch

from pdray.backends import nvdiffrast_unavailable_reason as _nvdiffrast_reason
from pdray.render.cameras import Cameras

Backend = Literal["auto", "torch", "nvdiffrast"]

_PAIRS_PER_CHUNK = 1 << 20
"""Most (triangle, pixel) candidate pairs the torch rasteriser holds at once (about 100 MB of temporaries)."""
_MIN_W = 1e-8
"""Triangles with a vertex at ``w`` below this are behind (or on) the camera plane and are dropped."""
_EDGES_OPPOSITE = ((1, 2), (2, 0), (0, 1))
"""Edge k of a triangle joins the two vertices other than k, so barycentric k vanishes on it."""


@dataclass
class Raster:
    """What ``rasterize`` returns: the visible triangle of each pixel and where in it the pixel centre lies."""

    tri_id: torch.Tensor
    """[B, H, W] int64 index into ``faces`` of the visible triangle, -1 on the background."""
    bary: torch.Tensor
    """[B, H, W, 3] perspective-correct weights of the triangle's vertices (0 on the background)."""
    depth: torch.Tensor
    """[B, H, W] NDC depth z/w in [-1, 1], nearer is smaller (1, the far plane, on the background)."""
    native: torch.Tensor | None = None
    """nvdiffrast's own [B, H, W, 4] output (u, v, z/w, id + 1) for its interpolate and antialias; None for torch."""

    @property
    def mask(self) -> torch.Tensor:
        """[B, H, W] bool, True where a triangle is visible."""
        return self.tri_id >= 0


def perspective(fov: torch.Tensor, near: float = 0.05, far: float = 10.0) -> torch.Tensor:
    """OpenGL projection matrices [B, 4, 4] for square images from vertical ``fov: [B]`` in degrees."""
    focal = 1.0 / torch.tan(torch.deg2rad(fov) / 2.0)
    proj = torch.zeros(fov.shape[0], 4, 4, dtype=fov.dtype, device=fov.device)
    proj[:, 0, 0] = focal
    proj[:, 1, 1] = focal
    proj[:, 2, 2] = -(far + near) / (far - near)
    proj[:, 2, 3] = -2.0 * far * near / (far - near)
    proj[:, 3, 2] = -1.0
    return proj


def project(verts_world: torch.Tensor, cameras: Cameras, near: float = 0.05, far: float = 10.0) -> torch.Tensor:
    """World points ``[V, 3]`` -> clip-space vertices ``[B, V, 4]`` for each camera.

    The pixel centres of ``rasterize`` then see exactly the rays of ``camera_rays(cameras, resolution)``, so a
    rasterised mesh lines up with a volume render from the same cameras.
    """
    c2w = cameras.c2w().to(verts_world)
    rotation, eye = c2w[:, :3, :3], c2w[:, :3, 3]
    w2c = torch.zeros_like(c2w)
    w2c[:, :3, :3] = rotation.transpose(1, 2)
    w2c[:, :3, 3] = -torch.einsum("bji,bj->bi", rotation, eye)
    w2c[:, 3, 3] = 1.0
    mvp = perspective(cameras.fov.to(verts_world), near, far) @ w2c
    homogeneous = torch.cat([verts_world, torch.ones_like(verts_world[:, :1])], dim=-1)
    return torch.einsum("bij,vj->bvi", mvp, homogeneous)


def nvdiffrast_unavailable_reason() -> str | None:
    """Why ``auto`` would not use nvdiffrast here, or None when it would: a real try (its JIT build, a context and
    one triangle rasterised), once per process (``pdray.backends``)."""
    return _nvdiffrast_reason()


def backend_name(backend: Backend = "auto", device: torch.device | str | None = None) -> Literal["torch", "nvdiffrast"]:
    """The backend ``rasterize`` uses for tensors on ``device`` (any CUDA device when None); ``pdray doctor`` prints it.

    ``auto`` picks nvdiffrast for CUDA tensors where its real try works, else torch; an explicit choice is returned
    as is (``rasterize`` raises if it cannot be honoured; ``nvdiffrast_unavailable_reason`` says why).
    """
    if backend != "auto":
        return backend
    on_cuda = device is None or torch.device(device).type == "cuda"
    return "nvdiffrast" if on_cuda and nvdiffrast_unavailable_reason() is None else "torch"


def rasterize(
    verts_clip: torch.Tensor, faces: torch.Tensor, resolution: int | tuple[int, int], backend: Backend = "auto"
) -> Raster:
    """Rasterise triangles ``faces: [F, 3]`` (int) of ``verts_clip: [B, V, 4]`` at ``resolution`` (int, or (H, W))."""
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    if backend_name(backend, verts_clip.device) == "nvdiffrast":
        return _rasterize_nvdiffrast(verts_clip, faces, height, width)
    with torch.no_grad():
        tri_id = _visible_triangles(verts_clip.detach(), faces.long(), height, width)
    bary, depth = _barycentrics(verts_clip, faces.long(), tri_id)
    return Raster(tri_id, bary, depth)


def interpolate(attr: torch.Tensor, raster: Raster, faces: torch.Tensor) -> torch.Tensor:
    """Per-vertex ``attr: [V, C]`` (shared) or ``[B, V, C]`` -> per-pixel ``[B, H, W, C]``, 0 on the background.

    Differentiable with respect to ``attr`` and, through ``raster.bary``, the clip-space vertices.
    """
    if raster.native is not None:
        attr = attr if attr.dim() == 3 else attr[None]
        out, _ = _nvdiffrast().interpolate(attr.float().contiguous(), raster.native, faces.int().contiguous())
        return out
    corners = faces.long()[raster.tri_id.clamp_min(0)]  # [B, H, W, 3]
    if attr.dim() == 2:
        values = attr[corners]
    else:
        batch = torch.arange(attr.shape[0], device=attr.device)[:, None, None, None]
        values = attr[batch, corners]  # [B, H, W, 3, C]
    return (raster.bary[..., None] * values).sum(dim=-2)


def antialias(color: torch.Tensor, raster: Raster, verts_clip: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Blend ``color: [B, H, W, C]`` across silhouette edges, which gives the vertex positions silhouette gradients.

    ``raster`` must come from ``rasterize(verts_clip, faces, ...)``. The torch backend follows nvdiffrast's analytic
    method: for each pair of horizontally or vertically adjacent pixels that see different triangles, take the nearer
    one's triangle and the edge through which the segment between the two pixel centres leaves it. If that is a
    silhouette edge (no triangle across it, or one facing the other way on screen), the pixel into whose half of the
    segment the edge cuts is blended towards the other pixel's colour by the fraction cut, ``|t - 1/2|`` with the
    crossing at ``t`` along the segment. The crossing moves with the vertices, so gradients reach them.
    """
    if raster.native is not None:
        pos = _flip_y(verts_clip).float().contiguous()
        return _nvdiffrast().antialias(color.float().contiguous(), raster.native, pos, faces.int().contiguous())
    return _antialias_torch(color, raster, verts_clip, faces.long())


def _nvdiffrast() -> Any:
    """``nvdiffrast.torch``, imported on first use, or a clear error saying what is missing."""
    try:
        import nvdiffrast.torch as dr
    except ImportError as error:
        raise ImportError(
            "the nvdiffrast raster backend needs nvdiffrast, which is not installed (it needs CUDA, is not on PyPI "
            "and its licence is non-commercial: pip install git+https://github.com/NVlabs/nvdiffrast); "
            "use backend='torch' or 'auto' instead"
        ) from error
    if not torch.cuda.is_available():
        raise RuntimeError("the nvdiffrast raster backend needs a CUDA device; use backend='torch'")
    return dr


@functools.cache
def _cuda_context(device: torch.device) -> Any:
    """One nvdiffrast rasteriser context per device: creating one is slow."""
    return _nvdiffrast().RasterizeCudaContext(device=device)


def _flip_y(verts_clip: torch.Tensor) -> torch.Tensor:
    """nvdiffrast's row 0 is NDC y = -1; negating y puts pdray's top row (y = +1) there."""
    return verts_clip * verts_clip.new_tensor([1.0, -1.0, 1.0, 1.0])


def _rasterize_nvdiffrast(verts_clip: torch.Tensor, faces: torch.Tensor, height: int, width: int) -> Raster:
    dr = _nvdiffrast()
    if verts_clip.device.type != "cuda":
        raise ValueError(f"the nvdiffrast raster backend needs CUDA tensors, got {verts_clip.device}")
    pos = _flip_y(verts_clip).float().contiguous()
    native, _ = dr.rasterize(_cuda_context(pos.device), pos, faces.int().contiguous(), (height, width))
    tri_id = native[..., 3].long() - 1
    mask = tri_id >= 0
    u, v = native[..., 0], native[..., 1]
    bary = torch.stack([u, v, 1.0 - u - v], dim=-1) * mask[..., None]
    depth = torch.where(mask, native[..., 2], torch.ones_like(native[..., 2]))
    return Raster(tri_id, bary, depth, native)


def _screen(verts_clip: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clip-space ``[B, V, 4]`` -> pixel coordinates ``[B, V, 2]`` (x = column, y = row; pixel centres are integers),
    NDC depth ``[B, V]`` and ``w: [B, V]``."""
    w = verts_clip[..., 3]
    ndc = verts_clip[..., :3] / w[..., None]
    x = (ndc[..., 0] + 1.0) * (width / 2.0) - 0.5
    y = (1.0 - ndc[..., 1]) * (height / 2.0) - 0.5
    return torch.stack([x, y], dim=-1), ndc[..., 2], w


def _cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def _screen_barycentrics(tri_xy: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """Screen-space (affine) barycentrics ``[..., 3]`` of ``point: [..., 2]`` in triangles ``tri_xy: [..., 3, 2]``."""
    a, b, c = tri_xy.unbind(dim=-2)
    area = _cross(b - a, c - a)
    weights = [_cross(b - point, c - point), _cross(c - point, a - point), _cross(a - point, b - point)]
    return torch.stack(weights, dim=-1) / area[..., None]


def _visible_triangles(verts_clip: torch.Tensor, faces: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The z-buffer: index of the nearest triangle covering each pixel centre, ``[B, H, W]`` (-1 where none).

    Ties (a pixel centre exactly on a shared edge, equal depths) go to the lowest triangle index.
    """
    batch, n_faces = verts_clip.shape[0], faces.shape[0]
    xy, z, w = _screen(verts_clip, height, width)
    tri_xy = xy[:, faces].reshape(-1, 3, 2)  # one row per (camera, triangle) instance
    tri_z = z[:, faces].reshape(-1, 3)
    area = _cross(tri_xy[:, 1] - tri_xy[:, 0], tri_xy[:, 2] - tri_xy[:, 0])
    drawable = (w[:, faces].reshape(-1, 3) > _MIN_W).all(dim=-1) & (area.abs() > 1e-12) & area.isfinite()
    lo = tri_xy.amin(dim=1).ceil().clamp_min(0.0)  # first pixel centre inside the bounding box
    hi = torch.minimum(tri_xy.amax(dim=1).floor(), xy.new_tensor([width - 1.0, height - 1.0]))
    span = (hi - lo + 1.0).clamp_min(0.0)
    counts = torch.where(drawable, span[:, 0] * span[:, 1], torch.zeros_like(area)).long()
    instances = counts.nonzero().squeeze(1)
    counts, lo, n_cols = counts[instances], lo[instances].long(), span[instances, 0].long()

    best_depth = torch.full((batch * height * width,), torch.inf, dtype=z.dtype, device=z.device)
    best_tri = torch.full((batch * height * width,), -1, dtype=torch.long, device=z.device)
    ends = counts.cumsum(0)
    start = 0
    while start < len(instances):
        budget = (ends[start - 1] if start else 0) + _PAIRS_PER_CHUNK
        stop = max(int(torch.searchsorted(ends, budget, right=True)), start + 1)
        chunk_counts = counts[start:stop]
        pair = torch.repeat_interleave(torch.arange(start, stop, device=z.device), chunk_counts)
        first = torch.repeat_interleave(chunk_counts.cumsum(0) - chunk_counts, chunk_counts)
        local = torch.arange(len(pair), device=z.device) - first  # position inside the bounding box, row-major
        col = lo[pair, 0] + local % n_cols[pair]
        row = lo[pair, 1] + local // n_cols[pair]
        inst = instances[pair]
        weights = _screen_barycentrics(tri_xy[inst], torch.stack([col, row], dim=-1).to(z.dtype))
        depth = (weights * tri_z[inst]).sum(dim=-1)
        inside = (weights >= 0).all(dim=-1) & (depth >= -1.0) & (depth <= 1.0)
        pixel = ((inst // n_faces) * height + row) * width + col
        pixel, depth, face = pixel[inside], depth[inside], inst[inside] % n_faces
        chunk_best = torch.full_like(best_depth, torch.inf).scatter_reduce(0, pixel, depth, "amin")
        wins = (depth == chunk_best[pixel]) & (depth < best_depth[pixel])
        best_tri[pixel[wins]] = n_faces  # cleared, then the lowest winning index per pixel
        best_tri.scatter_reduce_(0, pixel[wins], face[wins], "amin")
        best_depth = torch.minimum(best_depth, chunk_best)
        start = stop
    return best_tri.reshape(batch, height, width)


def _barycentrics(
    verts_clip: torch.Tensor, faces: torch.Tensor, tri_id: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable perspective-correct barycentrics ``[B, H, W, 3]`` and NDC depth ``[B, H, W]`` of the visible
    triangles at the pixel centres."""
    batch, height, width = tri_id.shape
    xy, z, w = _screen(verts_clip, height, width)
    b, row, col = (tri_id >= 0).nonzero(as_tuple=True)
    corners = faces[tri_id[b, row, col]]  # [N, 3]
    b3 = b[:, None]
    point = torch.stack([col, row], dim=-1).to(xy.dtype)
    screen = _screen_barycentrics(xy[b3, corners], point)
    depth = (screen * z[b3, corners]).sum(dim=-1)
    # Screen-space weights interpolate z/w linearly; attributes need weights / w, renormalised.
    perspective_weights = screen / w[b3, corners]
    perspective_weights = perspective_weights / perspective_weights.sum(dim=-1, keepdim=True)
    bary = verts_clip.new_zeros(batch, height, width, 3).index_put((b, row, col), perspective_weights)
    depth_image = verts_clip.new_ones(batch, height, width).index_put((b, row, col), depth)
    return bary, depth_image


def _pixel_centre(pixel: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Flat pixel indices into [B, H, W] -> pixel coordinates ``[N, 2]`` (column, row) of their centres."""
    return torch.stack([pixel % width, (pixel // width) % height], dim=-1)


def _edge_neighbours(faces: torch.Tensor, n_verts: int) -> torch.Tensor:
    """``[F, 3]`` index of the triangle across edge k (opposite vertex k) of each triangle, -1 on open edges.

    An edge shared by more than two triangles (non-manifold) pairs them arbitrarily.
    """
    edges = faces[:, _EDGES_OPPOSITE]  # [F, 3, 2]
    key = (edges.amin(dim=-1) * n_verts + edges.amax(dim=-1)).reshape(-1)
    order = key.argsort()
    same = key[order[1:]] == key[order[:-1]]
    first, second = order[:-1][same], order[1:][same]
    neighbours = torch.full_like(key, -1)
    neighbours[first] = second // 3
    neighbours[second] = first // 3
    return neighbours.reshape(-1, 3)


def _antialias_torch(
    color: torch.Tensor, raster: Raster, verts_clip: torch.Tensor, faces: torch.Tensor
) -> torch.Tensor:
    batch, height, width, channels = color.shape
    xy, _, _ = _screen(verts_clip, height, width)
    with torch.no_grad():
        corners_xy = xy.detach()[:, faces]  # [B, F, 3, 2]
        front = _cross(corners_xy[:, :, 1] - corners_xy[:, :, 0], corners_xy[:, :, 2] - corners_xy[:, :, 0]) > 0
        neighbours = _edge_neighbours(faces, verts_clip.shape[1])
        silhouette = (neighbours < 0) | (front[:, neighbours.clamp_min(0)] != front[..., None])  # [B, F, 3]
    tri, depth = raster.tri_id.reshape(-1), raster.depth.reshape(-1)
    flat = color.reshape(-1, channels)
    index = torch.arange(batch * height * width, device=color.device).reshape(batch, height, width)
    targets, deltas = [], []
    for p, q in ((index[:, :, :-1], index[:, :, 1:]), (index[:, :-1], index[:, 1:])):
        p, q = p.reshape(-1), q.reshape(-1)
        differ = tri[p] != tri[q]
        p, q = p[differ], q[differ]
        p_in_front = (tri[p] >= 0) & ((tri[q] < 0) | (depth[p] <= depth[q]))
        a, b = torch.where(p_in_front, p, q), torch.where(p_in_front, q, p)  # a sees the nearer triangle
        image = a // (height * width)
        corners = faces[tri[a]]
        tri_xy = xy[image[:, None], corners]

        weights_a = _screen_barycentrics(tri_xy, _pixel_centre(a, height, width).to(xy.dtype))
        weights_b = _screen_barycentrics(tri_xy, _pixel_centre(b, height, width).to(xy.dtype))
        with torch.no_grad():
            # Along a -> b, barycentric k falls to 0 at t_k = w_k(a) / (w_k(a) - w_k(b)); the first crossing exits.
            crossing = torch.where(weights_b < 0, weights_a / (weights_a - weights_b), torch.inf)
            t_exit, edge = crossing.min(dim=-1)
            keep = t_exit.isfinite() & silhouette[image, tri[a], edge]
        a, b, edge = a[keep], b[keep], edge[keep, None]
        w_a, w_b = weights_a[keep].gather(1, edge)[:, 0], weights_b[keep].gather(1, edge)[:, 0]
        t = w_a / (w_a - w_b)
        into_b = t > 0.5
        target, source = torch.where(into_b, b, a), torch.where(into_b, a, b)
        fraction = torch.where(into_b, t - 0.5, 0.5 - t)
        targets.append(target)
        deltas.append(fraction[:, None] * (flat[source] - flat[target]))
    return flat.index_add(0, torch.cat(targets), torch.cat(deltas)).reshape(color.shape)
