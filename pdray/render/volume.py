"""Differentiable volume rendering of a field inside the bounding sphere, and the NeRF regularisers.

Pure functions in the style of nerfacc: the field comes in as callables, nothing is stored, and every
output is differentiable with respect to the field's parameters. Rays that miss the bounding sphere
are never sampled. Quadrature is NeRF's: ``alpha_i = 1 - exp(-sigma_i * delta_i)``, transmittance
``T_i = exp(-sum_{j<i} sigma_j * delta_j)``, weights ``w_i = alpha_i * T_i``.

Example (a blob-initialised field seen by two cameras)::

    >>> from pdray.render.cameras import camera_rays, orbit_cameras
    >>> from pdray.geometry.hashgrid import GridConfig
    >>> from pdray.geometry.nerf import BackgroundField, FieldConfig, NeRFField
    >>> field = NeRFField(FieldConfig(grid=GridConfig(kind="dense", n_levels=2, base_resolution=8)))
    >>> origins, dirs = camera_rays(orbit_cameras(2), resolution=16)
    >>> out = render_volume(field, BackgroundField(), origins, dirs, n_samples=32, normal_fn=field.normals)
    >>> out.rgb.shape, out.opacity.shape, out.weights.shape
    (torch.Size([2, 16, 16, 3]), torch.Size([2, 16, 16, 1]), torch.Size([2, 16, 16, 32]))
    >>> reg = orientation_loss(out.weights, out.sample_normals, dirs)
    >>> loss = out.rgb.mean() + 10.0 * sparsity_loss(out.opacity) + reg
    >>> loss.backward()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from pdray.render.cameras import fixed_light_direction

Shading = Literal["albedo", "lambertian", "textureless"]
FieldFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""World points ``[N, 3]`` -> density ``[N]``, albedo ``[N, 3]`` (e.g. ``NeRFField``)."""
BackgroundFn = Callable[[torch.Tensor], torch.Tensor]
"""Unit view directions ``[N, 3]`` -> rgb ``[N, 3]`` in [0, 1] (e.g. ``BackgroundField``)."""
NormalFn = Callable[[torch.Tensor], torch.Tensor]
"""World points ``[N, 3]`` -> unit normals ``[N, 3]`` (e.g. ``NeRFField.normals``)."""


@dataclass
class VolumeRender:
    """What ``render_volume`` returns; S is the number of samples per ray."""

    rgb: torch.Tensor
    """[B, H, W, 3] shaded foreground composited over the background."""
    opacity: torch.Tensor
    """[B, H, W, 1] accumulated weight, sum_i w_i."""
    depth: torch.Tensor
    """[B, H, W, 1] expected distance sum_i w_i t_i (not divided by opacity; 0 where nothing is hit)."""
    normal: torch.Tensor | None
    """[B, H, W, 3] composited normals sum_i w_i n_i (not renormalised); None without a normal_fn."""
    weights: torch.Tensor
    """[B, H, W, S] per-sample weights w_i (0 on rays that miss the sphere)."""
    sample_normals: torch.Tensor | None
    """[B, H, W, S, 3] per-sample unit normals (0 on rays that miss); None without a normal_fn."""
    ray_index: torch.Tensor | None = None
    """Packed renders (``pdray.render.occupancy``): the flat ray ``[N]`` of each sample, whose ``weights`` are ``[N]``
    and ``sample_normals`` ``[N, 3]``; None for the dense ``[B, H, W, S]`` layout."""


def intersect_sphere(
    origins: torch.Tensor, dirs: torch.Tensor, radius: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry and exit distances ``[R]`` of rays ``origins, dirs: [R, 3]`` (unit dirs) through the sphere
    of ``radius`` at the origin, and ``hit: [R]`` (bool). Entry is clamped at 0 for origins inside."""
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - radius**2
    disc = b * b - c
    root = disc.clamp_min(0.0).sqrt()
    t_far = -b + root
    return (-b - root).clamp_min(0.0), t_far, (disc > 0) & (t_far > 0)


def shade(
    albedo: torch.Tensor, normals: torch.Tensor | None, light: torch.Tensor, shading: Shading, ambient: float
) -> torch.Tensor:
    """Colour ``[..., 3]`` of surface points: albedo as is, or lit by one directional light.

    Lambertian: ``albedo * (ambient + (1 - ambient) * max(0, n . l))``; textureless uses a white albedo
    (DreamFusion's geometry-only renders). ``light: [..., 3]`` points towards the light.
    """
    if shading == "albedo":
        return albedo
    if normals is None:
        raise ValueError(f"shading={shading!r} needs normals: pass normal_fn to render_volume")
    diffuse = (normals * light).sum(-1, keepdim=True).clamp_min(0.0)
    brightness = ambient + (1.0 - ambient) * diffuse
    return (albedo if shading == "lambertian" else torch.ones_like(albedo)) * brightness


def _scatter_rays(values: torch.Tensor, rays: torch.Tensor, n_rays: int) -> torch.Tensor:
    """Per-hit-ray ``values: [R_hit, ...]`` placed at ``rays`` in zeros ``[n_rays, ...]``; differentiable."""
    return values.new_zeros(n_rays, *values.shape[1:]).index_copy(0, rays, values)


def draw_uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform draws from ``generator`` on its own device (pdray's streams are CPU generators), moved to ``device``."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def ray_lights(light_direction: torch.Tensor | None, batch_shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """The direction towards the light ``[B * H * W, 3]`` of each ray, from ``[3]`` or ``[B, 3]`` (default
    ``fixed_light_direction()``), as ``like``'s dtype and device."""
    if light_direction is None:
        light_direction = fixed_light_direction()
    return light_direction.to(like).reshape(-1, 1, 1, 3).expand(*batch_shape, 3).reshape(-1, 3)


def background_images(
    background: BackgroundFn, dirs: torch.Tensor, random_background_prob: float, generator: torch.Generator | None
) -> torch.Tensor:
    """The background ``[B, H, W, 3]`` behind rays ``dirs: [B, H, W, 3]``: ``background``'s, or with probability
    ``random_background_prob`` per image a random solid colour (drawn from ``generator``: the choices, the colours)."""
    bg = background(dirs.reshape(-1, 3)).view(*dirs.shape)
    if random_background_prob > 0.0:
        n_images = dirs.shape[0]
        use_random = draw_uniform((n_images,), generator, dirs.device) < random_background_prob
        colours = draw_uniform((n_images, 3), generator, dirs.device)
        bg = torch.where(use_random[:, None, None, None], colours[:, None, None, :].to(bg), bg)
    return bg


def render_volume(
    field: FieldFn,
    background: BackgroundFn,
    origins: torch.Tensor,
    dirs: torch.Tensor,
    n_samples: int,
    *,
    radius: float = 1.0,
    shading: Shading = "albedo",
    light_direction: torch.Tensor | None = None,
    ambient: float = 0.45,
    generator: torch.Generator | None = None,
    stratified: bool = True,
    random_background_prob: float = 0.0,
    normal_fn: NormalFn | None = None,
) -> VolumeRender:
    """Render rays ``origins, dirs: [B, H, W, 3]`` (unit dirs) through ``field`` inside the sphere.

    Each ray's segment inside the sphere of ``radius`` is cut into ``n_samples`` equal bins with one
    sample per bin, jittered uniformly in the bin when ``stratified`` (else at its centre).
    ``light_direction``: ``[3]`` or ``[B, 3]`` towards the light, default ``fixed_light_direction()``;
    used by ``lambertian`` and ``textureless`` shading, which need ``normal_fn``. Normals are only
    computed when ``normal_fn`` is given (they cost 6 extra field evaluations per sample with
    ``NeRFField.normals``). With probability ``random_background_prob`` an image's background is a
    random solid colour instead of ``background`` (ProlificDreamer uses 0.5), so that the field cannot
    paint the object into the background. Random draws come from ``generator``, in order: the jitter,
    then the background choice and colours.
    """
    if origins.dim() != 4:
        raise ValueError(f"origins and dirs must be [B, H, W, 3], got {tuple(origins.shape)}")
    batch_shape, device = origins.shape[:-1], origins.device
    o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    n_rays = o.shape[0]
    light = ray_lights(light_direction, batch_shape, o)

    t_near, t_far, hit = intersect_sphere(o, d, radius)
    rays = hit.nonzero().squeeze(1)  # [R] indices of the rays that are sampled
    near, far = t_near[rays, None], t_far[rays, None]
    if stratified:
        jitter = draw_uniform((rays.shape[0], n_samples), generator, device)
    else:
        jitter = torch.full((rays.shape[0], n_samples), 0.5, device=device)
    delta = (far - near) / n_samples  # [R, 1] bin length
    t = near + delta * (torch.arange(n_samples, device=device) + jitter)  # [R, S]
    points = (o[rays, None] + d[rays, None] * t[..., None]).reshape(-1, 3)  # [R * S, 3]

    density, albedo = field(points)
    tau = density.view(-1, n_samples) * delta  # [R, S] optical depth of each bin
    transmittance = torch.exp(-(torch.cumsum(tau, dim=1) - tau))
    weights = (1.0 - torch.exp(-tau)) * transmittance  # [R, S]
    normals = normal_fn(points).view(-1, n_samples, 3) if normal_fn is not None else None
    colour = shade(albedo.view(-1, n_samples, 3), normals, light[rays, None], shading, ambient)

    def composite(values: torch.Tensor) -> torch.Tensor:
        """sum_i w_i * values_i over a ray's samples, scattered to all rays: [B, H, W, C]."""
        return _scatter_rays((weights[..., None] * values).sum(1), rays, n_rays).view(*batch_shape, -1)

    opacity = _scatter_rays(weights.sum(1, keepdim=True), rays, n_rays).view(*batch_shape, 1)
    bg = background_images(background, dirs, random_background_prob, generator)
    return VolumeRender(
        rgb=composite(colour) + (1.0 - opacity) * bg,
        opacity=opacity,
        depth=composite(t[..., None]),
        normal=composite(normals) if normals is not None else None,
        weights=_scatter_rays(weights, rays, n_rays).view(*batch_shape, n_samples),
        sample_normals=_scatter_rays(normals, rays, n_rays).view(*batch_shape, n_samples, 3)
        if normals is not None
        else None,
    )


def chunked_field(field: FieldFn, chunk: int, recompute: bool = False) -> FieldFn:
    """``field`` evaluated ``chunk`` points at a time, so no pass holds the activations of every sample at once.

    ``recompute``: with autograd on, each chunk's activations are dropped after its forward and recomputed in the
    backward (``torch.utils.checkpoint``), so a render keeps only each sample's point, density and albedo. One chunk
    or fewer, without recompute, is the plain call."""

    def evaluate(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        recomputed = recompute and torch.is_grad_enabled()
        if len(points) <= chunk and not recomputed:
            return field(points)
        parts = [
            checkpoint(field, part, use_reentrant=False) if recomputed else field(part) for part in points.split(chunk)
        ]
        density, albedo = zip(*parts, strict=True)
        return torch.cat(density), torch.cat(albedo)

    return evaluate


def sparsity_loss(opacity: torch.Tensor) -> torch.Tensor:
    """Mean of ``sqrt(opacity^2 + 0.01)`` over ``opacity: [...]``: a smooth L1 pull towards empty space.

    ProlificDreamer's NeRF stage weights it 10 (threestudio ``prolificdreamer.yaml``); DreamFusion 1.
    """
    return torch.sqrt(opacity.square() + 0.01).mean()


def opacity_entropy_loss(opacity: torch.Tensor) -> torch.Tensor:
    """Mean binary entropy of ``opacity: [...]`` (clamped to [1e-3, 1 - 1e-3]): pushes pixels to 0 or 1.

    threestudio's ``lambda_opaque``; ProlificDreamer and DreamFusion weight it 0 (off).
    """
    o = opacity.clamp(1e-3, 1.0 - 1e-3)
    return -(o * torch.log(o) + (1.0 - o) * torch.log(1.0 - o)).mean()


def orientation_loss(
    weights: torch.Tensor, normals: torch.Tensor, dirs: torch.Tensor, ray_index: torch.Tensor | None = None
) -> torch.Tensor:
    """DreamFusion's orientation loss: ``mean over rays of sum_i stopgrad(w_i) * max(0, n_i . d)^2``.

    Penalises visible normals that face away from the camera (along the ray direction).
    ``weights: [..., S]``, ``normals: [..., S, 3]``, ``dirs: [..., 3]`` (unit, camera to scene).
    DreamFusion's weight rises from 10 to 1000 over the first 5000 steps (threestudio ``dreamfusion-sd.yaml``);
    ProlificDreamer's is 0 (off). Packed samples (``weights: [N]``, ``normals: [N, 3]``) name their ray of the flat
    ``dirs: [..., 3]`` in ``ray_index: [N]``.
    """
    if ray_index is not None:
        flat = dirs.reshape(-1, 3)
        facing_away = (normals * flat[ray_index]).sum(-1).clamp_min(0.0)
        per_ray = flat.new_zeros(len(flat)).index_add(0, ray_index, weights.detach() * facing_away.square())
        return per_ray.mean()
    facing_away = (normals * dirs[..., None, :]).sum(-1).clamp_min(0.0)
    return (weights.detach() * facing_away.square()).sum(-1).mean()
