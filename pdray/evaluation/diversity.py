"""Diversity and fidelity of a set of particles from their embeddings (CLIP's, or any other), as pure tensor functions.

Every function takes unit-norm embeddings (rows L2-normalised), so the kernel is the cosine similarity:
- the Vendi score (Friedman & Dieng, 2023): exp of the entropy of the eigenvalues of K / n, K_ij = cos(e_i, e_j);
  the effective number of distinct particles: 1 when all are alike, k for k mutually orthogonal ones;
- the mean pairwise cosine distance, 1 - cos, over all pairs: 0 when all are alike;
- CLIP score (Hessel et al., 2021, as torchmetrics computes it): 100 x the mean cosine between images and a prompt,
  floored at 0;
- R-precision (DreamFusion): how often the true prompt is the nearest of the prompt and its distractors.
"""

from __future__ import annotations

import torch


def normalise(embeddings: torch.Tensor) -> torch.Tensor:
    """Rows of embeddings [N, D] scaled to unit L2 norm."""
    return torch.nn.functional.normalize(embeddings.double(), dim=-1)


def vendi_score(embeddings: torch.Tensor) -> float:
    """Vendi score of unit-norm embeddings [N, D] under the cosine kernel; 1.0 for N <= 1."""
    n = embeddings.shape[0]
    if n <= 1:
        return 1.0
    e = embeddings.double()
    eigenvalues = torch.linalg.eigvalsh(e @ e.T / n).clamp(min=0)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    return float(torch.exp(-(eigenvalues * eigenvalues.log()).sum()))


def mean_pairwise_cosine_distance(embeddings: torch.Tensor) -> float:
    """Mean of 1 - cos over all pairs of rows of unit-norm embeddings [N, D]; 0.0 for N <= 1."""
    n = embeddings.shape[0]
    if n <= 1:
        return 0.0
    e = embeddings.double()
    distance = 1 - e @ e.T
    return float((distance.sum() - distance.diagonal().sum()) / (n * (n - 1)))


def clip_score(image_embeddings: torch.Tensor, text_embedding: torch.Tensor) -> float:
    """max(100 x mean cos(image, text), 0) for unit-norm image embeddings [N, D] and a text embedding [D]."""
    return max(100 * float((image_embeddings.double() @ text_embedding.double()).mean()), 0.0)


def r_precision(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, true_index: int = 0) -> float:
    """Fraction of images [N, D] whose most similar caption among text_embeddings [M, D] is ``true_index``
    (R@1 with the other M - 1 captions as distractors; chance is 1 / M)."""
    nearest = (image_embeddings.double() @ text_embeddings.double().T).argmax(dim=-1)
    return float((nearest == true_index).double().mean())
