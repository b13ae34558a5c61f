"""Ancestral (DDIM) sampling from a DiffusionPrior: how a user checks what a prior believes."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from pdray.priors.diffusion import DiffusionPrior, v_from_eps


@torch.no_grad()
def sample_images(
    prior: DiffusionPrior,
    prompts: list[str],
    steps: int = 50,
    cfg: float = 7.5,
    negative_prompt: str = "",
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    plain_prompts: list[str] | None = None,
    view_guidance: float = 0.0,
) -> torch.Tensor:
    """One DDIM sample (eta 0) per prompt; returns images [N, 3, H, W] in [0, 1] on the CPU. ``plain_prompts``: the
    prompts without their view suffixes, for ``view_guidance`` (``DiffusionPrior.predict_eps``)."""
    scheduler = DDIMScheduler.from_config(prior.scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    res = prior.unet_config["sample_size"]
    latents = torch.randn(len(prompts), prior.latent_channels, res, res, generator=generator)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        x = latents[start : start + batch_size].to(prior.device) * scheduler.init_noise_sigma
        cond = prior.embed(chunk)
        uncond = prior.embed([negative_prompt] * len(chunk))
        plain = prior.embed(plain_prompts[start : start + batch_size]) if plain_prompts is not None else None
        scheduler.set_timesteps(steps, device=prior.device)
        for t in tqdm(
            scheduler.timesteps, desc=f"sample {start + len(chunk)}/{len(prompts)}", disable=not progress, leave=False
        ):
            t_batch = t.expand(len(chunk))
            eps = prior.predict_eps(x, t_batch, cond, uncond, cfg, plain=plain, view_guidance=view_guidance)
            if prior.prediction_type == "v_prediction":  # DDIM steps in the model's own parameterisation
                eps = v_from_eps(x.float(), eps, prior.alpha_bar(t_batch))
            x = scheduler.step(eps.to(x.dtype), t, x).prev_sample
        out.append(prior.decode(x).cpu())
    return torch.cat(out)


def image_grid(images: torch.Tensor, columns: int = 8) -> torch.Tensor:
    """Tile images [N, 3, H, W] into one image [3, rows*H, columns*W] (white padding)."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    grid = torch.ones(c, rows * h, columns * w)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        grid[:, r * h : (r + 1) * h, col * w : (col + 1) * w] = img
    return grid
