"""Summing LoRA gradient shares across R score replicas, as pure tensor functions; the Ray layer moves the pieces.

With one replica the shares (one per particle actor, ``LoraGrads``) are summed where they are made. With R, each
replica cuts its shares into R pieces; replica j sums piece j of every share (reduce-scatter) and every replica
joins the R sums (all-gather). Each replica then receives 2 (R - 1) / R of the gradient's size, as in a ring
all-reduce, instead of (R - 1) times it. Every sum runs left to right in particle-actor order, elementwise, so
the joined sum equals the one-replica sum bit for bit and all replicas apply the same update.
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


def cut(shares: list[LoraGrads], parts: int) -> list[list[torch.Tensor]]:
    """pieces[j] = piece j of every share's flat gradient (contiguous, sizes differing by at most one)."""
    split = [torch.tensor_split(share.grad, parts) for share in shares]
    return [[pieces[j].contiguous() for pieces in split] for j in range(parts)]


def join(summed_pieces: list[torch.Tensor]) -> torch.Tensor:
    """The whole summed gradient [N] from its R summed pieces, in order."""
    return torch.cat([p.flatten() for p in summed_pieces])
