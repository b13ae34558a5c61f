"""The score estimator: the pretrained prior plus VSD's score of the particles, batched over every particle's latents.

``grads(step, renders)`` returns one gradient tensor per RenderOut (SDS or VSD). VSD's particle score is a
Gaussian fitted to all particles' latents at each shared camera (``particle_score: gaussian``: from per-camera
moments that every particle actor sums over its own particles and that add up across actors and replicas), the
CameraLoRA (``lora``), which ``lora_update(step, renders)`` fits to the same detached latents with fresh t and
noise, or both (``gaussian_lora``: the Gaussian on its coarse grid, the LoRA finer). A Ray ScoreActor wraps this
class; the local executor calls it directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from pdray.config import RunConfig
from pdray.priors.diffusion import DiffusionPrior
from pdray.prompts import view_prompt
from pdray.rng import SHARED, Purpose, Stage, seed_of, stream
from pdray.types import CameraMoments, LoraGrads, RenderOut
from pdray.vsd.checkpoint import load_optimizer_tensors, optimizer_tensors
from pdray.vsd.distill import (
    coarse,
    coarse_and_fine,
    gaussian_push,
    moments_fit,
    render_moments,
    sample_timesteps,
    sds_grad,
    t_bounds,
    vsd_grad,
)
from pdray.vsd.lora import CameraLoRA, LoraDraw


def particle_runs(owners: list[int]) -> list[tuple[int, slice]]:
    """(particle id, slice) for each particle's contiguous run of latents; a particle split in two is an error,
    since each particle draws its timesteps and noise from its own stream, in order."""
    runs: list[tuple[int, slice]] = []
    for i, pid in enumerate(owners):
        if runs and runs[-1][0] == pid:
            runs[-1] = (pid, slice(runs[-1][1].start, i + 1))
        elif any(r[0] == pid for r in runs):
            raise ValueError(f"the latents of particle {pid} are not contiguous")
        else:
            runs.append((pid, slice(i, i + 1)))
    return runs


class ScoreEstimator:
    def __init__(self, config: RunConfig, prior: DiffusionPrior, stage: Stage = Stage.NERF):
        """``stage`` keys the random streams (the mesh stage's score estimators draw apart from the NeRF's)."""
        self.config, self.prior, self.stage = config, prior, stage
        init_seed = seed_of(config.seed, stage, Purpose.LORA_INIT, SHARED, 0)
        self.lora = CameraLoRA(prior, config.lora, init_seed=init_seed) if config.trains_lora else None

    def prompts(self, view_labels: list[str | None]) -> list[str]:
        """The prompt per latent, with DreamFusion's view suffix when view-dependent prompting is on."""
        if not self.config.prior.view_dependent_prompting:
            return [self.config.prompt] * len(view_labels)
        return [view_prompt(self.config.prompt, v) for v in view_labels]

    def _gather(self, renders: tuple[RenderOut, ...]) -> tuple[torch.Tensor, torch.Tensor, list[str | None], list]:
        latents = torch.cat([r.latents for r in renders]).to(self.prior.device, torch.float32)
        c2w = torch.cat([r.c2w for r in renders]).to(self.prior.device)
        labels = [label for r in renders for label in r.view_labels]
        return latents, c2w, labels, particle_runs([pid for r in renders for pid in r.particle_ids])

    def _score_draws(self, step: int, z: torch.Tensor, runs, bounds) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps [n] and noise like z, each particle's from its own stream (seed, stage, SCORE, particle, step)."""
        ts, noises = [], []
        for pid, sl in runs:
            generator = stream(self.config.seed, self.stage, Purpose.SCORE, pid, step)
            m = sl.stop - sl.start
            ts.append(sample_timesteps(m, bounds, self.prior.num_train_timesteps, generator))
            noises.append(torch.randn((m, *z.shape[1:]), generator=generator))
        return torch.cat(ts).to(self.prior.device), torch.cat(noises).to(self.prior.device)

    def _lora(self, caller: str) -> CameraLoRA:
        if self.lora is None:
            raise ValueError(f"{caller}: this run trains no LoRA (guidance sds or particle_score gaussian)")
        return self.lora

    def _chunks(self, renders: Sequence[RenderOut]) -> list[slice]:
        """Slices of the renders' concatenated latents for one UNet call each: at most score_batch_size latents and
        never two renders' latents in one call, so a particle actor's scores do not depend on what else is batched
        (R replicas and one give the same numbers, bit for bit)."""
        out, start = [], 0
        for render in renders:
            end = start + render.latents.shape[0]
            out += [
                slice(s, min(s + self.config.score_batch_size, end))
                for s in range(start, end, self.config.score_batch_size)
            ]
            start = end
        return out

    def moments(self, *renders: RenderOut) -> CameraMoments:
        """The per-camera moments of the renders' coarse latents that the Gaussian particle score is fitted from."""
        return render_moments(renders, self.config.gaussian_resolution)

    @torch.no_grad()
    def grads(
        self, step: int, *renders: RenderOut, moments: CameraMoments | None = None
    ) -> tuple[list[torch.Tensor], dict[str, float]]:
        """One gradient [V_i, C, h, w] per RenderOut, computed in UNet calls of at most score_batch_size latents of
        one render. The Gaussian particle score is fitted from ``moments``, the per-camera sums over every particle
        (added up across the particle actors and score replicas; default: these renders'), so a particle's gradient
        is the same whichever replica scores it and no replica needs another's latents."""
        started = time.perf_counter()
        z, c2w, labels, runs = self._gather(renders)
        if self.config.fits_all_particles:  # one Gaussian per shared camera, fitted to every particle's latents
            fit = moments if moments is not None else self.moments(*renders)
            fit_mean, fit_variance = (t.to(z.device) for t in moments_fit(fit, c2w.flatten(1)))
        n = z.shape[0]
        bounds = t_bounds(step, self.config.t_range.start, self.config.t_range.end, self.config.t_range.at_step)
        t, noise = self._score_draws(step, z, runs, bounds)
        x_t = self.prior.add_noise(z, noise, t)
        cond = self.prior.embed(self.prompts(labels))
        uncond = self.prior.embed([self.config.negative_prompt] * n)
        views = self.config.prior.view_dependent_prompting and any(label is not None for label in labels)
        view_guidance = self.config.prior.view_guidance if views else 0.0  # images without cameras have no views
        plain = self.prior.embed([self.config.prompt] * n) if view_guidance > 0 else None
        a = self.prior.alpha_bar(t)
        if self.config.fits_all_particles:
            z_coarse = coarse(z, self.config.gaussian_resolution)
            eps_particles = gaussian_push(noise, a, z_coarse, fit_mean, fit_variance, self.config.gaussian_repulsion)
        out, lora_time = [], 0.0
        for sl in self._chunks(renders):
            eps_pre = self.prior.predict_eps(
                x_t[sl],
                t[sl],
                cond[sl],
                uncond[sl],
                self.config.cfg,
                plain=plain[sl] if plain is not None else None,
                view_guidance=view_guidance,
            )
            if self.config.guidance == "sds":
                out.append(sds_grad(eps_pre, noise[sl], a[sl]))
            elif self.lora is None:
                out.append(vsd_grad(eps_pre, eps_particles[sl], a[sl]))
            else:
                lora_started = time.perf_counter()
                eps_lora = self.lora.predict_eps(x_t[sl], t[sl], cond[sl], c2w[sl], uncond[sl])
                lora_time += time.perf_counter() - lora_started
                if self.config.fits_all_particles:  # gaussian_lora: the Gaussian on its grid, the LoRA finer
                    eps_lora = coarse_and_fine(eps_particles[sl], eps_lora, self.config.gaussian_resolution)
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

    def lora_grads(self, step: int, k: int, *renders: RenderOut) -> list[LoraGrads]:
        """This replica's share of LoRA step ``k`` of ``step``: one loss gradient per render, summed over its detached
        latents, each particle's t, noise and camera dropout from its own stream. Summed in particle-actor order by
        ``lora_apply``, the shares give the same update bit for bit however the actors are sharded over replicas."""
        lora = self._lora("lora_grads")
        shares = []
        for render in renders:
            z, c2w, labels, runs = self._gather((render,))
            cond = self.prior.embed(self.prompts(labels))
            draw = LoraDraw.cat(
                [lora.draw(z[sl], stream(self.config.seed, self.stage, Purpose.LORA, pid, step, k)) for pid, sl in runs]
            )
            shares.append(lora.loss_grads(z, cond, c2w, draw, self.config.score_batch_size))
        return shares

    def lora_apply(self, *shares: LoraGrads) -> float:
        """One LoRA optimiser step on the sum of every particle actor's share (in actor order); the mean loss."""
        return self._lora("lora_apply").apply_grads(*shares)

    def lora_apply_summed(self, grad_sum: torch.Tensor, loss_sum: float, count: int) -> float:
        """``lora_apply`` with the shares already summed (by the replicas' reduce-scatter, ``pdray.vsd.allreduce``)."""
        return self._lora("lora_apply").apply_summed(grad_sum, loss_sum, count)

    def lora_update(self, step: int, *renders: RenderOut) -> dict[str, float]:
        """lora.steps_per_update LoRA steps, each on every detached latent of the renders (VSD with a LoRA);
        nothing otherwise. score_batch_size only chunks the work: the update is the same for any value."""
        if self.lora is None:
            return {}
        started = time.perf_counter()
        steps = range(self.config.lora.steps_per_update)
        losses = [self.lora_apply(*self.lora_grads(step, k, *renders)) for k in steps]
        return {"lora_loss": sum(losses) / len(losses), "time/lora_update": time.perf_counter() - started}

    def lora_digest(self) -> str:
        """A hash of the LoRA ("" without one): every score replica of a run must report the same."""
        return "" if self.lora is None else self.lora.digest()

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
