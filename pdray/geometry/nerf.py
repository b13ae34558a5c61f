"""The NeRF particle's fields: density and albedo at a point, and a background colour per view direction.

A field only answers "what is here" (nerfstudio's split); compositing lives in ``pdray.render.volume``.
The architecture is threestudio's ProlificDreamer ``implicit-volume``: a grid encoding, a small MLP,
softplus density with a "blob" bias so that optimisation starts from a soft ball (Magic3D's
initialisation, which threestudio found to work better than DreamFusion's Gaussian blob), sigmoid albedo.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt
from torch import nn

from pdray.geometry.hashgrid import GridConfig, make_encoding


@dataclass
class FieldConfig:
    """Knobs of ``NeRFField``. Defaults are ProlificDreamer's (threestudio ``prolificdreamer.yaml``)."""

    grid: GridConfig = field(default_factory=GridConfig)
    """The positional encoding."""
    hidden_dim: Annotated[int, Ge(1)] = 64
    """Width of the MLP's hidden layers."""
    n_hidden_layers: Annotated[int, Ge(0)] = 1
    """Number of hidden layers of the MLP."""
    density_activation: Literal["softplus", "trunc_exp"] = "softplus"
    """Maps raw density to density >= 0; trunc_exp is Instant-NGP's exp with a gradient clamped at exp(15)."""
    density_bias: Literal["blob", "negative_blob", "none"] = "blob"
    """Added to raw density: a ball for objects, a hollow (negative ball) for scenes, or nothing."""
    blob_density: Annotated[float, Ge(0.0)] = 10.0
    """Raw density the blob adds at the centre."""
    blob_radius: Annotated[float, Gt(0.0)] = 0.5
    """Radius (world units) where the blob's bias falls to zero."""
    normal_eps: Annotated[float, Gt(0.0)] = 0.01
    """Finite-difference step (world units) of ``normals``."""
    radius: Annotated[float, Gt(0.0)] = 1.0
    """Radius of the bounding sphere; points in [-radius, radius]^3 map to the encoding's [0, 1]^3."""


class _TruncExp(torch.autograd.Function):
    """exp whose gradient is clamped at exp(15), so one large raw density cannot blow up a step."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


def _mlp(in_dim: int, hidden_dim: int, n_hidden_layers: int, out_dim: int) -> nn.Sequential:
    """ReLU MLP with ``n_hidden_layers`` hidden layers of width ``hidden_dim``, no output activation."""
    dims = [in_dim] + [hidden_dim] * n_hidden_layers
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(dims[-1], out_dim))
    return nn.Sequential(*layers)


class NeRFField(nn.Module):
    """Density and albedo of world-space points in the bounding sphere.

    One MLP on the grid features outputs raw density and albedo logits (threestudio uses two MLPs on the
    same features; one with four outputs is cheaper on a CPU and no less expressive at this size).
    ``encoding`` and ``mlp`` are separate attributes so that optimisers can give them their own learning
    rates (ProlificDreamer: 1e-2 for the encoding, 1e-3 for the MLP).
    """

    def __init__(self, config: FieldConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or FieldConfig()
        self.encoding = make_encoding(**asdict(config.grid))
        self.mlp = _mlp(self.encoding.output_dim, config.hidden_dim, config.n_hidden_layers, 4)

    def _raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw density with its bias ``[N]`` and albedo logits ``[N, 3]`` at world points ``x: [N, 3]``."""
        cfg = self.config
        unit = ((x / cfg.radius + 1.0) / 2.0).clamp(0.0, 1.0)
        out = self.mlp(self.encoding(unit))
        raw_density = out[:, 0]
        if cfg.density_bias != "none":
            blob = cfg.blob_density * (1.0 - x.norm(dim=-1) / cfg.blob_radius)
            raw_density = raw_density + (blob if cfg.density_bias == "blob" else -blob)
        return raw_density, out[:, 1:]

    def _activate(self, raw_density: torch.Tensor) -> torch.Tensor:
        if self.config.density_activation == "softplus":
            return F.softplus(raw_density)
        return _TruncExp.apply(raw_density)

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """Density ``[N]`` (>= 0) at world points ``x: [N, 3]``."""
        return self._activate(self._raw(x)[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Density ``[N]`` and albedo ``[N, 3]`` in [0, 1] at world points ``x: [N, 3]``."""
        raw_density, albedo_logits = self._raw(x)
        return self._activate(raw_density), torch.sigmoid(albedo_logits)

    def normals(self, x: torch.Tensor) -> torch.Tensor:
        """Unit normals ``[N, 3]`` at world points ``x: [N, 3]``: minus the normalised density gradient.

        The gradient is taken by central differences (6 extra field evaluations, batched in one call)
        rather than double backprop, so it stays first-order differentiable and cheap on a CPU. It is
        the gradient of the raw (pre-activation) density: the same direction, but it does not vanish
        where softplus saturates in empty space.
        """
        eps = self.config.normal_eps
        offsets = torch.cat([torch.eye(3, device=x.device), -torch.eye(3, device=x.device)]) * eps  # [6, 3]
        raw = self._raw((x[:, None, :] + offsets).reshape(-1, 3))[0].view(-1, 2, 3)  # [N, +/-, axis]
        gradient = (raw[:, 0] - raw[:, 1]) / (2.0 * eps)
        return -F.normalize(gradient, dim=-1)


class BackgroundField(nn.Module):
    """Background colour ``[N, 3]`` in [0, 1] per unit view direction ``[N, 3]``: a small MLP.

    The light-weight analogue of threestudio's neural environment map. The renderer may replace it
    by a random solid colour (``random_background_prob``) so the geometry cannot hide in the background.
    """

    def __init__(self, hidden_dim: int = 16, n_hidden_layers: int = 2) -> None:
        super().__init__()
        self.mlp = _mlp(3, hidden_dim, n_hidden_layers, 3)

    def forward(self, dirs: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(dirs))
