"""The mathematics of score distillation, as pure tensor functions (no Ray, no NeRF, no files).

SDS (DreamFusion):      grad = w(t) (eps_pretrained(x_t, t, y) - noise)
VSD (ProlificDreamer):  grad = w(t) (eps_pretrained(x_t, t, y) - eps_lora(x_t, t, c, y))
with w(t) = 1 - alpha_bar_t. The gradient is injected into the particle's latents through a surrogate
loss whose derivative with respect to the latents is exactly ``grad``.
"""

from __future__ import annotations

import torch

from pdray.types import CameraMoments


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


def coarse_and_fine(coarse_score: torch.Tensor, fine_score: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """One score [B, C, h, w] from two estimators: ``coarse_score``'s part on the ``resolution`` grid (``coarse``)
    and ``fine_score``'s part finer than it (particle_score gaussian_lora: the Gaussian's colour and layout, the
    LoRA's detail)."""
    return coarse(coarse_score, resolution) + fine_score - coarse(fine_score, resolution)


def camera_moments(latents: torch.Tensor, keys: torch.Tensor) -> CameraMoments:
    """The per-camera sums of latents [B, C, h, w] whose cameras are the rows of keys [B, D] (float64 sums)."""
    unique, index = torch.unique(keys.float(), dim=0, return_inverse=True)
    z = latents.double()
    total = torch.zeros(unique.shape[0], *z.shape[1:], dtype=torch.float64, device=z.device)
    total_sq = torch.zeros_like(total)
    total.index_add_(0, index, z)
    total_sq.index_add_(0, index, z * z)
    count = torch.bincount(index, minlength=unique.shape[0])
    return CameraMoments(unique, total, total_sq, count)


def add_moments(*parts: CameraMoments) -> CameraMoments:
    """The moments of every part's latents together (parts added in the order given, cameras matched by key)."""
    keys = torch.cat([p.keys for p in parts])
    unique, index = torch.unique(keys, dim=0, return_inverse=True)
    first = parts[0]
    total = torch.zeros(unique.shape[0], *first.total.shape[1:], dtype=torch.float64, device=first.total.device)
    total_sq, count = torch.zeros_like(total), torch.zeros(unique.shape[0], dtype=torch.int64)
    offset = 0
    for part in parts:
        rows = index[offset : offset + part.keys.shape[0]]
        offset += part.keys.shape[0]
        total.index_add_(0, rows.to(total.device), part.total.to(total.device))
        total_sq.index_add_(0, rows.to(total.device), part.total_sq.to(total.device))
        count.index_add_(0, rows.cpu(), part.count.cpu())
    return CameraMoments(unique, total, total_sq, count)


def moments_fit(moments: CameraMoments, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian of ``gaussian_eps`` for each latent whose camera is a row of keys [B, D]: mean [B, C, h, w]
    and per-channel variance [B, C, 1, 1] (across particles, unbiased, averaged over pixels; zero for a camera seen
    once), float32. Every key must be among the moments' cameras."""
    match = (keys.float()[:, None, :].to(moments.keys.device) == moments.keys[None]).all(dim=2)
    if not bool(match.any(dim=1).all()):
        raise ValueError("a latent's camera is not among the fitted cameras")
    rows = match.float().argmax(dim=1)
    n = moments.count.to(moments.total.device, torch.float64).view(-1, *[1] * (moments.total.dim() - 1))
    mean = moments.total / n
    variance = ((moments.total_sq - moments.total * mean) / (n - 1).clamp(min=1)).clamp(min=0)
    variance = torch.where(n > 1, variance, torch.zeros_like(variance)).mean(dim=(2, 3), keepdim=True)
    return mean[rows].float(), variance[rows].float()


def render_moments(renders, resolution: int | None) -> CameraMoments:
    """``camera_moments`` of RenderOuts' ``coarse`` latents, keyed by their cameras (c2w)."""
    parts = [camera_moments(coarse(r.latents.float(), resolution), r.c2w.flatten(1)) for r in renders]
    return parts[0] if len(parts) == 1 else add_moments(*parts)


def gaussian_fit(latents: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``moments_fit`` of the latents' own moments: for each latent of latents [B, C, h, w], the Gaussian of its
    group (groups: [B] int)."""
    keys = groups.view(-1, 1)
    return moments_fit(camera_moments(latents, keys), keys)


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
