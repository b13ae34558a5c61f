"""The options `pdray run` and `pdray submit` share, and how they become a RunConfig: one definition for both."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from pdray.config import RunConfig

Prompt = Annotated[str | None, typer.Option(help="Text prompt.")]
Particles = Annotated[int | None, typer.Option(help="Number of particles (3D assets).")]
SetOverrides = Annotated[list[str] | None, typer.Option("--set", help="Override a knob: --set lora.rank=8.")]
Guidance = Annotated[str | None, typer.Option(help="vsd or sds.")]
Cfg = Annotated[float | None, typer.Option(help="Classifier-free guidance scale.")]
Steps = Annotated[int | None, typer.Option(help="Optimisation steps.")]
Seed = Annotated[int | None, typer.Option(help="Random seed.")]
Stages = Annotated[str | None, typer.Option(help="Comma-separated stages to run: nerf or nerf,mesh.")]
Actors = Annotated[int | None, typer.Option(help="Particle actors (default: from placement).")]


def run_config(
    config: str,
    set_: list[str] | None,
    *,
    stages: str | None = None,
    actors: int | None = None,
    address: str | None = None,
    **options: object,
) -> RunConfig:
    """The preset, then --set overrides in order, then the named options (those left out keep the config's value)."""
    from pdray.config import load_config

    ray = {k: v for k, v in {"actors": actors, "address": address}.items() if v is not None}
    extra = {**options, "stages": stages.split(",") if stages else None, "ray": ray or None}
    return load_config(config, set_, extra)
