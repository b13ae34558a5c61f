"""Image files: tensors in [0, 1] to uint8 PNGs and GIFs, written atomically (write, then rename)."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from PIL import Image, ImageSequence

from pdray.files import write_bytes


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] or [N, 3, H, W] float in [0, 1] -> uint8 [H, W, 3] or [N, H, W, 3]."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return array.movedim(-3, -1).numpy()


def save_png(image: torch.Tensor, path: Path) -> None:
    """image [3, H, W] in [0, 1]."""
    write_bytes(path, iio.imwrite("<bytes>", to_uint8(image), extension=".png"))


def save_gif(frames: torch.Tensor, path: Path, fps: int = 12) -> None:
    """frames [N, 3, H, W] in [0, 1]: a looping GIF (``load_gif`` reads all N back)."""
    write_bytes(path, iio.imwrite("<bytes>", to_uint8(frames), extension=".gif", duration=1000 / fps, loop=0))


def load_gif(path: Path, fps: int = 12) -> np.ndarray:
    """Every frame ``save_gif(..., fps)`` wrote, uint8 [N, H, W, 3]. Pillow stores a run of identical frames as one
    frame shown for the run's total duration, so each stored frame is repeated duration x fps / 1000 times."""
    frames = []
    with Image.open(path) as gif:
        for frame in ImageSequence.Iterator(gif):
            repeats = max(1, round(frame.info.get("duration", 1000 / fps) * fps / 1000))
            frames += [np.asarray(frame.convert("RGB"))] * repeats
    return np.stack(frames)
