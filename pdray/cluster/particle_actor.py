"""ParticleActor: owns k particles, their optimisers and a VAE encoder replica; renders and applies gradients.

It sends latents (not images) and backpropagates through its own encoder and renderer. A restarted actor
re-runs __init__ with fresh particles and raises LostStateError until the driver restores the last checkpoint
into it, so a process lost between two calls can never hand back untrained particles.
"""

from __future__ import annotations

import ray
import torch

from pdray.cameras import Cameras
from pdray.cluster.lifecycle import ActorBase
from pdray.config import RunConfig
from pdray.particle import ParticleGroup
from pdray.priors.diffusion import load_prior
from pdray.types import RenderOut


@ray.remote
class ParticleActor(ActorBase):
    def __init__(self, config: dict, particle_ids: list[int], num_cpus: float):
        super().__init__(num_cpus, f"particles {particle_ids}")
        self.config = RunConfig.model_validate(config)
        prior = load_prior(self.config.prior, vae_only=True)
        self.group = ParticleGroup(self.config, particle_ids, prior)

    @ray.method(num_returns=2)
    def render(self, step: int) -> tuple[RenderOut, dict[str, float]]:
        self.check()
        return self.group.render(step)

    def apply(self, step: int, grads: torch.Tensor) -> dict[str, float]:
        self.check()
        return self.group.apply(step, grads)

    def images(self, cameras: Cameras) -> dict[int, torch.Tensor]:
        self.check()
        return self.group.images(cameras)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self.check()
        return self.group.state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.group.load_state_tensors(tensors)
        self.restored()
