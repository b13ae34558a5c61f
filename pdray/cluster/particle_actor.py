"""ParticleActor: owns k particles, their optimisers and a VAE encoder replica; renders and applies gradients.

It sends latents (not images) and backpropagates through its own encoder and renderer. A restarted actor
re-runs __init__ with fresh particles; the driver then restores them from the last checkpoint.
"""

from __future__ import annotations

import os

import ray
import torch

from pdray.cameras import Cameras
from pdray.cluster.memory import peak_memory
from pdray.config import RunConfig
from pdray.particle import ParticleGroup, RenderOut
from pdray.priors.diffusion import load_prior


@ray.remote
class ParticleActor:
    def __init__(self, config: dict, particle_ids: list[int], num_cpus: float):
        torch.set_num_threads(max(1, int(num_cpus)))
        self.config = RunConfig.model_validate(config)
        prior = load_prior(self.config.prior, vae_only=True)
        self.group = ParticleGroup(self.config, particle_ids, prior)

    def pid(self) -> int:
        return os.getpid()

    def memory(self) -> dict[str, float]:
        return peak_memory()

    @ray.method(num_returns=2)
    def render(self, step: int) -> tuple[RenderOut, dict[str, float]]:
        return self.group.render(step)

    def apply(self, step: int, grads: torch.Tensor) -> dict[str, float]:
        return self.group.apply(step, grads)

    def images(self, cameras: Cameras) -> dict[int, torch.Tensor]:
        return self.group.images(cameras)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.group.state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.group.load_state_tensors(tensors)
