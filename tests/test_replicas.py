"""Score replicas without Ray: the math of sharding the score work and keeping one LoRA, on the tiny random prior.

The Ray layer (``pdray.cluster.driver``) only moves these calls between processes; ``tests/test_ray.py`` runs them on
a real cluster. Without Ray (a GPU machine: ``scripts/gpu_check.sh``) all but the driver's checks run, on the device
the prior picks."""

from __future__ import annotations

import pytest
import torch

from pdray.config import load_config
from pdray.priors.diffusion import load_prior
from pdray.vsd.allreduce import cut, join, local_sum, sum_in_order
from pdray.vsd.distill import add_moments
from pdray.vsd.particle import ParticleGroup
from pdray.vsd.score import ScoreEstimator


def config(model, *overrides):
    return load_config(
        "default",
        [
            f"prior.model={model}",
            "stages=[nerf]",
            "particles=4",
            "nerf.resolution=16",
            "nerf.n_samples=8",
            "wandb=off",
            "score_batch_size=3",  # chunks that would straddle two actors' renders if they were allowed to
            *overrides,
        ],
    )


def two_actors(cfg):
    """The renders of two particle actors holding particles [0, 1] and [2, 3]."""
    prior = load_prior(cfg.prior, vae_only=True)
    return [ParticleGroup(cfg, ids, prior) for ids in ([0, 1], [2, 3])]


@pytest.mark.parametrize("score", ["gaussian", "lora", "gaussian_lora"])
def test_two_replicas_give_one_replica_s_gradients_and_lora_bit_for_bit(tiny_model, score):
    cfg = config(tiny_model, f"particle_score={score}", "lora.steps_per_update=2", "camera.views_per_step=2")
    groups = two_actors(cfg)
    one = ScoreEstimator(cfg, load_prior(cfg.prior))
    replicas = [ScoreEstimator(cfg, load_prior(cfg.prior)) for _ in range(2)]
    for step in range(3):
        renders = [g.render(step)[0] for g in groups]
        expected, _ = one.grads(step, *renders)
        if cfg.fits_all_particles:  # each replica scores its own render, fitted from both actors' moments
            moments = add_moments(*(replicas[r].moments(renders[r]) for r in range(2)))
            got = [replicas[r].grads(step, renders[r], moments=moments)[0][0] for r in range(2)]
        else:
            got = [replicas[r].grads(step, renders[r])[0][0] for r in range(2)]
        for e, g in zip(expected, got, strict=True):
            assert torch.equal(e, g)
        if not cfg.trains_lora:
            continue
        one.lora_update(step, *renders)
        for k in range(cfg.lora.steps_per_update):  # the all-reduce the Ray layer wires: cut, reduce, join, apply
            cuts = [cut(local_sum(replicas[r].lora_grads(step, k, renders[r])).grad, 2) for r in range(2)]
            sums = [sum_in_order([pieces[j] for pieces in cuts]) for j in range(2)]
            shares = [replicas[r].lora_grads(step, k, renders[r])[0] for r in range(2)]
            loss_sum, count = sum(s.loss_sum for s in shares), sum(s.count for s in shares)
            losses = {replica.lora_apply_summed(join(sums), loss_sum, count) for replica in replicas}
            assert len(losses) == 1
        digests = {one.lora_digest(), *(r.lora_digest() for r in replicas)}
        assert len(digests) == 1, f"step {step}: the replicas' LoRA left the single estimator's"
    for key, value in one.state_tensors().items():  # weights and AdamW moments
        assert torch.equal(value, replicas[1].state_tensors()[key]), key


def test_lora_shares_average_over_every_latent(tiny_model):
    """The summed shares of two halves step the LoRA as one share of the whole (the mean loss over all latents)."""
    cfg = config(tiny_model, "particle_score=lora")
    renders = [g.render(0)[0] for g in two_actors(cfg)]
    a, b = (ScoreEstimator(cfg, load_prior(cfg.prior)) for _ in range(2))
    halves = a.lora_grads(0, 0, *renders)
    assert [s.count for s in halves] == [r.latents.shape[0] for r in renders]
    loss_a = a.lora_apply(*halves)
    merged = halves[0].loss_sum + halves[1].loss_sum
    assert loss_a == pytest.approx(merged / sum(s.count for s in halves))
    before = b.lora_digest()
    loss_b = b.lora_apply(*b.lora_grads(0, 0, *renders))
    assert loss_b == loss_a and b.lora_digest() == a.lora_digest() != before
    with pytest.raises(ValueError, match="trains no LoRA"):
        ScoreEstimator(config(tiny_model), load_prior(cfg.prior)).lora_grads(0, 0, *renders)


def test_local_sums_cut_in_pieces_and_joined_are_the_whole_sum():
    from pdray.types import LoraGrads

    generator = torch.Generator().manual_seed(0)
    shares = [LoraGrads(torch.randn(1001, generator=generator) * 10 ** (i - 2), 1.0, i) for i in range(5)]
    whole = sum_in_order([s.grad for s in shares])
    for parts in (1, 2, 3, 7):
        pieces = cut(whole, parts)
        assert len(pieces) == parts and torch.equal(join(pieces), whole)
    # One actor per replica: the exchange's sum is the one-replica sum bit for bit.
    singles = [cut(local_sum([s]).grad, 3) for s in shares]
    assert torch.equal(join([sum_in_order([p[j] for p in singles]) for j in range(3)]), whole)
    # Two replicas serving actors [0, 1, 2] and [3, 4]: each sums its own first (what crosses is one gradient per
    # replica); the grouping changes float32 rounding only, and every replica joins the same sum.
    groups = [local_sum(shares[:3]), local_sum(shares[3:])]
    assert groups[0].count == 3 and groups[1].count == 7 and groups[1].loss_sum == 2.0
    grouped = join([sum_in_order([cut(g.grad, 2)[j] for g in groups]) for j in range(2)])
    torch.testing.assert_close(grouped, whole, rtol=1e-6, atol=1e-6)
    assert not torch.equal(sum_in_order([s.grad for s in reversed(shares)]), whole), "the order must matter here"


def test_diverged_replicas_stop_the_run_and_stats_combine():
    pytest.importorskip("ray", reason="the driver's checks live in the Ray layer")
    from pdray.cluster.driver import ReplicaDivergence, check_one_lora, combine_score_stats

    same = [[{"lora_loss": 0.5, "lora_digest": "ab" * 8, "time/lora_apply": t} for t in (0.1, 0.3)]]
    out = check_one_lora(7, same)
    assert out == {"lora_loss": 0.5, "lora_digest": int("ab" * 6, 16), "time/lora_apply": 0.3}
    apart = [[{"lora_loss": 0.5, "lora_digest": d, "time/lora_apply": 0.1} for d in ("ab" * 8, "cd" * 8)]]
    with pytest.raises(ReplicaDivergence, match="step 7: the ScoreActor replicas hold different LoRAs"):
        check_one_lora(7, same + apart)
    stats = combine_score_stats(
        [
            {"t_min": 0.1, "t_max": 0.5, "t_high": 0.98, "grad_norm": 1.0, "time/unet": 2.0},
            {"t_min": 0.2, "t_max": 0.9, "t_high": 0.98, "grad_norm": 4.0, "time/unet": 1.0},
        ],
        [3, 1],
    )
    assert stats == {"t_min": 0.1, "t_max": 0.9, "t_high": 0.98, "grad_norm": 1.75, "time/unet": 2.0}


def test_replicas_need_as_many_particles_and_actors(tiny_model):
    from pdray.config import ConfigError

    with pytest.raises(ConfigError, match=r"ray\.score_replicas: 3 replicas need at least 3 particles"):
        config(tiny_model, "particles=2", "ray.score_replicas=3")
    with pytest.raises(ConfigError, match="need at least 2 particle actors"):
        config(tiny_model, "ray.actors=1", "ray.score_replicas=2")
