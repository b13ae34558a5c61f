import pytest
import torch

from pdray.distill import (
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
    from pdray.distill import gaussian_eps

    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=g).expand(3, -1, -1, -1)
    noise, a = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0.9, 0.5, 0.02]).view(-1, 1, 1, 1)
    x_t = a.sqrt() * z + (1 - a).sqrt() * noise
    for groups in (torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0])):
        torch.testing.assert_close(gaussian_eps(x_t, a, z, groups), noise, atol=1e-5, rtol=1e-5)


def test_gaussian_eps_is_the_posterior_mean_noise_of_gaussian_particles():
    """Particles drawn from N(1, 0.25): the error is the posterior variance of the noise; fits are per group."""
    from pdray.distill import gaussian_eps

    g = torch.Generator().manual_seed(0)
    n, sigma2 = 512, 0.25
    z = 1.0 + sigma2**0.5 * torch.randn(n, 4, 8, 8, generator=g)
    noise = torch.randn(n, 4, 8, 8, generator=g)
    a = torch.full((n, 1, 1, 1), 0.5)
    x_t = a.sqrt() * z + (1 - a).sqrt() * noise
    eps = gaussian_eps(x_t, a, z, torch.zeros(n, dtype=torch.long))
    expected = float(a[0] * sigma2 / (a[0] * sigma2 + 1 - a[0]))  # Var(noise | x_t) for a Gaussian
    assert abs(float((eps - noise).square().mean()) - expected) < 0.1 * expected
    assert float((eps - noise).square().mean()) < float(noise.square().mean())
    halves = torch.arange(n) % 2
    moved = z.clone()
    moved[halves == 1] += 5.0  # the other group's latents must not change this group's estimate
    split = gaussian_eps(x_t, a, moved, halves)
    alone = gaussian_eps(x_t[halves == 0], a[halves == 0], z[halves == 0], torch.zeros(n // 2, dtype=torch.long))
    torch.testing.assert_close(split[halves == 0], alone)
