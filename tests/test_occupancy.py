"""Empty-space skipping (pdray.render.occupancy): the grid, the marcher, early termination, the packed render."""

from __future__ import annotations

import math

import pytest
import torch

from pdray.render.cameras import camera_rays, orbit_cameras
from pdray.render.occupancy import OccupancyGrid, march, render_marched, segment_exclusive_cumsum
from pdray.render.volume import chunked_field, render_volume


class Ball:
    """Density ``sigma`` inside a ball of ``radius`` at ``centre`` (0 outside), albedo from the point."""

    def __init__(self, sigma: float, radius: float = 0.3, centre: tuple[float, float, float] = (0.0, 0.0, 0.0)):
        self.sigma, self.radius, self.centre = sigma, radius, torch.tensor(centre)

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where((x - self.centre).norm(dim=-1) < self.radius, self.sigma, 0.0)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.density(x), (x * 0.5 + 0.5).clamp(0, 1)


def white(dirs: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(dirs)


def rays(n_views: int = 2, resolution: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    return camera_rays(orbit_cameras(n_views, distance=1.6), resolution=resolution)


def updated_grid(ball: Ball, step_size: float, resolution: int = 32, refreshes: int = 8) -> OccupancyGrid:
    """The grid after ``refreshes`` refreshes (one every 16 steps), each at a random point per cell: a cell the ball
    covers in part is found occupied once a point falls inside it."""
    grid = OccupancyGrid(resolution=resolution)
    generator = torch.Generator().manual_seed(0)
    for step in range(0, 16 * refreshes, 16):
        assert grid.update(step, ball.density, step_size, generator)
    return grid


def test_segment_exclusive_cumsum_sums_each_rays_earlier_samples() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 5.0])
    ray_index = torch.tensor([0, 0, 0, 2, 2, 3])
    out = segment_exclusive_cumsum(values, ray_index, n_rays=4)
    assert out.tolist() == [0.0, 1.0, 3.0, 0.0, 10.0, 0.0]


def test_the_grid_marks_the_ball_and_only_the_ball() -> None:
    ball = Ball(sigma=50.0, radius=0.3, centre=(0.2, 0.0, 0.0))
    grid = updated_grid(ball, step_size=2 * math.sqrt(3) / 256)
    res = grid.resolution
    ijk = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), dim=-1).view(-1, 3)
    centres = (ijk + 0.5) / res * 2 - 1
    distance = (centres - ball.centre).norm(dim=-1)
    half_diagonal = math.sqrt(3) / res
    assert grid.occupied[distance < ball.radius - half_diagonal].all()  # cells wholly inside
    assert not grid.occupied[distance > ball.radius + half_diagonal].any()  # cells wholly outside
    assert 0.0 < grid.occupied_fraction < 0.05
    assert not grid.update(5, ball.density, 0.01)  # not due: refreshed every 16 steps


def test_marched_render_matches_the_dense_one_with_a_fraction_of_the_samples() -> None:
    ball = Ball(sigma=8.0, radius=0.35)
    origins, dirs = rays()
    n_samples = 256
    step = 2 * math.sqrt(3) / n_samples
    grid = updated_grid(ball, step)
    dense = render_volume(ball, white, origins, dirs, n_samples, stratified=False)
    marched = render_marched(
        ball, white, origins, dirs, grid, step, ball.density, early_stop=0.0, alpha_threshold=0.0, stratified=False
    )
    # all cells occupied, the two differ by the quadrature alone
    every = render_marched(
        ball, white, origins, dirs, OccupancyGrid(), step, ball.density, early_stop=0.0, stratified=False
    )
    assert (every.opacity - dense.opacity).abs().max() < 0.01
    assert (marched.opacity - dense.opacity).abs().max() < 0.05  # cells the ball grazes and no point hit yet
    assert (marched.rgb - dense.rgb).abs().mean() < 0.002
    # a ray through the centre: 1 - exp(-sigma * diameter)
    centre = marched.opacity[0, 12, 12, 0]
    assert centre == pytest.approx(1 - math.exp(-8.0 * 0.7), abs=0.03)
    n_dense = int((dense.weights > 0).sum())
    assert len(marched.ray_index) < 0.5 * origins[..., 0].numel() * n_samples
    assert len(marched.ray_index) < n_dense  # every sample in an occupied cell, so no more than the dense hits


def test_rays_that_miss_the_sphere_render_the_background() -> None:
    ball = Ball(sigma=8.0)
    origins = torch.tensor([0.0, 0.0, 3.0]).expand(1, 4, 4, 3)
    dirs = torch.tensor([0.0, 0.0, 1.0]).expand(1, 4, 4, 3)  # looking away from the object
    out = render_marched(ball, white, origins, dirs, OccupancyGrid(), 0.01, ball.density)
    assert len(out.ray_index) == 0 and out.opacity.sum() == 0 and (out.rgb == 1).all()


def test_early_termination_drops_samples_behind_an_opaque_surface_only() -> None:
    ball = Ball(sigma=400.0, radius=0.35)
    origins, dirs = rays()
    step = 2 * math.sqrt(3) / 256
    grid = updated_grid(ball, step)
    kwargs = {"stratified": False, "alpha_threshold": 0.0}
    every, _ = march(grid, ball.density, origins.reshape(-1, 3), dirs.reshape(-1, 3), step, early_stop=0.0, **kwargs)
    kept, _ = march(grid, ball.density, origins.reshape(-1, 3), dirs.reshape(-1, 3), step, early_stop=1e-4, **kwargs)
    assert len(kept) < 0.25 * len(every)  # a 0.7-deep ball, opaque within about 0.02 of its surface
    full = render_marched(ball, white, origins, dirs, grid, step, ball.density, early_stop=0.0, **kwargs)
    cut = render_marched(ball, white, origins, dirs, grid, step, ball.density, early_stop=1e-4, **kwargs)
    assert (full.rgb - cut.rgb).abs().max() < 1e-3
    assert (full.opacity - cut.opacity).abs().max() < 1e-3


def test_marched_render_is_differentiable_and_recompute_gives_the_same_gradients() -> None:
    from pdray.geometry.hashgrid import GridConfig
    from pdray.geometry.nerf import BackgroundField, FieldConfig, NeRFField

    torch.manual_seed(0)
    field = NeRFField(FieldConfig(grid=GridConfig(n_levels=4, log2_hashmap_size=12, base_resolution=8)))
    background = BackgroundField()
    origins, dirs = rays(resolution=16)
    step = 2 * math.sqrt(3) / 64
    grid = OccupancyGrid(resolution=16)
    grid.update(0, field.density, step, torch.Generator().manual_seed(0))
    grads = []
    for recompute in (False, True):
        field.zero_grad()
        out = render_marched(
            chunked_field(field, 1000, recompute),
            background,
            origins,
            dirs,
            grid,
            step,
            field.density,
            generator=torch.Generator().manual_seed(1),
        )
        (out.rgb.square().mean() + out.opacity.mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in field.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nerfacc's traversal needs CUDA")
def test_nerfacc_traversal_renders_as_the_torch_marcher(record_parity) -> None:
    from pdray.backends import nerfacc_unavailable_reason

    reason = nerfacc_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    ball = Ball(sigma=20.0, radius=0.35, centre=(0.1, -0.05, 0.0))
    origins, dirs = (t.cuda() for t in rays(n_views=4, resolution=64))
    ball.centre = ball.centre.cuda()
    step = 2 * math.sqrt(3) / 256
    grid = updated_grid(ball, step).cuda()
    outs = {
        backend: render_marched(ball, white, origins, dirs, grid, step, ball.density, stratified=False, backend=backend)
        for backend in ("torch", "nerfacc")
    }
    opacity = (outs["torch"].opacity - outs["nerfacc"].opacity).abs()
    rgb = (outs["torch"].rgb - outs["nerfacc"].rgb).abs()
    record_parity(
        opacity_max=float(opacity.max()),
        rgb_mean=float(rgb.mean()),
        samples_torch=len(outs["torch"].ray_index),
        samples_nerfacc=len(outs["nerfacc"].ray_index),
    )
    assert float(rgb.mean()) < 2e-3 and float(opacity.max()) < 0.05
    assert abs(len(outs["torch"].ray_index) - len(outs["nerfacc"].ray_index)) < 0.02 * len(outs["torch"].ray_index)
