"""Multi-resolution grid encodings of points in [0, 1]^3: the NeRF's positional features.

Three interchangeable modules with one constructor and one interface, ``x: [N, 3] in [0, 1]^3 ->
features: [N, n_levels * n_features_per_level]`` (level-major, as tinycudann lays them out):

- ``HashGridEncoding``: Instant-NGP's hash grid in pure PyTorch. It follows tinycudann's conventions
  (level scales, index layout, hash, parameter layout), so the two backends can be held one against
  the other with the same parameters.
- ``TcnnHashGridEncoding``: the same encoding through tinycudann's fused CUDA kernels.
- ``DenseGridEncoding``: plain dense feature grids sampled with ``F.grid_sample``; no hashing, so
  it only suits coarse grids, where it is the fastest choice on a CPU.

``make_encoding`` is the one place a backend is chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge
from torch import nn

from pdray.backends import tinycudann_unavailable_reason

GridKind = Literal["hashgrid", "dense"]
Backend = Literal["auto", "torch", "tcnn"]

# tinycudann's spatial hash primes (the first is 1 so that the x coordinate stays coherent in memory).
_PRIMES = (1, 2654435761, 805459861)
_UINT32_MASK = 0xFFFFFFFF


@dataclass
class GridConfig:
    """The encoding's knobs. Defaults are ProlificDreamer's (threestudio ``prolificdreamer.yaml``)."""

    kind: GridKind = "hashgrid"
    """Hash grid (Instant-NGP) or dense grids (coarse, fast on a CPU)."""
    backend: Backend = "auto"
    """``auto`` uses tinycudann when it imports and CUDA is available, else pure PyTorch."""
    n_levels: Annotated[int, Ge(1)] = 16
    """Number of resolution levels."""
    n_features_per_level: Annotated[int, Ge(1)] = 2
    """Feature channels stored per grid vertex."""
    log2_hashmap_size: Annotated[int, Ge(4)] = 19
    """log2 of the most entries one level may hold; finer hash-grid levels are hashed into that many."""
    base_resolution: Annotated[int, Ge(2)] = 16
    """Resolution of the coarsest level."""
    per_level_scale: Annotated[float, Ge(1.0)] = 1.447269
    """Growth of the resolution from one level to the next (1.447269 reaches 2048 after 16 levels)."""


def _level_scale(level: int, base_resolution: int, per_level_scale: float) -> float:
    """tinycudann's grid scale of a level: vertex spacing is 1 / scale."""
    return 2.0 ** (level * math.log2(per_level_scale)) * base_resolution - 1.0


class HashGridEncoding(nn.Module):
    """Instant-NGP hash grid in pure PyTorch, computing exactly what tinycudann's ``HashGrid`` computes.

    Level ``l`` has scale ``s_l = base * per_level_scale**l - 1`` and ``ceil(s_l) + 1`` vertices per
    side; a point's grid position is ``x * s_l + 0.5``. A level whose ``res**3`` vertices fit in
    ``2**log2_hashmap_size`` entries is indexed densely (``i + j * res + k * res**2``), finer levels
    through the XOR hash of ``i * 1, j * 2654435761, k * 805459861`` (uint32). Features of the 8
    surrounding vertices are blended trilinearly. All levels share one table ``params: [F, T]``, the
    transpose of tinycudann's ``[T, F]`` (level ``l`` at columns ``offsets[l] : offsets[l] + sizes[l]``,
    sizes rounded up to a multiple of 8); feature-major gathers are faster on a CPU.
    """

    def __init__(
        self,
        n_levels: int = 16,
        n_features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        per_level_scale: float = 1.447269,
    ) -> None:
        super().__init__()
        self.n_levels = n_levels
        self.n_features_per_level = n_features_per_level
        self.output_dim = n_levels * n_features_per_level
        max_size = 2**log2_hashmap_size
        scales, resolutions, sizes, hashed = [], [], [], []
        for level in range(n_levels):
            scale = _level_scale(level, base_resolution, per_level_scale)
            resolution = math.ceil(scale) + 1
            size = min(resolution**3, max_size)
            scales.append(scale)
            resolutions.append(resolution)
            sizes.append(-(-size // 8) * 8)
            hashed.append(resolution**3 > max_size)
        # Resolutions only grow, so the densely indexed levels come first.
        self.n_dense_levels = hashed.count(False)
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + size)
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32), persistent=False)
        self.register_buffer("resolutions", torch.tensor(resolutions), persistent=False)
        self.register_buffer("sizes", torch.tensor(sizes), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets), persistent=False)
        self.params = nn.Parameter(torch.empty(n_features_per_level, sum(sizes)).uniform_(-1e-4, 1e-4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode ``x: [N, 3]`` in [0, 1]^3 into ``[N, n_levels * n_features_per_level]``."""
        # Work tensors keep the points as the last, contiguous dimension: elementwise ops over
        # [.., L, N] vectorise, where a trailing corner dimension of size 2 would not.
        pos = x.t().float()[:, None, :] * self.scales[None, :, None] + 0.5  # [3, L, N]
        floor = pos.floor()
        frac = pos - floor
        # Per axis, the lower and upper vertex coordinate.
        corner = floor.long()[:, None] + torch.arange(2, device=x.device)[None, :, None, None]  # [3, 2, L, N]
        nd = self.n_dense_levels
        dense = self._interpolate(self._dense_index(corner[..., :nd, :]), frac[:, :nd])
        hashed = self._interpolate(self._hashed_index(corner[..., nd:, :]), frac[:, nd:])
        out = torch.cat([dense, hashed], dim=1)  # [F, L, N]
        return out.permute(2, 1, 0).reshape(x.shape[0], self.output_dim)

    def _dense_index(self, corner: torch.Tensor) -> torch.Tensor:
        """Table rows ``[2, 2, 2, Ld, N]`` of the corners ``[3, 2, Ld, N]`` of densely indexed levels."""
        nd = corner.shape[2]
        res = self.resolutions[:nd, None]  # [Ld, 1]
        cx, cy, cz = corner
        index = cx[:, None, None] + (cy * res)[None, :, None] + (cz * (res * res))[None, None, :]
        return index % self.sizes[:nd, None] + self.offsets[:nd, None]

    def _hashed_index(self, corner: torch.Tensor) -> torch.Tensor:
        """Table rows ``[2, 2, 2, Lh, N]`` of the corners ``[3, 2, Lh, N]`` of hashed levels."""
        nd = self.n_dense_levels
        # Int64 products are exact, so their low bits are those of tinycudann's uint32 products, and
        # hashed levels have power-of-two sizes: masking each term by size - 1 is the XOR's modulo.
        mask = self.sizes[nd:, None] - 1  # [Lh, 1]
        hx, hy, hz = ((corner[axis] * prime) & mask for axis, prime in enumerate(_PRIMES))
        return (hx[:, None, None] ^ hy[None, :, None] ^ hz[None, None, :]) + self.offsets[nd:, None]

    def _interpolate(self, index: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
        """Trilinear blend ``[F, Lg, N]`` of the table rows ``index: [2, 2, 2, Lg, N]``, ``frac: [3, Lg, N]``."""
        feats = self.params.index_select(1, index.reshape(-1)).view(self.n_features_per_level, *index.shape)
        feats = torch.lerp(*feats.unbind(3), frac[2])  # along z: [F, 2, 2, Lg, N]
        feats = torch.lerp(*feats.unbind(2), frac[1])  # along y: [F, 2, Lg, N]
        return torch.lerp(*feats.unbind(1), frac[0])  # along x: [F, Lg, N]


class DenseGridEncoding(nn.Module):
    """Multi-resolution dense feature grids, sampled trilinearly with ``F.grid_sample``.

    Level ``l`` holds ``round(base * per_level_scale**l)`` vertices per side spanning [0, 1]
    (``align_corners=True``). There is no hashing: a level larger than ``2**log2_hashmap_size``
    entries is an error, not a silent cap. Parameters: ``grids[l]: [1, F, res, res, res]`` indexed
    ``[z, y, x]`` as ``grid_sample`` reads them.
    """

    def __init__(
        self,
        n_levels: int = 4,
        n_features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        per_level_scale: float = 1.447269,
    ) -> None:
        super().__init__()
        self.output_dim = n_levels * n_features_per_level
        grids = []
        for level in range(n_levels):
            resolution = max(2, round(base_resolution * per_level_scale**level))
            if resolution**3 > 2**log2_hashmap_size:
                raise ValueError(
                    f"dense grid level {level} has {resolution}^3 vertices, more than 2**log2_hashmap_size = "
                    f"2**{log2_hashmap_size}; use fewer levels, a smaller per_level_scale, or kind='hashgrid'"
                )
            grids.append(nn.Parameter(torch.empty(1, n_features_per_level, *(3 * [resolution])).uniform_(-1e-4, 1e-4)))
        self.grids = nn.ParameterList(grids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode ``x: [N, 3]`` in [0, 1]^3 into ``[N, n_levels * n_features_per_level]``."""
        coords = (x.float() * 2.0 - 1.0).view(1, 1, 1, -1, 3)  # grid_sample reads (x, y, z) in [-1, 1]
        feats = [
            F.grid_sample(grid, coords, mode="bilinear", padding_mode="border", align_corners=True).view(
                grid.shape[1], -1
            )
            for grid in self.grids
        ]  # each [F, N]
        return torch.cat(feats).t()


class TcnnHashGridEncoding(nn.Module):
    """tinycudann's fused CUDA hash grid; same constructor and interface as ``HashGridEncoding``.

    tinycudann is imported here, not at module import, so that pdray imports without it.
    """

    def __init__(
        self,
        n_levels: int = 16,
        n_features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        per_level_scale: float = 1.447269,
    ) -> None:
        super().__init__()
        try:
            import tinycudann
        except ImportError as error:
            raise ImportError(
                "the tcnn encoding backend needs tinycudann, which is not installed (it needs CUDA and is not on "
                "PyPI: pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch); "
                "use backend='torch' or 'auto' instead"
            ) from error
        if not torch.cuda.is_available():
            raise RuntimeError("the tcnn encoding backend (tinycudann) needs a CUDA device; use backend='torch'")
        self.output_dim = n_levels * n_features_per_level
        config = {
            "otype": "HashGrid",
            "n_levels": n_levels,
            "n_features_per_level": n_features_per_level,
            "log2_hashmap_size": log2_hashmap_size,
            "base_resolution": base_resolution,
            "per_level_scale": per_level_scale,
        }
        self.encoding = tinycudann.Encoding(3, config, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode ``x: [N, 3]`` in [0, 1]^3 (on CUDA) into ``[N, n_levels * n_features_per_level]``."""
        return self.encoding(x.contiguous()).float()


def tcnn_unavailable_reason() -> str | None:
    """Why ``auto`` would not use tinycudann here, or None when it would: a real try of a tiny encoding, forward and
    backward, once per process (``pdray.backends``)."""
    return tinycudann_unavailable_reason()


def encoding_backend_name(backend: Backend, kind: GridKind = "hashgrid") -> Literal["torch", "tcnn"]:
    """The backend ``make_encoding(kind, backend)`` uses on this machine (``pdray doctor`` reports it).

    ``auto`` resolves to ``tcnn`` or ``torch``; an explicit choice is returned as is (``make_encoding``
    raises if it cannot be honoured; ``tcnn_unavailable_reason`` says why).
    """
    if kind == "dense":
        if backend == "tcnn":
            raise ValueError("dense grids have only a torch backend; use backend='torch' or 'auto'")
        return "torch"
    if backend == "auto":
        return "tcnn" if tcnn_unavailable_reason() is None else "torch"
    return backend


def make_encoding(kind: GridKind = "hashgrid", backend: Backend = "auto", **kwargs: float) -> nn.Module:
    """Build the grid encoding; ``kwargs`` are the constructor arguments shared by all encodings.

    Every returned module maps ``x: [N, 3]`` in [0, 1]^3 to ``[N, output_dim]`` and has ``output_dim``.
    """
    name = encoding_backend_name(backend, kind)
    if kind == "dense":
        return DenseGridEncoding(**kwargs)
    return TcnnHashGridEncoding(**kwargs) if name == "tcnn" else HashGridEncoding(**kwargs)
