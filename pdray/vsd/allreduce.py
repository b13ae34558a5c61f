"""Summing LoRA gradient shares across R score replicas, as pure tensor functions; the Ray layer moves the pieces.

Each particle actor's renders give one share (``LoraGrads``), computed on the replica that serves the actor. A
replica first adds its own actors' shares (``local_sum``), then cuts that one gradient into R pieces; replica j sums
piece j of every replica (reduce-scatter) and every replica joins the R sums (all-gather). Each replica then
receives 2 (R - 1) / R of the gradient's size per LoRA step, as in a ring all-reduce, however many actors it
serves. Every sum runs left to right (actors in order within a replica, then replicas in order), elementwise, so
all replicas join the same sum bit for bit and apply the same update. With one actor per replica the sum is the
one-replica sum bit for bit; with several, the grouping by replica changes float32 rounding only.
"""

from __future__ import annotations

import torch

from pdray.types import LoraGrads


def sum_in_order(tensors: list[torch.Tensor]) -> torch.Tensor:
    """t0 + t1 + ... left to right, float32, on the first one's device."""
    total = tensors[0].float()
    for t in tensors[1:]:
        total = total + t.to(total.device, torch.float32)
    return total


def local_sum(shares: list[LoraGrads]) -> LoraGrads:
    """One replica's shares as one: gradients summed in actor order, losses and counts added."""
    grad = sum_in_order([share.grad for share in shares])
    return LoraGrads(grad, sum(s.loss_sum for s in shares), sum(s.count for s in shares))


def cut(grad: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """A flat gradient [N] in ``parts`` contiguous pieces whose sizes differ by at most one."""
    return [piece.contiguous() for piece in torch.tensor_split(grad, parts)]


def join(summed_pieces: list[torch.Tensor]) -> torch.Tensor:
    """The whole summed gradient [N] from its R summed pieces, in order."""
    return torch.cat([p.flatten() for p in summed_pieces])
