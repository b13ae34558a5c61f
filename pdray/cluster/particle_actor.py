"""ParticleActor: owns k particles, their optimisers and a VAE encoder replica; renders and applies gradients.

It sends latents (not images) and backpropagates through its own encoder and renderer; it writes its own
checkpoint shard and evaluation views into the (shared) run folder. A restarted actor
re-runs __init__ with fresh particles and raises LostStateError until the driver restores the last checkpoint
into it, so a process lost between two calls can never hand back untrained particles.
"""

from __future__ import annotations

from pathlib import Path

import ray
import torch

from pdray.cluster.lifecycle import ActorBase
from pdray.config import RunConfig
from pdray.priors.diffusion import load_prior
from pdray.render.cameras import Cameras
from pdray.types import CameraMoments, RenderOut
from pdray.vsd.checkpoint import read_particles, write_particle_shard
from pdray.vsd.distill import render_moments
from pdray.vsd.particle import ParticleGroup


@ray.remote
class ParticleActor(ActorBase):
    def __init__(self, config: dict, particle_ids: list[int], num_cpus: float):
        super().__init__(num_cpus, f"particles {particle_ids}")
        self.config = RunConfig.model_validate(config)
        prior = load_prior(self.config.prior, vae_only=True)
        self.group = ParticleGroup(self.config, particle_ids, prior)

    @ray.method(num_returns=3)
    def render(self, step: int) -> tuple[RenderOut, CameraMoments | None, dict[str, float]]:
        """The latents, their per-camera moments (for the Gaussian particle score; None otherwise) and stats."""
        self.check()
        render, stats = self.group.render(step)
        fits = self.config.fits_all_particles
        moments = render_moments([render], self.config.gaussian_resolution) if fits else None
        return render, moments, stats | {"bytes/render": render.nbytes + (moments.nbytes if moments else 0)}

    def apply(self, step: int, grads: torch.Tensor) -> dict[str, float]:
        self.check()
        return self.group.apply(step, grads)

    def write_views(self, run_dir: str, views: Cameras, turntable: Cameras | None) -> None:
        self.check()
        self.group.write_views(Path(run_dir), views, turntable)

    def write_shard(self, folder: str) -> dict[str, list[int]]:
        """This actor's particles into the checkpoint folder (its own shard); -> {file name: particle ids}."""
        self.check()
        return write_particle_shard(Path(folder), self.group.particle_ids, self.group.state_tensors())

    def load_shard(self, folder: str, manifest: dict) -> None:
        """This actor's particles from a checkpoint, read from whichever shards hold them."""
        self.group.load_state_tensors(read_particles(Path(folder), manifest, self.group.particle_ids))
        self.restored()
