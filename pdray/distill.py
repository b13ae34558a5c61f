"""The mathematics of score distillation, as pure tensor functions (no Ray, no NeRF, no files).

SDS (DreamFusion):      grad = w(t) (eps_pretrained(x_t, t, y) - noise)
VSD (ProlificDreamer):  grad = w(t) (eps_pretrained(x_t, t, y) - eps_lora(x_t, t, c, y))
with w(t) = 1 - alpha_bar_t. The gradient is injected into the particle's latents through a surrogate
loss whose derivative with respect to the latents is exactly ``grad``.
"""

from __future__ import annotations

import torch


def t_bounds(step: int, start: tuple[float, float], end: tuple[float, float], at_step: int) -> tuple[float, float]:
    """The [low, high] fraction of the diffusion time range sampled at ``step`` (a hard switch at at_step)."""
    return end if step >= at_step else start


def sample_timesteps(
    n: int, bounds: tuple[float, float], num_train_timesteps: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """n independent integer timesteps, uniform in [low * T, high * T]: one per particle view. [n] int64."""
    low = round(bounds[0] * num_train_timesteps)
    high = max(low + 1, round(bounds[1] * num_train_timesteps) + 1)
    return torch.randint(low, min(high, num_train_timesteps), (n,), generator=generator)


def weighting(alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """w(t) = 1 - alpha_bar_t (DreamFusion and ProlificDreamer); alpha_bar_t shaped [B, 1, 1, 1]."""
    return 1.0 - alpha_bar_t


def sds_grad(eps_pretrained: torch.Tensor, noise: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """Score distillation sampling gradient on latents [B, C, h, w]."""
    return weighting(alpha_bar_t) * (eps_pretrained - noise)


def vsd_grad(eps_pretrained: torch.Tensor, eps_lora: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """Variational score distillation gradient on latents [B, C, h, w]: the LoRA's score replaces the noise."""
    return weighting(alpha_bar_t) * (eps_pretrained - eps_lora)


def drop_nonfinite(grad: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Zero the gradient of every sample [B, ...] that holds a NaN or inf; return it and how many were dropped."""
    finite = torch.isfinite(grad.flatten(1)).all(dim=1)
    dropped = int((~finite).sum())
    if dropped == 0:
        return grad, 0
    return torch.where(finite.view(-1, *[1] * (grad.dim() - 1)), grad, torch.zeros_like(grad)), dropped


def surrogate_loss(latents: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient with respect to ``latents`` is exactly ``grad`` (the target is detached)."""
    target = (latents - grad).detach()
    return 0.5 * ((latents - target) ** 2).sum()


def lora_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The LoRA's ordinary diffusion loss: mean squared error to the noise (or to v for v-prediction)."""
    return torch.nn.functional.mse_loss(prediction.float(), target.float())


def gaussian_eps(
    noise: torch.Tensor,
    alpha_bar_t: torch.Tensor,
    latents: torch.Tensor,
    groups: torch.Tensor,
    repulsion: float = 1.0,
    resolution: int | None = None,
) -> torch.Tensor:
    """VSD's eps_phi from a Gaussian fitted to the particles' own latents, one fit per camera: nothing trained.

    The latents rendered from one camera (equal ``groups`` ids) are modelled as q(z | c) = N(mu, sigma^2): mu their
    mean, sigma^2 their variance across particles per latent channel (averaged over pixels). Noised to level t,
    q_t = N(sqrt(a) mu, a sigma^2 + 1 - a), whose posterior-mean noise at x_t = sqrt(a) z + sqrt(1 - a) noise is
    ``sqrt(1 - a) (x_t - sqrt(a) mu) / (a sigma^2 + 1 - a)``. Returned is that prediction's expectation over the
    noise plus the noise itself, ``noise + sqrt(a (1 - a)) (z - mu) / (a sigma^2 + 1 - a)``: the same VSD gradient
    in expectation, with the sampled noise as control variate as in SDS (the raw prediction cancels only part of
    the noise in eps_pretrained, and the rest fogs the particles). Particles gathered in one place (small
    sigma^2) are pushed apart strongly, spread ones hardly; a group of one gives the noise (SDS). ``repulsion``
    scales that push (1: the fitted Gaussian's own; 0: SDS).

    ``resolution`` fits the Gaussian to the latents' ``coarse`` part only (block means on that grid): the push then
    spreads the particles in colour and layout, and the finer detail keeps SDS's score of each particle itself,
    which the prior sharpens (a push on every pixel amplifies whatever detail sets two particles apart, speckle
    included). None: every latent pixel.
    noise, latents: [B, C, h, w]; alpha_bar_t: [B, 1, 1, 1]; groups: [B] int. -> eps [B, C, h, w], float32.
    """
    seen = coarse(latents, resolution)
    mean, variance = gaussian_fit(seen, groups)
    return gaussian_push(noise, alpha_bar_t, seen, mean, variance, repulsion)


def coarse(latents: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """The part of latents [B, C, h, w] that a ``resolution`` x ``resolution`` grid holds: block means repeated back
    to h x w (an orthogonal projection when ``resolution`` divides h and w); None or a finer grid: the latents."""
    h, w = latents.shape[-2:]
    if resolution is None or (resolution >= h and resolution >= w):
        return latents
    pooled = torch.nn.functional.adaptive_avg_pool2d(latents, resolution)
    return torch.nn.functional.interpolate(pooled, size=(h, w), mode="nearest")


def gaussian_fit(latents: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian of ``gaussian_eps`` for each latent's group: mean [B, C, h, w] and per-channel variance
    [B, C, 1, 1] (zero for a group of one). latents: [B, C, h, w]; groups: [B] int."""
    z = latents.float()
    mean, variance = torch.empty_like(z), torch.zeros(z.shape[0], z.shape[1], 1, 1, device=z.device)
    for group in groups.unique():
        members = groups == group
        mean[members] = z[members].mean(0, keepdim=True)
        if int(members.sum()) > 1:
            variance[members] = z[members].var(0, keepdim=True).mean(dim=(2, 3), keepdim=True)
    return mean, variance


def gaussian_push(
    noise: torch.Tensor,
    alpha_bar_t: torch.Tensor,
    latents: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    repulsion: float = 1.0,
) -> torch.Tensor:
    """``gaussian_eps`` from a fit made elsewhere (a score replica fits all particles, then scores its own).
    noise, latents, mean: [B, C, h, w]; alpha_bar_t: [B, 1, 1, 1]; variance: [B, C, 1, 1]."""
    a, z = alpha_bar_t.float(), latents.float()
    return noise.float() + repulsion * (a * (1 - a)).sqrt() * (z - mean) / (a * variance + 1 - a)
