"""The distillation core on the tiny random fixture: LoRA, particles, score estimator, checkpoints."""

import pytest
import torch

from pdray.config import load_config
from pdray.priors.diffusion import DiffusionPrior
from pdray.vsd.checkpoint import load_checkpoint, save_checkpoint
from pdray.vsd.distill import coarse
from pdray.vsd.lora import CameraLoRA
from pdray.vsd.particle import ParticleGroup
from pdray.vsd.score import ScoreEstimator


def tiny_config(model, *overrides):
    return load_config(
        "default",
        [
            f"prior.model={model}",
            "nerf.resolution=16",
            "nerf.n_samples=8",
            "particles=2",
            "wandb=off",
            "stages=[nerf]",
            *overrides,
        ],
    )


def test_lora_training_leaves_the_base_unet_bit_identical_and_the_pretrained_prediction_unchanged(tiny_model):
    prior = DiffusionPrior(tiny_model, device="cpu")
    x_t, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([100, 800]), prior.embed(["a cube"] * 2)
    before_eps = prior.predict_eps(x_t, t, cond, guidance_scale=1.0)
    before = {k: v.clone() for k, v in prior.unet.state_dict().items()}
    config = tiny_config(tiny_model, "lora.lr=1e-2").lora
    lora = CameraLoRA(prior, config)
    c2w = torch.eye(4).expand(2, 4, 4)
    # Zero-initialised camera embedding + LoRA B = 0: the LoRA starts as the base model.
    torch.testing.assert_close(lora.predict_eps(x_t, t, cond, c2w), before_eps)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        latents = torch.randn(2, 4, 8, 8)
        lora.train_step(latents, cond, c2w, lora.draw(latents, generator), batch_size=2)
    after = {k.replace(".base_layer", ""): v for k, v in prior.unet.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert not any("lora" in k for k in before)
    # The adapter and the camera embedding are off outside LoRA calls: no leak into eps_pretrained.
    assert prior.unet.class_embedding is None
    torch.testing.assert_close(prior.predict_eps(x_t, t, cond, guidance_scale=1.0), before_eps)
    assert not torch.allclose(lora.predict_eps(x_t, t, cond, c2w), before_eps)
    # The camera now matters to the LoRA.
    other = torch.eye(4).expand(2, 4, 4).clone()
    other[:, :3, 3] = 1.5
    assert not torch.allclose(lora.predict_eps(x_t, t, cond, c2w), lora.predict_eps(x_t, t, cond, other))


def test_lora_on_a_separate_v_prediction_base(tiny_model, tiny_v_model):
    prior = DiffusionPrior(tiny_model, device="cpu")
    lora = CameraLoRA(prior, tiny_config(tiny_model, f"lora.base={tiny_v_model}").lora)
    assert lora.unet is not prior.unet and lora.prediction_type == "v_prediction"
    latents = torch.randn(2, 4, 8, 8)
    draw = lora.draw(latents, torch.Generator().manual_seed(0))
    loss = lora.train_step(latents, prior.embed(["a"] * 2), torch.eye(4).expand(2, 4, 4), draw, batch_size=1)
    assert loss > 0


@pytest.mark.parametrize("particle_score", ["gaussian", "lora", "gaussian_lora"])
@pytest.mark.parametrize("particle", ["nerf", "image"])
def test_gradients_reach_particle_parameters(tiny_model, particle, particle_score):
    config = tiny_config(tiny_model, f"particle={particle}", f"particle_score={particle_score}")
    prior = DiffusionPrior(tiny_model, device="cpu")
    group, score = ParticleGroup(config, [0, 1], prior), ScoreEstimator(config, prior)
    before = {k: v.clone() for k, v in group.state_tensors().items() if ".optim." not in k}
    render, _ = group.render(0)
    assert render.latents.shape[0] == 2 * config.camera.views_per_step and render.latents.requires_grad is False
    grads, stats = score.grads(0, render)
    assert stats["t_max"] <= 980 and grads[0].shape == render.latents.shape
    score.lora_update(0, render)
    group.apply(0, grads[0])
    after = group.state_tensors()
    changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert any(k.startswith("0000.") for k in changed) and any(k.startswith("0001.") for k in changed)


def test_gaussian_lora_takes_the_gaussian_s_coarse_gradient_and_the_lora_s_finer_one(tiny_model):
    """Over two steps and a LoRA update: the hybrid's gradient on the Gaussian's 2x2 grid is the Gaussian run's, and
    what is finer than the grid is the LoRA run's (the same draws, the same LoRA)."""
    configs = {
        score: tiny_config(tiny_model, f"particle_score={score}", "gaussian_resolution=2")
        for score in ("gaussian", "lora", "gaussian_lora")
    }
    group = ParticleGroup(configs["gaussian_lora"], [0, 1], DiffusionPrior(tiny_model, device="cpu"))
    scores = {name: ScoreEstimator(c, DiffusionPrior(tiny_model, device="cpu")) for name, c in configs.items()}
    for step in range(2):
        render, _ = group.render(step)
        grads = {name: score.grads(step, render)[0][0] for name, score in scores.items()}
        both = grads["gaussian_lora"]
        assert torch.allclose(coarse(both, 2), coarse(grads["gaussian"], 2), atol=1e-5)
        assert torch.allclose(both - coarse(both, 2), grads["lora"] - coarse(grads["lora"], 2), atol=1e-5)
        assert not torch.allclose(both, grads["gaussian"], atol=1e-3)
        assert not torch.allclose(both, grads["lora"], atol=1e-3)
        for name in ("lora", "gaussian_lora"):
            scores[name].lora_update(step, render)
        assert scores["lora"].lora_digest() == scores["gaussian_lora"].lora_digest()


@pytest.mark.parametrize("overrides", [["guidance=sds", "cfg=100"], ["particle_score=gaussian"]])
def test_sds_and_the_gaussian_particle_score_train_no_lora(tiny_model, overrides):
    score = ScoreEstimator(tiny_config(tiny_model, *overrides), DiffusionPrior(tiny_model, device="cpu"))
    assert score.lora is None and score.state_tensors() == {}


def test_shared_cameras_are_the_same_for_every_particle_and_the_gaussian_score_needs_them(tiny_model):
    from pdray.config import ConfigError

    group = ParticleGroup(tiny_config(tiny_model), [0, 1], DiffusionPrior(tiny_model, device="cpu"))
    assert torch.equal(group.cameras(0, 5).c2w(), group.cameras(1, 5).c2w())
    assert not torch.equal(group.cameras(0, 5).c2w(), group.cameras(0, 6).c2w())
    own = ParticleGroup(tiny_config(tiny_model, "camera.shared=false", "particle_score=lora"), [0, 1], group.prior)
    assert not torch.equal(own.cameras(0, 5).c2w(), own.cameras(1, 5).c2w())
    with pytest.raises(ConfigError, match=r"particle_score: gaussian needs camera\.shared"):
        tiny_config(tiny_model, "camera.shared=false")


def test_a_short_2d_vsd_run_lowers_the_lora_loss():
    # On the trained toy prior: the LoRA learns the particles' distribution (a random tiny UNet cannot).
    config = load_config("image2d", ["particles=4", "particle_score=lora", "lora.lr=1e-3", "wandb=off"])
    prior = DiffusionPrior("toyworld", device="cpu")
    group, score = ParticleGroup(config, [0, 1, 2, 3], prior), ScoreEstimator(config, prior)
    losses = []
    for step in range(40):
        render, _ = group.render(step)
        grads, _ = score.grads(step, render)
        losses.append(score.lora_update(step, render)["lora_loss"])
        group.apply(step, grads[0])
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def test_save_and_load_reproduce_the_next_step_exactly(tiny_model, tmp_path):
    config = tiny_config(tiny_model, "particle_score=lora")
    prior = DiffusionPrior(tiny_model, device="cpu")

    def step(group, score, k):
        render, _ = group.render(k)
        grads, _ = score.grads(k, render)
        score.lora_update(k, render)
        group.apply(k, grads[0])

    group, score = ParticleGroup(config, [0, 1], prior), ScoreEstimator(config, prior)
    for k in range(3):
        step(group, score, k)
    save_checkpoint(tmp_path, 3, {"particles": group.state_tensors(), "lora": score.state_tensors()}, {})
    step(group, score, 3)
    expected_particles, expected_lora = group.state_tensors(), score.state_tensors()

    prior2 = DiffusionPrior(tiny_model, device="cpu")
    group2, score2 = ParticleGroup(config, [0, 1], prior2), ScoreEstimator(config, prior2)
    info, tensors = load_checkpoint(tmp_path)
    assert info["step"] == 3
    group2.load_state_tensors(tensors["particles"])
    score2.load_state_tensors(tensors["lora"])
    step(group2, score2, 3)
    for key, value in expected_particles.items():
        assert torch.equal(group2.state_tensors()[key], value), key
    for key, value in expected_lora.items():
        assert torch.equal(score2.state_tensors()[key], value), key


def test_the_prolificdreamer_preset_builds_every_component_on_the_tiny_fixture(tiny_model, tiny_v_model):
    config = load_config(
        "prolificdreamer",
        [
            f"prior.model={tiny_model}",
            f"lora.base={tiny_v_model}",
            "nerf.resolution=16",
            "nerf.n_samples=8",
            "particles=1",
            "nerf.field.grid.log2_hashmap_size=12",
            "wandb=off",
        ],
    )
    assert config.nerf.field.grid.kind == "hashgrid" and config.cfg == 7.5
    prior = DiffusionPrior(tiny_model, device="cpu")
    group, score = ParticleGroup(config, [0], prior), ScoreEstimator(config, prior)
    render, _ = group.render(0)
    grads, _ = score.grads(0, render)
    assert "lora_loss" in score.lora_update(0, render)
    assert group.apply(0, grads[0])["nonfinite_dropped"] == 0


def test_white_background_renders_white_and_has_no_background_parameters(tiny_model):
    from pdray.render.cameras import Cameras

    config = tiny_config(tiny_model, "nerf.background=white", "nerf.field.density_bias=none")
    group = ParticleGroup(config, [0], DiffusionPrior(tiny_model, device="cpu"))
    assert not any(".background." in k for k in group.state_tensors())
    with torch.no_grad():  # an empty field: every ray sees only the background
        for p in group.particles[0].field.parameters():
            p.zero_()
        p.fill_(-20.0)  # the MLP's output bias: raw density far below zero
    full = torch.ones(1)
    image = group.images(Cameras(full * 15, full * 0, full * 1.5, full * 45))[0]
    assert torch.allclose(image, torch.ones_like(image), atol=1e-3)
    learned = ParticleGroup(tiny_config(tiny_model, "nerf.background=learned"), [0], group.prior)
    assert any(".background." in k for k in learned.state_tensors())


@pytest.mark.slow
def test_a_short_vsd_run_is_more_diverse_than_a_short_sds_run(tmp_path):
    """8 latent particles of a colour-open prompt: VSD spreads over colours, SDS at the same CFG collapses."""
    from pdray.run.local_executor import run_local

    def entropy(guidance: str) -> float:
        overrides = ["particles=8", "steps=150", f"guidance={guidance}", "cfg=7.5", "wandb=off", "checkpoint_every=150"]
        return run_local(load_config("image2d", overrides), tmp_path / guidance)["colour_entropy_fraction"]

    vsd, sds = entropy("vsd"), entropy("sds")
    assert vsd > sds + 0.2, (vsd, sds)
