"""The score estimator: the pretrained prior plus VSD's score of the particles, batched over every particle's latents.

``grads(step, renders)`` returns one gradient tensor per RenderOut (SDS or VSD). VSD's particle score is a
Gaussian fitted to all particles' latents at each shared camera (``particle_score: gaussian``, which is why every
render of a step comes here together), or the CameraLoRA (``lora``), which ``lora_update(step, renders)`` fits to
the same detached latents with fresh t and noise. A Ray ScoreActor wraps this class; the local executor calls it
directly.
"""

from __future__ import annotations

import time

import torch

from pdray.checkpoint import load_optimizer_tensors, optimizer_tensors
from pdray.config import RunConfig
from pdray.distill import gaussian_eps, sample_timesteps, sds_grad, t_bounds, vsd_grad
from pdray.particle import RenderOut, stream
from pdray.priors.diffusion import DiffusionPrior
from pdray.priors.lora import CameraLoRA
from pdray.prompts import view_prompt


class ScoreEstimator:
    def __init__(self, config: RunConfig, prior: DiffusionPrior):
        self.config, self.prior = config, prior
        trains_lora = config.guidance == "vsd" and config.particle_score == "lora"
        self.lora = CameraLoRA(prior, config.lora, seed=config.seed) if trains_lora else None

    def prompts(self, view_labels: list[str | None]) -> list[str]:
        """The prompt per latent, with DreamFusion's view suffix when view-dependent prompting is on."""
        if not self.config.prior.view_dependent_prompting:
            return [self.config.prompt] * len(view_labels)
        return [view_prompt(self.config.prompt, v) for v in view_labels]

    def _gather(self, renders: tuple[RenderOut, ...]) -> tuple[torch.Tensor, torch.Tensor, list[str | None]]:
        latents = torch.cat([r.latents for r in renders]).to(self.prior.device, torch.float32)
        c2w = torch.cat([r.c2w for r in renders]).to(self.prior.device)
        labels = [label for r in renders for label in r.view_labels]
        return latents, c2w, labels

    @torch.no_grad()
    def grads(self, step: int, *renders: RenderOut) -> tuple[list[torch.Tensor], dict[str, float]]:
        """One gradient [V_i, C, h, w] per RenderOut, computed in UNet calls of at most score_batch_size latents."""
        started = time.perf_counter()
        z, c2w, labels = self._gather(renders)
        n = z.shape[0]
        generator = stream(self.config.seed, step, 0x5C0)
        bounds = t_bounds(step, self.config.t_range.start, self.config.t_range.end, self.config.t_range.at_step)
        t = sample_timesteps(n, bounds, self.prior.num_train_timesteps, generator).to(self.prior.device)
        noise = torch.randn(z.shape, generator=generator).to(self.prior.device)
        x_t = self.prior.add_noise(z, noise, t)
        cond = self.prior.embed(self.prompts(labels))
        uncond = self.prior.embed([self.config.negative_prompt] * n)
        a = self.prior.alpha_bar(t)
        if self.config.guidance == "vsd" and self.lora is None:  # one Gaussian per shared camera
            cameras = torch.unique(c2w.flatten(1), dim=0, return_inverse=True)[1]
            eps_particles = gaussian_eps(noise, a, z, cameras, self.config.gaussian_repulsion)
        out, lora_time = [], 0.0
        chunk = self.config.score_batch_size
        for s in range(0, n, chunk):
            sl = slice(s, s + chunk)
            eps_pre = self.prior.predict_eps(x_t[sl], t[sl], cond[sl], uncond[sl], self.config.cfg)
            if self.config.guidance == "sds":
                out.append(sds_grad(eps_pre, noise[sl], a[sl]))
            elif self.lora is None:
                out.append(vsd_grad(eps_pre, eps_particles[sl], a[sl]))
            else:
                lora_started = time.perf_counter()
                eps_lora = self.lora.predict_eps(x_t[sl], t[sl], cond[sl], c2w[sl], uncond[sl])
                lora_time += time.perf_counter() - lora_started
                out.append(vsd_grad(eps_pre, eps_lora, a[sl]))
        grad = torch.cat(out).cpu()
        sizes = [r.latents.shape[0] for r in renders]
        stats = {
            "t_min": float(t.min()),
            "t_max": float(t.max()),
            "t_high": bounds[1],
            "grad_norm": float(grad.flatten(1).norm(dim=1).mean()),
            "time/unet": time.perf_counter() - started - lora_time,
            "time/unet_lora": lora_time,
        }
        return list(grad.split(sizes)), stats

    def lora_update(self, step: int, *renders: RenderOut) -> dict[str, float]:
        """steps_per_update LoRA steps on the renders' detached latents (VSD with a LoRA); nothing otherwise."""
        if self.lora is None:
            return {}
        started = time.perf_counter()
        z, c2w, labels = self._gather(renders)
        cond = self.prior.embed(self.prompts(labels))
        losses = []
        for k in range(self.config.lora.steps_per_update):
            generator = stream(self.config.seed, step, k, 0x10A)
            for s in range(0, z.shape[0], self.config.score_batch_size):
                sl = slice(s, s + self.config.score_batch_size)
                losses.append(self.lora.train_step(z[sl], cond[sl], c2w[sl], generator))
        return {"lora_loss": sum(losses) / len(losses), "time/lora_update": time.perf_counter() - started}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.lora is None:
            return {}
        return {
            **self.lora.state_tensors(),
            **{f"optim.{k}": v for k, v in optimizer_tensors(self.lora.optimizer).items()},
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.lora is None:
            return
        self.lora.load_state_tensors({k: v for k, v in tensors.items() if not k.startswith("optim.")})
        load_optimizer_tensors(self.lora.optimizer, {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")})
