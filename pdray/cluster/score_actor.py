"""ScoreActor: the pretrained prior and the particle score (Gaussian fit or CameraLoRA), shared by every particle actor.

``grads`` takes the particle actors' RenderOut refs as top-level arguments (Ray resolves them store to
store; the driver never fetches a tensor) and returns one gradient per actor plus stats, split with
num_returns. ``lora_update`` runs while the particle actors backpropagate. One single-threaded actor runs
calls in submission order, so lora_update(step) always follows grads(step) and precedes grads(step + 1).
A restarted ScoreActor raises LostStateError until the driver restores the LoRA from the last checkpoint.
"""

from __future__ import annotations

import ray
import torch

from pdray.cluster.lifecycle import ActorBase
from pdray.config import RunConfig
from pdray.priors.diffusion import load_prior
from pdray.score import ScoreEstimator
from pdray.types import RenderOut


@ray.remote
class ScoreActor(ActorBase):
    def __init__(self, config: dict, num_cpus: float):
        super().__init__(num_cpus, "the ScoreActor")
        self.config = RunConfig.model_validate(config)
        self.score = ScoreEstimator(self.config, load_prior(self.config.prior))

    def grads(self, step: int, *renders: RenderOut):
        """(grad for actor 0, ..., grad for actor A-1, stats); call with .options(num_returns=A + 1)."""
        self.check()
        grads, stats = self.score.grads(step, *renders)
        return (*grads, stats)

    def lora_update(self, step: int, *renders: RenderOut) -> dict[str, float]:
        self.check()
        return self.score.lora_update(step, *renders)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self.check()
        return self.score.state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.score.load_state_tensors(tensors)
        self.restored()
