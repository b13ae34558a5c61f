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
