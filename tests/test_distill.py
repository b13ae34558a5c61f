import pytest
import torch

from pdray.vsd.distill import (
    drop_nonfinite,
    sample_timesteps,
    sds_grad,
    surrogate_loss,
    t_bounds,
    vsd_grad,
    weighting,
)


def test_sds_is_vsd_with_the_lora_replaced_by_the_noise():
    eps, noise, a = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.rand(3, 1, 1, 1)
    torch.testing.assert_close(vsd_grad(eps, noise, a), sds_grad(eps, noise, a))


def test_weighting_and_schedule():
    a = torch.tensor([0.9, 0.5, 0.01]).view(-1, 1, 1, 1)
    torch.testing.assert_close(weighting(a).flatten(), torch.tensor([0.1, 0.5, 0.99]))
    start, end = (0.02, 0.98), (0.02, 0.5)
    assert t_bounds(0, start, end, 5000) == start and t_bounds(4999, start, end, 5000) == start
    assert t_bounds(5000, start, end, 5000) == end
    t = sample_timesteps(10000, start, 1000, torch.Generator().manual_seed(0))
    assert t.min() >= 20 and t.max() <= 980 and t.max() > 950 and t.unique().numel() > 900
    t = sample_timesteps(10000, end, 1000, torch.Generator().manual_seed(0))
    assert t.min() >= 20 and t.max() <= 500


def test_nonfinite_gradients_are_dropped_per_particle():
    g = torch.ones(3, 2, 2, 2)
    g[1, 0, 0, 0] = float("nan")
    out, dropped = drop_nonfinite(g)
    assert dropped == 1 and torch.all(out[1] == 0) and torch.all(out[[0, 2]] == 1)


def test_surrogate_loss_injects_exactly_the_gradient():
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    g = torch.randn(2, 4, 8, 8)
    surrogate_loss(z, g).backward()
    torch.testing.assert_close(z.grad, g)


@pytest.mark.parametrize("bad", [(0.5, 0.4)])
def test_t_range_must_be_ordered(bad):
    from pdray.config import ConfigError, load_config

    with pytest.raises(ConfigError):
        load_config("default", [f"t_range.end=[{bad[0]}, {bad[1]}]"])


def test_gaussian_eps_of_one_latent_or_of_identical_latents_is_the_noise_sds():
    from pdray.vsd.distill import gaussian_eps

    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=g).expand(3, -1, -1, -1)
    noise, a = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0.9, 0.5, 0.02]).view(-1, 1, 1, 1)
    for groups in (torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0])):
        torch.testing.assert_close(gaussian_eps(noise, a, z, groups), noise, atol=1e-5, rtol=1e-5)


def test_gaussian_eps_is_the_expected_posterior_mean_noise_of_the_fitted_gaussian():
    """Averaged over the noise, it equals the Gaussian's posterior-mean noise; each group is fitted on its own."""
    from pdray.vsd.distill import gaussian_eps

    g = torch.Generator().manual_seed(0)
    z = 1.0 + 0.5 * torch.randn(4, 4, 8, 8, generator=g)
    a = torch.full((4, 1, 1, 1), 0.5)
    groups = torch.zeros(4, dtype=torch.long)
    mean, variance = z.mean(0, keepdim=True), z.var(0, keepdim=True).mean(dim=(2, 3), keepdim=True)
    posterior, ours = torch.zeros_like(z), torch.zeros_like(z)
    draws = 4000
    for _ in range(draws):
        noise = torch.randn(z.shape, generator=g)
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise
        posterior += (1 - a).sqrt() * (x_t - a.sqrt() * mean) / (a * variance + 1 - a) / draws
        ours += gaussian_eps(noise, a, z, groups) / draws
    torch.testing.assert_close(ours, posterior, atol=0.05, rtol=0)
    assert float((z - mean).abs().mean()) > 0.2  # the particles are spread: the repulsion is not zero
    halves = torch.arange(4) % 2
    moved = z.clone()
    moved[halves == 1] += 5.0  # the other group's latents must not change this group's estimate
    noise = torch.randn(z.shape, generator=g)
    alone = gaussian_eps(noise[halves == 0], a[halves == 0], z[halves == 0], torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(gaussian_eps(noise, a, moved, halves)[halves == 0], alone)


def test_gaussian_repulsion_scales_the_push_and_zero_is_sds():
    from pdray.vsd.distill import gaussian_eps

    g = torch.Generator().manual_seed(1)
    z, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    a, groups = torch.full((4, 1, 1, 1), 0.5), torch.zeros(4, dtype=torch.long)
    full, half = gaussian_eps(noise, a, z, groups), gaussian_eps(noise, a, z, groups, repulsion=0.5)
    torch.testing.assert_close(half - noise, 0.5 * (full - noise))
    torch.testing.assert_close(gaussian_eps(noise, a, z, groups, repulsion=0.0), noise)


def test_coarse_is_an_orthogonal_projection_and_the_coarse_gaussian_pushes_block_means_only():
    from pdray.vsd.distill import coarse, gaussian_eps

    g = torch.Generator().manual_seed(2)
    z, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    a, groups = torch.full((4, 1, 1, 1), 0.5), torch.zeros(4, dtype=torch.long)
    for resolution in (1, 2, 4):
        p = coarse(z, resolution)
        torch.testing.assert_close(coarse(p, resolution), p)  # idempotent
        assert abs(float(((z - p) * p).sum())) < 1e-3  # the remainder is orthogonal to it
        push = gaussian_eps(noise, a, z, groups, resolution=resolution) - noise
        torch.testing.assert_close(coarse(push, resolution), push)  # the push lives on the coarse grid
        assert float(push.abs().max()) > 0.05
    per_channel = gaussian_eps(noise, a, z, groups, resolution=1) - noise
    assert torch.allclose(per_channel, per_channel[..., :1, :1].expand_as(per_channel))
    torch.testing.assert_close(gaussian_eps(noise, a, z, groups, resolution=8), gaussian_eps(noise, a, z, groups))
    assert coarse(z, None) is z


def two_pass_fit(z: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian fit as pdray computed it from the latents themselves before it moved to moments."""
    mean, variance = torch.empty_like(z), torch.zeros(z.shape[0], z.shape[1], 1, 1)
    for group in groups.unique():
        members = groups == group
        mean[members] = z[members].mean(0, keepdim=True)
        if int(members.sum()) > 1:
            variance[members] = z[members].var(0, keepdim=True).mean(dim=(2, 3), keepdim=True)
    return mean, variance


def test_the_fit_from_moments_summed_over_actors_equals_the_fit_from_every_latent():
    from pdray.vsd.distill import add_moments, camera_moments, gaussian_fit, moments_fit

    g = torch.Generator().manual_seed(3)
    z = 0.7 + torch.randn(12, 4, 8, 8, generator=g)  # 3 cameras x 4 particles, an offset the sums must survive
    keys = torch.randn(3, 16, generator=g)[torch.tensor([0, 1, 2] * 4)]  # c2w rows, camera-major per particle
    mean, variance = two_pass_fit(z, torch.tensor([0, 1, 2] * 4))
    # Three particle actors (particles 0, 1-2, 3), each summing its own latents; two replicas adding their actors'.
    actors = [camera_moments(z[sl], keys[sl]) for sl in (slice(0, 3), slice(3, 9), slice(9, 12))]
    whole = add_moments(*actors)
    by_replica = add_moments(add_moments(actors[0]), add_moments(actors[1], actors[2]))
    assert whole.count.tolist() == [4, 4, 4] and whole.total.shape == (3, 4, 8, 8)  # no particle dimension
    for moments in (whole, by_replica, camera_moments(z, keys)):
        fit_mean, fit_variance = moments_fit(moments, keys)
        torch.testing.assert_close(fit_mean, mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fit_variance, variance, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gaussian_fit(z, torch.tensor([0, 1, 2] * 4))[1], variance, rtol=1e-6, atol=1e-7)
    alone_mean, alone_variance = moments_fit(camera_moments(z[:3], keys[:3]), keys[:3])  # one particle
    assert torch.equal(alone_variance, torch.zeros(3, 4, 1, 1)) and torch.allclose(alone_mean, z[:3])
    with pytest.raises(ValueError, match="not among the fitted cameras"):
        moments_fit(whole, torch.randn(1, 16))
