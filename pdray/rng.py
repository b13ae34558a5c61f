"""Every random stream of a run, derived from the run seed alone: one generator per (stage, purpose, particle, step).

Keys have a fixed layout, so two purposes can never share a draw (an ad hoc key such as (seed, step, 0x5C0) could
equal (seed, particle, step) for some particle and step), and a particle's streams depend on its own id only:
adding a particle leaves every other particle's cameras, noise and timesteps unchanged. Nothing is saved for
resume: the stream of step k is a pure function of the keys.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


class Stage(enum.IntEnum):
    """The optimisation a draw belongs to."""

    NERF = 1  # the NeRF (or 2D) stage
    GEOMETRY = 2  # the mesh stage's geometry fine-tuning
    TEXTURE = 3  # the mesh stage's texture fine-tuning


class Purpose(enum.IntEnum):
    """What a draw is for."""

    INIT = 1  # a particle's initial parameters
    CAMERA = 2  # the cameras a particle sees at a step
    RENDER = 3  # ray-marching jitter and random backgrounds
    SCORE = 4  # the score estimator's timesteps and noise
    LORA = 5  # the LoRA's training timesteps, noise and camera dropout
    LORA_INIT = 6  # the LoRA's initial weights
    OCCUPANCY = 7  # the occupancy grid's refresh points


SHARED = None
"""The particle key of a draw all particles share (shared cameras, the LoRA's initial weights)."""


def seed_of(seed: int, stage: Stage, purpose: Purpose, particle: int | None, step: int, *extra: int) -> int:
    """A 63-bit seed for the keys; ``particle`` None is the shared stream (particle ids start at 0)."""
    if particle is not None and particle < 0:
        raise ValueError(f"particle ids are non-negative, got {particle}")
    keys = [seed, int(stage), int(purpose), 0 if particle is None else particle + 1, step, *extra]
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def stream(seed: int, stage: Stage, purpose: Purpose, particle: int | None, step: int, *extra: int) -> torch.Generator:
    """The CPU generator for the keys (draw on the CPU, then move: the same numbers on every device)."""
    return torch.Generator().manual_seed(seed_of(seed, stage, purpose, particle, step, *extra))


@contextmanager
def seeded_global(seed: int, stage: Stage, purpose: Purpose, particle: int | None, step: int = 0) -> Iterator[None]:
    """Seed torch's global generator for code that draws from it (module initialisers, peft) and put the caller's
    global state back afterwards, so building a model never shifts another stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(seed, stage, purpose, particle, step))
        yield
