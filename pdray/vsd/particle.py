"""Particles: the things VSD optimises. Each owns its parameters and its optimiser.

A particle turns cameras into latents with autograd kept (render -> VAE encode, or the latent itself), and
takes a gradient on those latents. ``ParticleGroup`` holds k particles and is what a Ray ParticleActor (or
the local executor) drives: ``render(step)`` then ``apply(step, grads)``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pdray.config import RunConfig
from pdray.geometry.nerf import BackgroundField, NeRFField
from pdray.imaging import save_gif, save_png
from pdray.priors.diffusion import DiffusionPrior
from pdray.render.cameras import CameraRanges, Cameras, camera_rays, sample_cameras
from pdray.render.occupancy import CHUNK, OccupancyGrid, render_marched
from pdray.render.volume import (
    chunked_field,
    opacity_entropy_loss,
    orientation_loss,
    render_volume,
    sparsity_loss,
)
from pdray.rng import SHARED, Purpose, Stage, seeded_global, stream
from pdray.types import RenderOut
from pdray.vsd.checkpoint import load_optimizer_tensors, optimizer_tensors
from pdray.vsd.distill import drop_nonfinite, surrogate_loss


class Particle:
    """Interface: latents(cameras) with grad, images(cameras) for viewing, a regulariser, an optimiser, state."""

    optimizer: torch.optim.Optimizer
    has_cameras = True

    def latents(
        self,
        cameras: Cameras,
        prior: DiffusionPrior,
        step: int,
        generator: torch.Generator | None = None,
        clock: dict[str, float] | None = None,
    ):
        """Latents [V, C, h, w] of the particle seen from cameras at ``step``, with autograd kept (VAE seconds into
        clock)."""
        raise NotImplementedError

    @torch.no_grad()
    def images(self, cameras: Cameras, prior: DiffusionPrior) -> torch.Tensor:
        raise NotImplementedError

    def regularisation(self) -> torch.Tensor:
        return torch.zeros(())

    def modules(self) -> dict[str, torch.nn.Module | torch.nn.Parameter]:
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, module in self.modules().items():
            items = module.state_dict().items() if isinstance(module, torch.nn.Module) else [("", module)]
            out.update({f"{name}.{k}" if k else name: v.detach().cpu().contiguous() for k, v in items})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, module in self.modules().items():
            if isinstance(module, torch.nn.Module):
                prefix = f"{name}."
                module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
            else:
                with torch.no_grad():
                    module.copy_(tensors[name])


def timed_encode(prior: DiffusionPrior, images: torch.Tensor, clock: dict[str, float] | None) -> torch.Tensor:
    """prior.encode, adding its seconds to clock["encode"] so a step's time splits into render and encode."""
    started = time.perf_counter()
    latents = prior.encode(images)
    if clock is not None:
        clock["encode"] = clock.get("encode", 0.0) + time.perf_counter() - started
    return latents


class ImageParticle(Particle):
    """The paper's 2D particle: a latent (decoded for viewing) or an RGB image (encoded each step)."""

    has_cameras = False

    def __init__(self, config: RunConfig, prior: DiffusionPrior, particle_id: int):
        self.space = config.image.space
        generator = stream(config.seed, Stage.NERF, Purpose.INIT, particle_id, 0)
        res = prior.image_resolution
        if self.space == "latent":
            size = res // prior.vae_scale
            init = torch.randn(1, prior.latent_channels, size, size, generator=generator)
        else:
            init = 0.5 + 0.1 * torch.randn(1, 3, res, res, generator=generator)
        self.value = torch.nn.Parameter(init.to(prior.device))
        self.optimizer = torch.optim.Adam([self.value], lr=config.image.lr)

    def latents(
        self,
        cameras: Cameras,
        prior: DiffusionPrior,
        step: int,
        generator: torch.Generator | None = None,
        clock: dict[str, float] | None = None,
    ):
        n = len(cameras)
        if self.space == "latent":
            return self.value.expand(n, -1, -1, -1)
        return timed_encode(prior, self.value.clamp(0, 1).expand(n, -1, -1, -1), clock)

    @torch.no_grad()
    def images(self, cameras: Cameras, prior: DiffusionPrior) -> torch.Tensor:
        image = prior.decode(self.value) if self.space == "latent" else self.value.clamp(0, 1)
        return image.expand(len(cameras), -1, -1, -1).cpu()

    def modules(self) -> dict[str, torch.nn.Module | torch.nn.Parameter]:
        return {"value": self.value}


def white_background(dirs: torch.Tensor) -> torch.Tensor:
    """Plain white behind every ray, as in the toy world's renders."""
    return torch.ones_like(dirs)


class NeRFParticle(Particle):
    """A NeRF (density + albedo field and a background) rendered by ray marching, encoded by the VAE."""

    def __init__(self, config: RunConfig, prior: DiffusionPrior, particle_id: int):
        self.config = config.nerf
        self.seed, self.particle_id, self.step = config.seed, particle_id, 0
        with seeded_global(config.seed, Stage.NERF, Purpose.INIT, particle_id):
            self.field = NeRFField(self.config.field).to(prior.device)
        occupancy = self.config.occupancy
        self.occupancy = None
        if occupancy.enabled:
            self.occupancy = OccupancyGrid(
                occupancy.resolution,
                self.config.field.radius,
                occupancy.threshold,
                occupancy.decay,
                occupancy.update_every,
                occupancy.warmup_steps,
            ).to(prior.device)
        # the marching step: the bounding cube's diagonal in n_samples steps (threestudio's render_step_size)
        self.step_size = 2.0 * math.sqrt(3.0) * self.config.field.radius / self.config.n_samples
        groups = [
            {"params": self.field.encoding.parameters(), "lr": self.config.lr_grid},
            {"params": self.field.mlp.parameters(), "lr": self.config.lr_net},
        ]
        self.background = None
        if self.config.background == "learned":
            self.background = BackgroundField().to(prior.device)
            groups.append({"params": self.background.parameters(), "lr": self.config.lr_net})
        self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)
        self._last = None

    def render(self, cameras: Cameras, generator: torch.Generator | None = None, resolution: int | None = None):
        """The volume render from ``cameras`` at ``resolution`` (default: the schedule's at the last step seen)."""
        config = self.config
        origins, dirs = camera_rays(
            cameras.to(next(self.field.parameters()).device), resolution or config.resolution_at(self.step)
        )
        needs_normals = config.shading != "albedo" or config.orientation_weight > 0
        field = chunked_field(self.field, config.recompute_chunk or CHUNK, config.recompute_chunk is not None)
        common = {
            "shading": config.shading,
            "generator": generator,
            "random_background_prob": config.random_background_prob,
            "normal_fn": self.field.normals if needs_normals else None,
        }
        background = self.background if self.background is not None else white_background
        if self.occupancy is None:
            out = render_volume(
                field, background, origins, dirs, config.n_samples, radius=config.field.radius, **common
            )
        else:
            out = render_marched(
                field,
                background,
                origins,
                dirs,
                self.occupancy,
                self.step_size,
                self.field.density,
                early_stop=config.occupancy.early_stop,
                alpha_threshold=config.occupancy.alpha_threshold,
                backend=config.occupancy.backend,
                **common,
            )
        self._last = (out, dirs)
        return out

    def latents(
        self,
        cameras: Cameras,
        prior: DiffusionPrior,
        step: int,
        generator: torch.Generator | None = None,
        clock: dict[str, float] | None = None,
    ):
        self.step = step
        if self.occupancy is not None:
            self.occupancy.update(
                step,
                self.field.density,
                self.step_size,
                stream(self.seed, Stage.NERF, Purpose.OCCUPANCY, self.particle_id, step),
            )
        images = self.render(cameras, generator).rgb.permute(0, 3, 1, 2)
        size = prior.image_resolution
        if images.shape[-1] != size:  # the prior scores images at its own resolution (threestudio: 64 px -> 512)
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return timed_encode(prior, images, clock)

    @torch.no_grad()
    def images(self, cameras: Cameras, prior: DiffusionPrior, resolution: int | None = None) -> torch.Tensor:
        out = self.render(cameras, resolution=resolution)
        self._last = None
        return out.rgb.permute(0, 3, 1, 2).clamp(0, 1).cpu()

    def regularisation(self) -> torch.Tensor:
        if self._last is None:
            return torch.zeros(())
        out, dirs = self._last
        loss = self.config.sparsity_weight * sparsity_loss(out.opacity)
        loss = loss + self.config.opacity_entropy_weight * opacity_entropy_loss(out.opacity)
        if self.config.orientation_weight > 0:
            orientation = orientation_loss(out.weights, out.sample_normals, dirs, out.ray_index)
            loss = loss + self.config.orientation_weight * orientation
        return loss

    def modules(self) -> dict[str, torch.nn.Module | torch.nn.Parameter]:
        modules: dict[str, torch.nn.Module | torch.nn.Parameter] = {"field": self.field}
        if self.background is not None:
            modules["background"] = self.background
        if self.occupancy is not None:
            modules["occupancy"] = self.occupancy
        return modules


def build_particle(config: RunConfig, prior: DiffusionPrior, particle_id: int) -> Particle:
    kind = ImageParticle if config.particle == "image" else NeRFParticle
    return kind(config, prior, particle_id)


class ParticleGroup:
    """k particles driven together: render all to latents (graphs kept), then apply one gradient each."""

    def __init__(self, config: RunConfig, particle_ids: list[int], prior: DiffusionPrior):
        self.config, self.prior, self.particle_ids = config, prior, list(particle_ids)
        self.particles = {pid: build_particle(config, prior, pid) for pid in self.particle_ids}
        c = config.camera
        self.ranges = CameraRanges(c.elevation, c.azimuth, c.distance, c.fov)
        self._pending: dict[int, torch.Tensor] = {}

    def cameras(self, particle_id: int, step: int) -> Cameras:
        """The cameras particle ``particle_id`` sees at ``step``: a pure function of (seed, id, step), or of
        (seed, step) alone when cameras are shared by all particles."""
        owner = SHARED if self.config.camera.shared else particle_id
        generator = stream(self.config.seed, Stage.NERF, Purpose.CAMERA, owner, step)
        return sample_cameras(self.config.camera.views_per_step, self.ranges, generator)

    def render(self, step: int) -> tuple[RenderOut, dict[str, float]]:
        started, clock = time.perf_counter(), {"encode": 0.0}
        latents, c2w, labels, owners = [], [], [], []
        for pid, particle in self.particles.items():
            cams = self.cameras(pid, step)
            z = particle.latents(
                cams, self.prior, step, stream(self.config.seed, Stage.NERF, Purpose.RENDER, pid, step), clock
            )
            self._pending[pid] = z
            latents.append(z.detach().float().cpu())
            if particle.has_cameras:
                c2w.append(cams.c2w())
                labels += cams.view_labels()
            else:
                c2w.append(torch.zeros(len(cams), 4, 4))
                labels += [None] * len(cams)
            owners += [pid] * len(cams)
        out = RenderOut(torch.cat(latents), torch.cat(c2w), labels, owners)
        elapsed = time.perf_counter() - started
        return out, {"time/render": elapsed - clock["encode"], "time/encode": clock["encode"]}

    def apply(self, step: int, grads: torch.Tensor) -> dict[str, float]:
        """Backpropagate each particle's slice of grads [V_total, C, h, w] through its render and step it."""
        started = time.perf_counter()
        dropped, reg = 0, 0.0
        offset = 0
        for pid, particle in self.particles.items():
            z = self._pending.pop(pid)
            g = grads[offset : offset + z.shape[0]].to(z.device, z.dtype)
            offset += z.shape[0]
            g, n_bad = drop_nonfinite(g)
            dropped += n_bad
            regularisation = particle.regularisation()
            loss = surrogate_loss(z, g) / z.shape[0] + regularisation
            particle.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            particle.optimizer.step()
            reg += float(regularisation.detach())
        if offset != grads.shape[0]:
            raise ValueError(f"step {step}: got {grads.shape[0]} gradients for {offset} latents")
        return {
            "time/backward": time.perf_counter() - started,
            "nonfinite_dropped": dropped,
            "regularisation": reg / max(1, len(self.particles)),
        }

    @torch.no_grad()
    def images(self, cameras: Cameras) -> dict[int, torch.Tensor]:
        """Every particle seen from the same cameras (evaluation views, turntables): [V, 3, H, W] each."""
        return {pid: p.images(cameras, self.prior) for pid, p in self.particles.items()}

    @torch.no_grad()
    def write_views(self, run_dir: Path, views: Cameras, turntable: Cameras | None = None) -> None:
        """Each particle's particles/NN/views.png (the views side by side) and, given its cameras, turntable.gif,
        written where the particles live (the run folder is shared), so no image goes through the driver."""
        for pid, particle in self.particles.items():
            folder = run_dir / "particles" / f"{pid:02d}"
            save_png(torch.cat(list(particle.images(views, self.prior)), dim=2), folder / "views.png")
            if turntable is not None:
                save_gif(particle.images(turntable, self.prior), folder / "turntable.gif")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for pid, particle in self.particles.items():
            out.update({f"{pid:04d}.{k}": v for k, v in particle.state_tensors().items()})
            out.update({f"{pid:04d}.optim.{k}": v for k, v in optimizer_tensors(particle.optimizer).items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for pid, particle in self.particles.items():
            mine = {k[5:]: v for k, v in tensors.items() if k.startswith(f"{pid:04d}.")}
            if not mine:
                raise KeyError(f"checkpoint holds no state for particle {pid}")
            particle.load_state_tensors({k: v for k, v in mine.items() if not k.startswith("optim.")})
            load_optimizer_tensors(particle.optimizer, {k[6:]: v for k, v in mine.items() if k.startswith("optim.")})
