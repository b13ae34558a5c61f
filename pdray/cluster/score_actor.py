"""ScoreActor: the pretrained prior and the CameraLoRA, shared by every particle actor.

``grads`` takes the particle actors' RenderOut refs as top-level arguments (Ray resolves them store to
store; the driver never fetches a tensor) and returns one gradient per actor plus stats, split with
num_returns. ``lora_update`` runs while the particle actors backpropagate. One single-threaded actor runs
calls in submission order, so lora_update(step) always follows grads(step) and precedes grads(step + 1).
A restarted ScoreActor raises LostStateError until the driver restores the LoRA from the last checkpoint.
"""

from __future__ import annotations

import ray
import torch

from pdray.cluster.lifecycle import LostStateError, actor_location, start_actor
from pdray.cluster.memory import peak_memory
from pdray.config import RunConfig
from pdray.particle import RenderOut
from pdray.priors.diffusion import load_prior
from pdray.score import ScoreEstimator


@ray.remote
class ScoreActor:
    def __init__(self, config: dict, num_cpus: float):
        self.lost_state = start_actor(num_cpus)
        self.config = RunConfig.model_validate(config)
        prior = load_prior(self.config.prior)
        self.score = ScoreEstimator(self.config, prior)

    def _check(self) -> None:
        if self.lost_state:
            raise LostStateError("the ScoreActor was restarted and awaits a checkpoint")

    def location(self) -> dict[str, str | int]:
        return actor_location()

    def memory(self) -> dict[str, float]:
        return peak_memory()

    def grads(self, step: int, *renders: RenderOut):
        """(grad for actor 0, ..., grad for actor A-1, stats); call with .options(num_returns=A + 1)."""
        self._check()
        grads, stats = self.score.grads(step, *renders)
        return (*grads, stats)

    def lora_update(self, step: int, *renders: RenderOut) -> dict[str, float]:
        self._check()
        return self.score.lora_update(step, *renders)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._check()
        return self.score.state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.score.load_state_tensors(tensors)
        self.lost_state = False
