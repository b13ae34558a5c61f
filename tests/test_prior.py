import pytest
import torch

from pdray.priors.diffusion import DiffusionPrior, PriorNotFoundError, eps_from_v, v_from_eps, x0_from_eps


@pytest.fixture(scope="module")
def prior(tiny_model):
    return DiffusionPrior(tiny_model, device="cpu")


def test_loads_offline_from_a_folder(prior):
    assert prior.prediction_type == "epsilon"
    assert prior.image_resolution == 16 and prior.latent_channels == 4
    assert prior.alphas_cumprod.shape == (1000,)


def test_missing_models_fail_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PriorNotFoundError, match=r"'no-such-org/no-such-model'.*HF_HUB_OFFLINE"):
        DiffusionPrior("no-such-org/no-such-model", device="cpu")
    with pytest.raises(PriorNotFoundError, match="does not exist"):
        DiffusionPrior(str(tmp_path / "nothing-here"), device="cpu")
    with pytest.raises(PriorNotFoundError, match="not a Stable-Diffusion-format folder"):
        DiffusionPrior(str(tmp_path), device="cpu")


def test_text_embeddings_are_cached(prior):
    a = prior.embed(["a red cube", ""])
    assert a.shape[0] == 2 and "a red cube" in prior._embedding_cache
    assert torch.equal(prior.embed(["a red cube"])[0], a[0])


def test_encode_is_differentiable_and_decode_shapes(prior):
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    latents = prior.encode(images)
    assert latents.shape == (2, 4, 8, 8)
    (latents * torch.randn_like(latents)).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert prior.decode(latents.detach()).shape == (2, 3, 16, 16)


def test_cfg_one_equals_the_conditional_prediction(prior):
    torch.manual_seed(0)
    x_t, t = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900])
    cond, uncond = prior.embed(["a cube"] * 3), prior.embed([""] * 3)
    direct = prior.unet(x_t, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(prior.predict_eps(x_t, t, cond, uncond, guidance_scale=1.0), direct)
    # The batched CFG path with scale 1 gives the same answer as the conditional pass.
    eps_u, eps_c = prior.predict_eps(x_t, t, uncond, None), direct
    guided = prior.predict_eps(x_t, t, cond, uncond, guidance_scale=3.0)
    torch.testing.assert_close(guided, eps_u + 3.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)


def test_view_guidance_adds_the_view_suffix_direction_to_cfg(prior):
    torch.manual_seed(0)
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    cond, plain, uncond = prior.embed(["a cube, side view"] * 2), prior.embed(["a cube"] * 2), prior.embed([""] * 2)
    eps_c, eps_p, eps_u = (prior.predict_eps(x_t, t, e, guidance_scale=1.0) for e in (cond, plain, uncond))
    guided = prior.predict_eps(x_t, t, cond, uncond, 7.5, plain=plain, view_guidance=4.0)
    view = eps_c - eps_p
    expected = eps_u + 7.5 * (eps_c - eps_u) + 4.0 * (view - view.mean(dim=(2, 3), keepdim=True))
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)
    # The view moves where things are, not the tone: each channel's mean is plain CFG's.
    cfg_only = prior.predict_eps(x_t, t, cond, uncond, 7.5)
    torch.testing.assert_close(guided.mean(dim=(2, 3)), cfg_only.mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)
    assert (guided - cfg_only).abs().max() > 1e-3
    # Scale 0 is plain CFG (no third pass), and a view-free prompt gets nothing extra.
    torch.testing.assert_close(prior.predict_eps(x_t, t, cond, uncond, 7.5, plain=plain), cfg_only)
    same = prior.predict_eps(x_t, t, plain, uncond, 7.5, plain=plain, view_guidance=4.0)
    torch.testing.assert_close(same, prior.predict_eps(x_t, t, plain, uncond, 7.5), rtol=1e-4, atol=1e-5)


def test_add_noise_matches_the_scheduler(prior):
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    torch.testing.assert_close(prior.add_noise(x0, noise, t), prior.scheduler.add_noise(x0, noise, t))


def test_eps_v_conversions_agree_with_the_scheduler(tiny_v_model):
    prior = DiffusionPrior(tiny_v_model, device="cpu")
    assert prior.prediction_type == "v_prediction"
    x0, noise, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.tensor([0, 250, 600, 999])
    x_t = prior.scheduler.add_noise(x0, noise, t)
    v = prior.scheduler.get_velocity(x0, noise, t)
    a = prior.alpha_bar(t)
    torch.testing.assert_close(eps_from_v(x_t, v, a), noise, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v_from_eps(x_t, noise, a), v, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(x0_from_eps(x_t, noise, a), x0, rtol=1e-3, atol=1e-3)
    # predict_eps turns the v-model's output into noise.
    cond = prior.embed(["a cube"] * 4)
    out = prior.unet(x_t, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(prior.predict_eps(x_t, t, cond, guidance_scale=1.0), eps_from_v(x_t, out, a))


def test_class_labels_pass_through(tiny_model):
    from diffusers.models.embeddings import TimestepEmbedding

    prior = DiffusionPrior(tiny_model, device="cpu")
    dim = prior.unet.time_embedding.linear_2.out_features
    prior.unet.class_embedding = TimestepEmbedding(16, dim)
    x_t, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([5, 5]), prior.embed(["a", "a"])
    a = prior.predict_eps(x_t, t, cond, guidance_scale=1.0, class_labels=torch.zeros(2, 16))
    b = prior.predict_eps(x_t, t, cond, guidance_scale=1.0, class_labels=torch.ones(2, 16))
    assert not torch.allclose(a, b)
