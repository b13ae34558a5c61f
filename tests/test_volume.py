"""Volume rendering, the NeRF fields it renders, and the regularisers — at tiny sizes."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

from pdray.geometry.hashgrid import GridConfig
from pdray.geometry.nerf import BackgroundField, FieldConfig, NeRFField
from pdray.render import volume
from pdray.render.cameras import Cameras, camera_rays, orbit_cameras
from pdray.render.volume import (
    opacity_entropy_loss,
    orientation_loss,
    render_volume,
    sparsity_loss,
)

TINY_GRID = GridConfig(kind="dense", n_levels=2, base_resolution=8, per_level_scale=2.0)


def tiny_field(**overrides: object) -> NeRFField:
    return NeRFField(FieldConfig(grid=TINY_GRID, hidden_dim=16, **overrides))


def front_camera() -> Cameras:
    """One camera on the +x axis at distance 1.8 (right of the image is +y in the world)."""
    return Cameras(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([1.8]), torch.tensor([45.0]))


def ball(radius: float = 0.5, sigma: float = 100.0):
    """A white ball of uniform density: field and analytic normals."""

    def field(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sigma * (x.norm(dim=-1) < radius).float(), torch.ones_like(x)

    return field, lambda x: F.normalize(x, dim=-1)


def grey(dirs: torch.Tensor) -> torch.Tensor:
    return torch.full_like(dirs, 0.5)


def test_docstring_example_runs() -> None:
    assert doctest.testmod(volume).failed == 0


def test_render_shapes() -> None:
    field = tiny_field()
    origins, dirs = camera_rays(orbit_cameras(2), resolution=8)
    out = render_volume(field, BackgroundField(), origins, dirs, n_samples=16, normal_fn=field.normals)
    assert out.rgb.shape == (2, 8, 8, 3)
    assert out.opacity.shape == out.depth.shape == (2, 8, 8, 1)
    assert out.normal is not None and out.normal.shape == (2, 8, 8, 3)
    assert out.weights.shape == (2, 8, 8, 16)
    assert out.sample_normals is not None and out.sample_normals.shape == (2, 8, 8, 16, 3)
    assert ((out.rgb >= 0) & (out.rgb <= 1)).all()
    assert render_volume(field, grey, origins, dirs, n_samples=16).normal is None


def test_empty_field_is_transparent() -> None:
    field = tiny_field(density_bias="none")
    with torch.no_grad():  # raw density -30 everywhere: softplus gives ~1e-13
        field.mlp[-1].weight.zero_()
        field.mlp[-1].bias.fill_(-30.0)
    origins, dirs = camera_rays(orbit_cameras(2), resolution=8)
    out = render_volume(field, grey, origins, dirs, n_samples=16)
    assert out.opacity.max() < 1e-6
    torch.testing.assert_close(out.rgb, torch.full_like(out.rgb, 0.5))


def test_blob_is_opaque_at_centre_and_clear_around() -> None:
    origins, dirs = camera_rays(front_camera(), resolution=16)
    opacity = render_volume(tiny_field(), grey, origins, dirs, n_samples=64).opacity[0, :, :, 0]
    assert opacity[7:9, 7:9].min() > 0.95
    # The corner rays pass ~0.9 from the centre, far outside the blob's radius of 0.5.
    assert opacity[[0, 0, -1, -1], [0, -1, 0, -1]].max() < 0.05


def test_negative_blob_is_empty_at_centre_and_dense_outside() -> None:
    density = tiny_field(density_bias="negative_blob").density(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.9, 0.0]]))
    assert density[0] < 0.01 and density[1] > 5.0


def test_rays_missing_the_sphere_show_background() -> None:
    origins = torch.tensor([0.0, 0.0, 3.0]).expand(1, 2, 2, 3)
    dirs = torch.tensor([0.0, 0.0, 1.0]).expand(1, 2, 2, 3)  # pointing away from the sphere
    out = render_volume(tiny_field(), grey, origins, dirs, n_samples=8)
    assert (out.opacity == 0).all() and (out.weights == 0).all()
    torch.testing.assert_close(out.rgb, torch.full_like(out.rgb, 0.5))


def test_rgb_gradients_reach_field_and_background() -> None:
    field, background = tiny_field(), BackgroundField()
    origins, dirs = camera_rays(orbit_cameras(1), resolution=8)
    out = render_volume(field, background, origins, dirs, n_samples=16, shading="lambertian", normal_fn=field.normals)
    out.rgb.sum().backward()
    for module in (field.encoding, field.mlp, background):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_trunc_exp_density_has_finite_gradients() -> None:
    field = tiny_field(density_activation="trunc_exp")
    origins, dirs = camera_rays(front_camera(), resolution=4)
    render_volume(field, grey, origins, dirs, n_samples=16).rgb.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in field.parameters())


def test_lambertian_sphere_is_brighter_on_the_lit_side() -> None:
    field, normal_fn = ball()
    origins, dirs = camera_rays(front_camera(), resolution=16)
    light = torch.tensor([[0.0, 1.0, 0.0]])  # from +y: the right of the image
    out = render_volume(
        field, grey, origins, dirs, n_samples=64, shading="lambertian", light_direction=light, normal_fn=normal_fn
    )
    lum = out.rgb[0, 4:12].mean(-1)  # rows through the ball
    assert lum[:, 10:13].mean() > lum[:, 3:6].mean() + 0.2
    # Facing away from the light, only the ambient term is left; albedo shading is flat white.
    torch.testing.assert_close(lum[2:6, 3:6], torch.full((4, 3), 0.45), atol=0.03, rtol=0)
    flat = render_volume(field, grey, origins, dirs, n_samples=64, shading="albedo", normal_fn=normal_fn)
    torch.testing.assert_close(flat.rgb[0, 6:10, 6:10], torch.ones(4, 4, 3), atol=0.02, rtol=0)


def test_shading_without_normals_is_an_error() -> None:
    field, _ = ball()
    origins, dirs = camera_rays(front_camera(), resolution=4)
    with pytest.raises(ValueError, match="normal_fn"):
        render_volume(field, grey, origins, dirs, n_samples=8, shading="textureless")


def test_blob_normals_point_outwards() -> None:
    field = tiny_field()
    x = F.normalize(torch.randn(100, 3), dim=-1) * 0.3
    normals = field.normals(x)
    torch.testing.assert_close(normals.norm(dim=-1), torch.ones(100))
    assert (normals * F.normalize(x, dim=-1)).sum(-1).min() > 0.95


def test_depth_and_normals_of_a_ball() -> None:
    field, normal_fn = ball()
    origins, dirs = camera_rays(front_camera(), resolution=8)
    out = render_volume(field, grey, origins, dirs, n_samples=128, stratified=False, normal_fn=normal_fn)
    centre = out.depth[0, 3:5, 3:5] / out.opacity[0, 3:5, 3:5]
    torch.testing.assert_close(centre, torch.full_like(centre, 1.3), atol=0.05, rtol=0)
    assert out.normal is not None and (out.normal[0, 3:5, 3:5, 0] > 0.9).all()  # facing the camera at +x


def test_random_background_is_seeded_and_solid() -> None:
    field, _ = ball(radius=0.0)  # empty
    origins, dirs = camera_rays(orbit_cameras(3), resolution=4)

    def render(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return render_volume(
            field, grey, origins, dirs, n_samples=4, generator=generator, random_background_prob=1.0
        ).rgb

    rgb = render(0)
    torch.testing.assert_close(rgb, render(0))
    assert not torch.equal(rgb, render(1))
    torch.testing.assert_close(rgb, rgb[:, :1, :1].expand_as(rgb))  # one colour per image
    assert not torch.allclose(rgb[0, 0, 0], rgb[1, 0, 0])


def test_stratified_sampling_follows_the_generator() -> None:
    field = tiny_field()
    origins, dirs = camera_rays(front_camera(), resolution=4)

    def render(seed: int) -> torch.Tensor:
        return render_volume(field, grey, origins, dirs, n_samples=8, generator=torch.Generator().manual_seed(seed)).rgb

    torch.testing.assert_close(render(0), render(0))
    assert not torch.equal(render(0), render(1))


def test_sparsity_loss_values() -> None:
    assert sparsity_loss(torch.zeros(4, 1)).item() == pytest.approx(0.1)
    assert sparsity_loss(torch.ones(4, 1)).item() == pytest.approx(math.sqrt(1.01))


def test_opacity_entropy_loss_values() -> None:
    assert opacity_entropy_loss(torch.full((3, 1), 0.5)).item() == pytest.approx(math.log(2.0))
    assert opacity_entropy_loss(torch.tensor([0.0, 1.0])).item() < 0.01


def test_orientation_loss_values() -> None:
    dirs = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # two rays, [R, 3]
    weights = torch.tensor([[0.5, 0.25], [1.0, 0.0]], requires_grad=True)  # [R, S]
    towards_camera = -dirs[:, None, :].expand(2, 2, 3)
    assert orientation_loss(weights, towards_camera, dirs).item() == 0.0
    away = dirs[:, None, :].expand(2, 2, 3).clone().requires_grad_(True)
    loss = orientation_loss(weights, away, dirs)
    assert loss.item() == pytest.approx((0.75 + 1.0) / 2)
    loss.backward()
    assert weights.grad is None and away.grad is not None  # weights are stop-gradient
