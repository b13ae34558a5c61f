"""Camera sampling, poses, rays and view labels — one definition shared by the toy world and distillation.

Conventions (those of threestudio / ProlificDreamer):
- world is z-up; the object sits at the origin and its *front* faces +x;
- a camera at elevation ``el`` and azimuth ``az`` (degrees) and distance ``d`` sits at
  ``d * (cos el cos az, cos el sin az, sin el)`` and looks at the origin; azimuth 0 sees the front;
- camera-to-world matrices ``c2w: [B, 4, 4]`` use the OpenGL camera frame (x right, y up, looking down -z);
- ``fov`` is the vertical field of view in degrees; images are square.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VIEW_LABELS = ("front", "side", "back", "overhead")


@dataclass(frozen=True)
class CameraRanges:
    """Ranges cameras are drawn from uniformly (degrees, world units)."""

    elevation: tuple[float, float] = (-10.0, 45.0)
    azimuth: tuple[float, float] = (-180.0, 180.0)
    distance: tuple[float, float] = (1.3, 1.7)
    fov: tuple[float, float] = (40.0, 50.0)


@dataclass
class Cameras:
    """A batch of cameras. All tensors have leading dimension B."""

    elevation: torch.Tensor  # [B] degrees
    azimuth: torch.Tensor  # [B] degrees, in [-180, 180)
    distance: torch.Tensor  # [B]
    fov: torch.Tensor  # [B] vertical, degrees

    def __len__(self) -> int:
        return self.elevation.shape[0]

    def to(self, device: torch.device | str) -> Cameras:
        return Cameras(*(getattr(self, k).to(device) for k in ("elevation", "azimuth", "distance", "fov")))

    def index(self, idx: slice | torch.Tensor | list[int]) -> Cameras:
        return Cameras(self.elevation[idx], self.azimuth[idx], self.distance[idx], self.fov[idx])

    @staticmethod
    def cat(cams: list[Cameras]) -> Cameras:
        return Cameras(*(torch.cat([getattr(c, k) for c in cams]) for k in ("elevation", "azimuth", "distance", "fov")))

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"elevation": self.elevation, "azimuth": self.azimuth, "distance": self.distance, "fov": self.fov}

    @property
    def positions(self) -> torch.Tensor:
        """Camera centres in world space, [B, 3]."""
        el, az = torch.deg2rad(self.elevation), torch.deg2rad(self.azimuth)
        return self.distance[:, None] * torch.stack(
            [torch.cos(el) * torch.cos(az), torch.cos(el) * torch.sin(az), torch.sin(el)], dim=-1
        )

    def c2w(self) -> torch.Tensor:
        """Camera-to-world matrices [B, 4, 4] (OpenGL frame: camera looks down its -z axis)."""
        eye = self.positions
        forward = torch.nn.functional.normalize(-eye, dim=-1)
        up_world = torch.tensor([0.0, 0.0, 1.0], device=eye.device, dtype=eye.dtype).expand_as(eye)
        right = torch.linalg.cross(forward, up_world)
        # Straight up or down: any right vector will do; pick the one of azimuth 0.
        degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
        right = torch.where(degenerate, torch.tensor([0.0, 1.0, 0.0], device=eye.device, dtype=eye.dtype), right)
        right = torch.nn.functional.normalize(right, dim=-1)
        up = torch.linalg.cross(right, forward)
        c2w = torch.zeros(eye.shape[0], 4, 4, device=eye.device, dtype=eye.dtype)
        c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, up, -forward, eye
        c2w[:, 3, 3] = 1.0
        return c2w

    def view_labels(self, front_threshold: float = 45.0, overhead_threshold: float = 60.0) -> list[str]:
        """The prompt suffix label of each camera: front / side / back / overhead (as in DreamFusion)."""
        labels = []
        for el, az in zip(self.elevation.tolist(), self.azimuth.tolist(), strict=True):
            az = (az + 180.0) % 360.0 - 180.0
            if el > overhead_threshold:
                labels.append("overhead")
            elif abs(az) < front_threshold:
                labels.append("front")
            elif abs(az) > 180.0 - front_threshold:
                labels.append("back")
            else:
                labels.append("side")
        return labels


def sample_cameras(n: int, ranges: CameraRanges | None = None, generator: torch.Generator | None = None) -> Cameras:
    """Draw n cameras uniformly from the ranges; the same generator state gives the same cameras."""
    ranges = ranges or CameraRanges()

    def uniform(lo_hi: tuple[float, float]) -> torch.Tensor:
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    azimuth = (uniform(ranges.azimuth) + 180.0) % 360.0 - 180.0
    return Cameras(uniform(ranges.elevation), azimuth, uniform(ranges.distance), uniform(ranges.fov))


def orbit_cameras(n: int, elevation: float = 15.0, distance: float = 1.5, fov: float = 45.0) -> Cameras:
    """n cameras evenly spaced in azimuth, starting at the front: evaluation views and turntables."""
    azimuth = torch.arange(n, dtype=torch.float32) * (360.0 / n)
    azimuth = (azimuth + 180.0) % 360.0 - 180.0
    full = torch.full((n,), 1.0)
    return Cameras(full * elevation, azimuth, full * distance, full * fov)


def camera_rays(cameras: Cameras, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origins and unit directions in world space, each [B, H, W, 3], through pixel centres.

    Row 0 is the top of the image.
    """
    device = cameras.elevation.device
    c2w = cameras.c2w()
    half = torch.tan(torch.deg2rad(cameras.fov) / 2.0)  # [B]
    coords = (torch.arange(resolution, device=device, dtype=torch.float32) + 0.5) / resolution * 2.0 - 1.0
    ys, xs = torch.meshgrid(-coords, coords, indexing="ij")  # top row has y = +1
    dirs_cam = torch.stack(
        [
            xs[None] * half[:, None, None],
            ys[None] * half[:, None, None],
            -torch.ones_like(xs)[None].expand(len(cameras), -1, -1),
        ],
        dim=-1,
    )  # [B, H, W, 3]
    dirs = torch.einsum("bij,bhwj->bhwi", c2w[:, :3, :3], dirs_cam)
    dirs = torch.nn.functional.normalize(dirs, dim=-1)
    origins = c2w[:, None, None, :3, 3].expand_as(dirs)
    return origins, dirs


def camera_embedding(cameras: Cameras) -> torch.Tensor:
    """The LoRA's camera condition: the flattened camera-to-world matrix, [B, 16]."""
    return cameras.c2w().reshape(len(cameras), 16)


def fixed_light_direction() -> torch.Tensor:
    """The world's single directional light (unit vector towards the light): above, front-left."""
    return torch.nn.functional.normalize(torch.tensor([0.5, 0.3, 0.8]), dim=0)
