"""Data passed between the particle side and the score side, so neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RenderOut:
    """What a particle group sends to the score estimator: detached latents and their cameras."""

    latents: torch.Tensor  # [V_total, C, h, w], detached, on the CPU
    c2w: torch.Tensor  # [V_total, 4, 4]; zeros for 2D particles (no camera)
    view_labels: list[str | None]  # prompt suffix label per latent (None: no suffix)
    particle_ids: list[int]  # which particle each latent belongs to

    def __post_init__(self) -> None:
        n = self.latents.shape[0]
        if not (self.c2w.shape[0] == len(self.view_labels) == len(self.particle_ids) == n):
            raise ValueError(
                f"RenderOut: {n} latents but {self.c2w.shape[0]} cameras, {len(self.view_labels)} labels "
                f"and {len(self.particle_ids)} owners"
            )

    @property
    def nbytes(self) -> int:
        """The tensors' size: what a render moves between processes, besides a few labels."""
        return self.latents.nbytes + self.c2w.nbytes


@dataclass
class LoraGrads:
    """One particle actor's share of a LoRA step: the loss gradient summed over its latents (float32, flat [N], in
    ``CameraLoRA.parameters()`` order), the summed loss and the number of latents. Shares are added in particle-actor
    order and divided by the total count, so the update is the mean over every particle's latents whatever the
    sharding over score replicas."""

    grad: torch.Tensor
    loss_sum: float
    count: int


@dataclass
class CameraMoments:
    """Sums over particles of the (coarse) latents rendered from each camera: what VSD's Gaussian particle score is
    fitted from. Sums add across particle actors and score replicas (``pdray.vsd.distill.add_moments``), so the fit
    needs no particle's latents but its own, and its size does not grow with the number of particles."""

    keys: torch.Tensor  # [K, D] float32, one row per camera (its c2w flattened), unique, sorted
    total: torch.Tensor  # [K, C, h, w] float64: the sum of the latents from that camera
    total_sq: torch.Tensor  # [K, C, h, w] float64: the sum of their squares
    count: torch.Tensor  # [K] int64: how many latents

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.keys, self.total, self.total_sq, self.count))
