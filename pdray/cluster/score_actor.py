"""ScoreActor: the pretrained prior and the particle score (Gaussian fit or CameraLoRA) for a shard of the particle
actors (all of them with one replica).

``grads`` takes the particle actors' RenderOut refs as top-level arguments (Ray resolves them store to
store; the driver never fetches a tensor) and returns one gradient per served actor plus stats, split with
num_returns. With one replica, ``lora_update`` runs while the particle actors backpropagate. With R replicas,
each LoRA step is ``lora_grads`` on every replica (its shard's share), then ``lora_apply`` on every replica with
all R shares as top-level refs: each sums them in replica order and steps its AdamW, so all replicas hold one
LoRA, and return its digest for the driver to compare. One single-threaded actor runs calls in submission order,
so a step's LoRA calls always follow its grads and precede the next step's.
A restarted ScoreActor raises LostStateError until the driver restores the LoRA from the last checkpoint.
"""

from __future__ import annotations

import time

import ray
import torch

from pdray.cluster.lifecycle import ActorBase
from pdray.config import RunConfig
from pdray.priors.diffusion import load_prior
from pdray.score import ScoreEstimator
from pdray.types import LoraGrads, RenderOut


@ray.remote
class ScoreActor(ActorBase):
    def __init__(self, config: dict, num_cpus: float):
        super().__init__(num_cpus, "the ScoreActor")
        self.config = RunConfig.model_validate(config)
        self.score = ScoreEstimator(self.config, load_prior(self.config.prior))

    def grads(self, step: int, serve: list[int] | None, *renders: RenderOut):
        """(grad for each served render, ..., stats); call with .options(num_returns=len(served) + 1).
        ``serve`` indexes ``renders`` (None: all); the others only enter the Gaussian fit."""
        self.check()
        grads, stats = self.score.grads(step, *renders, serve=serve)
        return (*grads, stats)

    def lora_update(self, step: int, *renders: RenderOut) -> dict[str, float]:
        self.check()
        return self.score.lora_update(step, *renders)

    def lora_grads(self, step: int, k: int, *renders: RenderOut) -> list[LoraGrads]:
        """This replica's share of LoRA step k of ``step``, one per served actor (on the CPU, for the others)."""
        self.check()
        shares = self.score.lora_grads(step, k, *renders)
        for share in shares:
            share.grads = [g.cpu() for g in share.grads]
        return shares

    def lora_apply(self, *shares: list[LoraGrads]) -> dict[str, float | str]:
        """One LoRA step on every replica's shares (in replica order); the loss and the LoRA's digest after it."""
        self.check()
        started = time.perf_counter()
        loss = self.score.lora_apply(*(share for replica in shares for share in replica))
        return {
            "lora_loss": loss,
            "lora_digest": self.score.lora_digest(),
            "time/lora_apply": time.perf_counter() - started,
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self.check()
        return self.score.state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.score.load_state_tensors(tensors)
        self.restored()
