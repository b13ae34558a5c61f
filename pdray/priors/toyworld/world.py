"""The procedural toy world: coloured objects rendered by sphere tracing signed distance functions.

Every object sits at the origin inside a sphere of radius 0.5, front facing +x, z up (the conventions
of ``pdray.render.cameras``). Three shapes look different from the front, side and back (mug: handle on its
right; chair: backrest at its back; house: door at its front), so view-dependent prompts matter.
Shading is ambient + Lambertian from the world's fixed light, on a white background.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdray.render.cameras import CameraRanges, Cameras, camera_rays, fixed_light_direction, sample_cameras

SHAPES = ("sphere", "cube", "cone", "cylinder", "torus", "mug", "chair", "house")
ASYMMETRIC_SHAPES = ("mug", "chair", "house")
COLOURS = {
    "red": (0.85, 0.12, 0.10),
    "green": (0.13, 0.68, 0.20),
    "blue": (0.12, 0.28, 0.88),
    "yellow": (0.95, 0.85, 0.12),
    "purple": (0.55, 0.18, 0.75),
    "orange": (0.98, 0.50, 0.08),
}
COLOUR_NAMES = tuple(COLOURS)
VIEWS = ("front", "side", "back")  # overhead never occurs in the default camera ranges
BACKGROUND = 1.0
AMBIENT = 0.45


def _box(p: torch.Tensor, centre: tuple[float, float, float], half: tuple[float, float, float]) -> torch.Tensor:
    q = (p - p.new_tensor(centre)).abs() - p.new_tensor(half)
    return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)


def _cylinder_z(p: torch.Tensor, radius: float, half_height: float, z0: float = 0.0) -> torch.Tensor:
    d = torch.stack([p[..., :2].norm(dim=-1) - radius, (p[..., 2] - z0).abs() - half_height], dim=-1)
    return d.clamp(min=0).norm(dim=-1) + d.max(dim=-1).values.clamp(max=0)


def _torus(p: torch.Tensor, major: float, minor: float) -> torch.Tensor:
    q = torch.stack([p[..., :2].norm(dim=-1) - major, p[..., 2]], dim=-1)
    return q.norm(dim=-1) - minor


def _cone(p: torch.Tensor, radius: float, half_height: float) -> torch.Tensor:
    """A cone with its apex up, base at z = -half_height (exact SDF of a capped cone, rb=radius, rt=0)."""
    q = torch.stack([p[..., :2].norm(dim=-1), p[..., 2]], dim=-1)
    k1 = q.new_tensor([0.0, half_height])
    k2 = q.new_tensor([-radius, 2 * half_height])
    ca = torch.stack(
        [q[..., 0] - torch.minimum(q[..., 0], torch.where(q[..., 1] < 0, radius, 0.0)), q[..., 1].abs() - half_height],
        dim=-1,
    )
    t = (((k1 - q) * k2).sum(-1) / (k2 * k2).sum()).clamp(0.0, 1.0)
    cb = q - k1 + k2 * t[..., None]
    s = torch.where((cb[..., 0] < 0) & (ca[..., 1] < 0), -1.0, 1.0)
    return s * torch.minimum((ca * ca).sum(-1), (cb * cb).sum(-1)).sqrt()


def _house_roof(p: torch.Tensor) -> torch.Tensor:
    """A triangular prism roof, ridge along y, sitting on the house body."""
    half_width, base_z, height, half_len = 0.36, 0.12, 0.26, 0.34
    x, z = p[..., 0].abs(), p[..., 2] - base_z
    # The slanted face: distance to the plane through (half_width, 0) and (0, height), inwards negative.
    n = torch.tensor([height, half_width]) / (height**2 + half_width**2) ** 0.5
    slope = x * n[0] + z * n[1] - half_width * n[0]
    d2 = torch.stack([slope, -z, p[..., 1].abs() - half_len], dim=-1)
    return d2.max(dim=-1).values


def shape_sdf(shape: str, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed distance of points p [N, 3] to one shape, and an albedo multiplier [N] (door, handle...)."""
    ones = torch.ones(p.shape[:-1], device=p.device)
    if shape == "sphere":
        return p.norm(dim=-1) - 0.42, ones
    if shape == "cube":
        return _box(p, (0, 0, 0), (0.31, 0.31, 0.31)), ones
    if shape == "cone":
        return _cone(p, 0.38, 0.4), ones
    if shape == "cylinder":
        return _cylinder_z(p, 0.3, 0.38), ones
    if shape == "torus":
        return _torus(p, 0.3, 0.12), ones
    if shape == "mug":
        outer = _cylinder_z(p, 0.27, 0.3)
        inner = _cylinder_z(p, 0.23, 0.3, z0=0.06)
        body = torch.maximum(outer, -inner)
        hp = p - p.new_tensor([0.0, 0.3, 0.0])  # handle: a torus in the yz plane on the mug's right (+y)
        hq = torch.stack([torch.stack([hp[..., 1], hp[..., 2]], -1).norm(dim=-1) - 0.14, hp[..., 0]], -1)
        handle = torch.maximum(hq.norm(dim=-1) - 0.045, 0.26 - p[..., 1])
        return torch.minimum(body, handle), ones
    if shape == "chair":
        seat = _box(p, (0, 0, -0.02), (0.25, 0.25, 0.04))
        back = _box(p, (-0.22, 0, 0.24), (0.03, 0.25, 0.24))
        legs = (
            torch.stack(
                [_box(p, (sx * 0.21, sy * 0.21, -0.26), (0.035, 0.035, 0.21)) for sx in (-1, 1) for sy in (-1, 1)], -1
            )
            .min(-1)
            .values
        )
        return torch.minimum(torch.minimum(seat, back), legs), ones
    if shape == "house":
        body = _box(p, (0, 0, -0.14), (0.3, 0.3, 0.26))
        d = torch.minimum(body, _house_roof(p))
        door = (p[..., 0] > 0.27) & (p[..., 1].abs() < 0.09) & (p[..., 2] < 0.0)
        return d, torch.where(door, 0.25, 1.0)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


@dataclass
class WorldBatch:
    """Rendered images [B, 3, H, W] in [0, 1] with their labels."""

    images: torch.Tensor
    shapes: torch.Tensor  # [B] index into SHAPES
    colours: torch.Tensor  # [B] index into COLOUR_NAMES
    views: torch.Tensor  # [B] index into VIEWS
    cameras: Cameras


def render_objects(
    shapes: torch.Tensor,
    colours: torch.Tensor,
    cameras: Cameras,
    resolution: int = 32,
    supersample: int = 2,
    scales: torch.Tensor | None = None,
    colour_jitter: torch.Tensor | None = None,
    iterations: int = 40,
) -> torch.Tensor:
    """Sphere-trace one object per camera; returns images [B, 3, resolution, resolution] in [0, 1]."""
    device = cameras.elevation.device
    b = len(cameras)
    res = resolution * supersample
    origins, dirs = camera_rays(cameras, res)
    origins, dirs = origins.reshape(b, -1, 3), dirs.reshape(b, -1, 3)
    scales = torch.ones(b, device=device) if scales is None else scales
    albedo = torch.tensor([COLOURS[c] for c in COLOUR_NAMES], device=device)[colours]  # [B, 3]
    if colour_jitter is not None:
        albedo = (albedo + colour_jitter).clamp(0, 1)
    light = fixed_light_direction().to(device)
    image = torch.full((b, res * res, 3), BACKGROUND, device=device)
    for shape_index in shapes.unique().tolist():
        sel = (shapes == shape_index).nonzero().squeeze(1)
        o, d, s = origins[sel], dirs[sel], scales[sel][:, None, None]
        name = SHAPES[shape_index]

        def sdf(p: torch.Tensor, name: str = name, s: torch.Tensor = s) -> tuple[torch.Tensor, torch.Tensor]:
            dist, mult = shape_sdf(name, (p / s).reshape(-1, 3))
            return dist.reshape(p.shape[:-1]) * s[..., 0], mult.reshape(p.shape[:-1])

        t = (cameras.distance[sel][:, None] - 0.6).clamp(min=0.05).expand(-1, o.shape[1]).clone()
        for _ in range(iterations):
            dist, _ = sdf(o + t[..., None] * d)
            t = t + 0.9 * dist
        p = o + t[..., None] * d
        dist, mult = sdf(p)
        hit = dist.abs() < 2e-3
        eps = 1e-3
        offsets = torch.eye(3, device=device) * eps
        normal = torch.stack([sdf(p + offsets[i])[0] - sdf(p - offsets[i])[0] for i in range(3)], dim=-1)
        normal = F.normalize(normal, dim=-1)
        lambert = (normal @ light).clamp(min=0)
        shade = AMBIENT + (1 - AMBIENT) * lambert
        colour = albedo[sel][:, None, :] * (shade * mult)[..., None]
        image[sel] = torch.where(hit[..., None], colour, image[sel])
    image = image.reshape(b, res, res, 3).permute(0, 3, 1, 2)
    return F.avg_pool2d(image, supersample) if supersample > 1 else image


def object_jitter(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The world's per-object variation: sizes [n] in [0.9, 1.1] and albedo offsets [n, 3] in [-0.06, 0.06]."""
    scales = 0.9 + 0.2 * torch.rand(n, generator=generator)
    return scales, 0.06 * (torch.rand(n, 3, generator=generator) * 2 - 1)


def sample_world(
    n: int,
    generator: torch.Generator,
    resolution: int = 32,
    ranges: CameraRanges | None = None,
    device: torch.device | str = "cpu",
    supersample: int = 2,
) -> WorldBatch:
    """n random objects (uniform shape and colour, small size and colour jitter) from random default cameras."""
    shapes = torch.randint(len(SHAPES), (n,), generator=generator)
    colours = torch.randint(len(COLOUR_NAMES), (n,), generator=generator)
    cameras = sample_cameras(n, ranges or CameraRanges(), generator)
    scales, jitter = object_jitter(n, generator)
    views = torch.tensor([VIEWS.index(v) if v in VIEWS else 0 for v in cameras.view_labels()])
    images = render_objects(
        shapes.to(device),
        colours.to(device),
        cameras.to(device),
        resolution,
        supersample,
        scales.to(device),
        jitter.to(device),
    )
    return WorldBatch(images, shapes.to(device), colours.to(device), views.to(device), cameras.to(device))
