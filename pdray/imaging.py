"""Image files: tensors in [0, 1] to uint8 PNGs and GIFs, written atomically (write, then rename)."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] or [N, 3, H, W] float in [0, 1] -> uint8 [H, W, 3] or [N, H, W, 3]."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return array.movedim(-3, -1).numpy()


def save_png(image: torch.Tensor, path: Path) -> None:
    """image [3, H, W] in [0, 1]."""
    _atomic_write(path, iio.imwrite("<bytes>", to_uint8(image), extension=".png"))


def save_gif(frames: torch.Tensor, path: Path, fps: int = 12) -> None:
    """frames [N, 3, H, W] in [0, 1]: a looping GIF."""
    _atomic_write(path, iio.imwrite("<bytes>", to_uint8(frames), extension=".gif", duration=1000 / fps, loop=0))


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
