"""Empty-space skipping for the NeRF: an occupancy grid, rays marched through its occupied cells, early termination.

A dense stratified renderer spends ``n_samples`` field evaluations on every ray, empty or not; at the paper's 512 x
512 rays and 512 samples that is 134 M samples per view, more memory than a GPU has. Instant-NGP's scheme, as
nerfacc's ``OccGridEstimator`` implements it and threestudio's ProlificDreamer uses it:

- ``OccupancyGrid``: a ``resolution^3`` grid over the cube [-radius, radius]^3 holding, per cell, a running maximum of
  the field's density times the step size (decayed each update), and which cells are occupied (above a threshold).
  It is refreshed every ``update_every`` steps from the field itself, all cells during the warm-up, then a random
  quarter of all cells and of the occupied ones.
- ``march``: each ray steps at a fixed ``step_size`` from its entry into the bounding sphere (jittered by one uniform
  draw per ray), and keeps the intervals whose midpoint lies in an occupied cell; a density pass without autograd then
  drops the samples behind transmittance ``early_stop`` (early ray termination) and those with opacity below
  ``alpha_threshold``.
- ``render_marched``: the field evaluated with autograd at the samples left (packed, one row per sample), NeRF's
  quadrature per ray by a segmented cumulative sum, composited over the background as ``render_volume`` does.

``march`` runs in PyTorch (any device); on CUDA with nerfacc installed, ``backend="nerfacc"`` (or ``auto``) traverses
the same grid with nerfacc's kernels instead (``tests/test_occupancy.py`` holds the two against each other). Random
draws come from pdray's streams, so a run resumed from a checkpoint (which holds the grid) marches the same samples.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from pdray.backends import nerfacc_unavailable_reason
from pdray.render.volume import (
    BackgroundFn,
    FieldFn,
    NormalFn,
    Shading,
    VolumeRender,
    background_images,
    draw_uniform,
    intersect_sphere,
    ray_lights,
    shade,
)

MarchBackend = Literal["auto", "torch", "nerfacc"]
CHUNK = 1 << 18
"""Samples per chunk of the passes without autograd (the grid update, the marching, the early-termination pass)."""


class OccupancyGrid(nn.Module):
    """Which cells of the cube [-radius, radius]^3 hold anything, kept up to date from the field (Instant-NGP).

    Buffers (saved with the particle, so a resumed run marches the same samples): ``density: [res^3]``, per cell the
    running maximum of density x step size, and ``occupied: [res^3]`` (bool; all True before the first update), both
    indexed ``(ix * res + iy) * res + iz`` as nerfacc's grid is.
    """

    def __init__(
        self,
        resolution: int = 32,
        radius: float = 1.0,
        threshold: float = 0.01,
        decay: float = 0.95,
        update_every: int = 16,
        warmup_steps: int = 256,
    ) -> None:
        super().__init__()
        self.resolution, self.radius = resolution, radius
        self.threshold, self.decay = threshold, decay
        self.update_every, self.warmup_steps = update_every, warmup_steps
        self.register_buffer("density", torch.zeros(resolution**3))
        self.register_buffer("occupied", torch.ones(resolution**3, dtype=torch.bool))

    @property
    def occupied_fraction(self) -> float:
        return float(self.occupied.float().mean())

    def cell_index(self, points: torch.Tensor) -> torch.Tensor:
        """Flat cell index ``[N]`` of world points ``[N, 3]`` (points outside the cube are clamped to its border)."""
        res = self.resolution
        ijk = ((points / self.radius + 1.0) * (res / 2.0)).floor().long().clamp(0, res - 1)
        return (ijk[:, 0] * res + ijk[:, 1]) * res + ijk[:, 2]

    @torch.no_grad()
    def update(self, step: int, density_fn, step_size: float, generator: torch.Generator | None = None) -> bool:
        """Refresh the grid from ``density_fn`` (world points ``[N, 3]`` -> density ``[N]``) if ``step`` is due;
        returns whether it was. Each refreshed cell takes ``max(decay x old, density at a random point of it x
        step_size)``; a cell is occupied above ``min(threshold, mean over cells)`` (nerfacc's rule)."""
        if step % self.update_every:
            return False
        device, res, n = self.density.device, self.resolution, self.density.numel()
        if step < self.warmup_steps:
            cells = torch.arange(n, device=device)
        else:
            uniform = draw_uniform((n // 4,), generator, device).mul(n).long().clamp_max(n - 1)
            occupied = self.occupied.nonzero().squeeze(1)
            picks = draw_uniform((n // 4,), generator, device).mul(len(occupied)).long()
            picks = picks.clamp_max(max(len(occupied) - 1, 0))
            cells = torch.cat([uniform, occupied[picks]]) if len(occupied) else uniform
        ijk = torch.stack([cells // (res * res), (cells // res) % res, cells % res], dim=1).float()
        points = ((ijk + draw_uniform(tuple(ijk.shape), generator, device)) / res * 2.0 - 1.0) * self.radius
        values = torch.cat([density_fn(chunk) for chunk in points.split(CHUNK)]).float() * step_size
        # a cell drawn twice takes the larger value: a reduction in any order gives the same grid (resume is exact)
        fresh = torch.full_like(self.density, -1.0).scatter_reduce_(0, cells, values, "amax")
        touched = fresh >= 0.0
        self.density.copy_(torch.where(touched, torch.maximum(self.density * self.decay, fresh), self.density))
        self.occupied.copy_(self.density > min(self.threshold, float(self.density.mean())))
        return True


def segment_exclusive_cumsum(values: torch.Tensor, ray_index: torch.Tensor, n_rays: int) -> torch.Tensor:
    """Per ray, the sum of ``values: [N]`` over the samples before each one; samples are grouped by ray, in order.

    One cumulative sum over all samples, in float64 (millions of float32 terms would lose the small ones), minus its
    value at each ray's first sample; differentiable."""
    total = torch.cumsum(values.double(), 0)
    exclusive = total - values.double()
    counts = torch.bincount(ray_index, minlength=n_rays)
    first = torch.cumsum(counts, 0) - counts  # [n_rays] index of each ray's first sample
    return (exclusive - exclusive[first[ray_index]]).to(values.dtype)


def _march_torch(
    grid: OccupancyGrid,
    origins: torch.Tensor,
    dirs: torch.Tensor,
    near: torch.Tensor,
    far: torch.Tensor,
    step_size: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ray index ``[N]``, interval start ``[N]``) of the steps from ``near`` whose midpoint lies before ``far`` in an
    occupied cell, grouped by ray in order; ``origins, dirs, near, far`` hold the rays ``[R, ...]`` to march."""
    n_steps = max(1, math.ceil(float((far - near).max()) / step_size)) if len(near) else 1
    offsets = (torch.arange(n_steps, device=near.device) + 0.5) * step_size
    rays_per_chunk = max(1, CHUNK // n_steps)
    index = [torch.zeros(0, dtype=torch.long, device=near.device)]  # no ray hitting the sphere: no samples
    starts = [near.new_zeros(0)]
    for lo in range(0, len(near), rays_per_chunk):
        hi = min(lo + rays_per_chunk, len(near))
        mid = near[lo:hi, None] + offsets  # [r, K] midpoints
        points = origins[lo:hi, None] + dirs[lo:hi, None] * mid[..., None]
        keep = (mid < far[lo:hi, None]) & grid.occupied[grid.cell_index(points.view(-1, 3))].view(mid.shape)
        ray, k = keep.nonzero(as_tuple=True)  # row-major: grouped by ray, in order along it
        index.append(ray + lo)
        starts.append(mid[ray, k] - 0.5 * step_size)
    return torch.cat(index), torch.cat(starts)


def _march_nerfacc(
    grid: OccupancyGrid,
    origins: torch.Tensor,
    dirs: torch.Tensor,
    near: torch.Tensor,
    far: torch.Tensor,
    step_size: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_march_torch`` through nerfacc's grid traversal (CUDA); the jitter is already in ``near``."""
    import nerfacc

    r = grid.radius
    estimator = nerfacc.OccGridEstimator(roi_aabb=[-r, -r, -r, r, r, r], resolution=grid.resolution, levels=1)
    estimator = estimator.to(origins.device)
    res = grid.resolution
    estimator.binaries.copy_(grid.occupied.view(1, res, res, res))
    index, starts, _ = estimator.sampling(
        origins.contiguous(),
        dirs.contiguous(),
        t_min=near.contiguous(),
        t_max=far.contiguous(),
        render_step_size=step_size,
        stratified=False,
        early_stop_eps=0.0,
        alpha_thre=0.0,
    )
    return index.long(), starts


def march_backend_name(backend: MarchBackend, device: torch.device) -> Literal["torch", "nerfacc"]:
    """The marcher ``march`` uses for rays on ``device``: ``auto`` takes nerfacc on CUDA where a real try works."""
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "torch"
    return "nerfacc" if nerfacc_unavailable_reason() is None else "torch"


@torch.no_grad()
def march(
    grid: OccupancyGrid,
    density_fn,
    origins: torch.Tensor,
    dirs: torch.Tensor,
    step_size: float,
    *,
    early_stop: float = 1e-4,
    alpha_threshold: float = 0.0,
    generator: torch.Generator | None = None,
    stratified: bool = True,
    backend: MarchBackend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples of rays ``origins, dirs: [R, 3]`` (unit dirs) worth evaluating: (ray index ``[N]``, interval start
    ``[N]``; each interval is ``step_size`` long), grouped by ray in order along it.

    Rays start where they enter the grid's bounding sphere, jittered by ``U(0, 1) x step_size`` per ray when
    ``stratified``. Samples in empty cells are skipped; a pass of ``density_fn`` without autograd then drops those
    whose transmittance has fallen below ``early_stop`` and those with opacity below ``min(alpha_threshold, mean of
    the grid's values)`` (nerfacc's rule)."""
    t_near, t_far, hit = intersect_sphere(origins, dirs, grid.radius)
    rays = hit.nonzero().squeeze(1)
    near, far = t_near[rays], t_far[rays]
    if stratified:
        near = near + draw_uniform((len(rays),), generator, origins.device) * step_size
    marcher = _march_nerfacc if march_backend_name(backend, origins.device) == "nerfacc" else _march_torch
    local, starts = marcher(grid, origins[rays], dirs[rays], near, far, step_size)
    index = rays[local]
    if len(index) and (early_stop > 0.0 or alpha_threshold > 0.0):
        mid = starts + 0.5 * step_size
        points = origins[index] + dirs[index] * mid[:, None]
        tau = torch.cat([density_fn(chunk) for chunk in points.split(CHUNK)]).float() * step_size
        alpha = 1.0 - torch.exp(-tau)
        transmittance = torch.exp(-segment_exclusive_cumsum(tau, index, len(origins)))
        keep = transmittance >= early_stop
        threshold = min(alpha_threshold, float(grid.density.mean()))
        if threshold > 0.0:
            keep &= alpha >= threshold
        index, starts = index[keep], starts[keep]
    return index, starts


def render_marched(
    field: FieldFn,
    background: BackgroundFn,
    origins: torch.Tensor,
    dirs: torch.Tensor,
    grid: OccupancyGrid,
    step_size: float,
    density_fn,
    *,
    early_stop: float = 1e-4,
    alpha_threshold: float = 0.0,
    shading: Shading = "albedo",
    light_direction: torch.Tensor | None = None,
    ambient: float = 0.45,
    generator: torch.Generator | None = None,
    stratified: bool = True,
    random_background_prob: float = 0.0,
    normal_fn: NormalFn | None = None,
    backend: MarchBackend = "auto",
) -> VolumeRender:
    """``render_volume`` with empty-space skipping: rays ``origins, dirs: [B, H, W, 3]`` marched through ``grid``.

    The returned ``weights`` and ``sample_normals`` are packed (``[N]``, ``[N, 3]``, one row per sample) with the
    ray of each in ``ray_index`` (flat over B, H, W). Random draws come from ``generator``, in order: the marching
    jitter, then the background choice and colours (as ``render_volume``)."""
    if origins.dim() != 4:
        raise ValueError(f"origins and dirs must be [B, H, W, 3], got {tuple(origins.shape)}")
    batch_shape = origins.shape[:-1]
    o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    n_rays = o.shape[0]
    index, starts = march(
        grid,
        density_fn,
        o,
        d,
        step_size,
        early_stop=early_stop,
        alpha_threshold=alpha_threshold,
        generator=generator,
        stratified=stratified,
        backend=backend,
    )
    mid = starts + 0.5 * step_size
    points = o[index] + d[index] * mid[:, None]
    density, albedo = field(points)
    tau = density * step_size
    weights = (1.0 - torch.exp(-tau)) * torch.exp(-segment_exclusive_cumsum(tau, index, n_rays))
    normals = normal_fn(points) if normal_fn is not None else None
    colour = shade(albedo, normals, ray_lights(light_direction, batch_shape, o)[index], shading, ambient)

    def composite(values: torch.Tensor) -> torch.Tensor:
        """sum_i w_i * values_i over each ray's samples: [B, H, W, C]."""
        summed = values.new_zeros(n_rays, values.shape[1]).index_add(0, index, weights[:, None] * values)
        return summed.view(*batch_shape, -1)

    opacity = composite(torch.ones_like(weights)[:, None])
    bg = background_images(background, dirs, random_background_prob, generator)
    return VolumeRender(
        rgb=composite(colour) + (1.0 - opacity) * bg,
        opacity=opacity,
        depth=composite(mid[:, None]),
        normal=composite(normals) if normals is not None else None,
        weights=weights,
        sample_normals=normals,
        ray_index=index,
    )
