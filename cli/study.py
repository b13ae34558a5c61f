"""`pdray study`: a grid of runs on Ray, its table, figures, report and W&B group. Registered in cli/main.py.

Bad input raises ConfigError, which the registering wrapper prints as one line with exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def study(
    out: Annotated[Path, typer.Option(help="Study folder: runs/<cell>/, study.csv, study.json, figures/, report.md.")],
    vary: Annotated[
        list[str], typer.Option(help="A knob and its values, repeatable: --vary cfg=7.5,100 --vary lora.rank=4,8.")
    ],
    prompt: Annotated[str | None, typer.Option(help="Text prompt (default: the config's).")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per grid point: the config's seed, +1, ...")] = 1,
    config: Annotated[str, typer.Option("--config", help="Preset name or YAML path.")] = "default",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a knob in every run: --set steps=600.")
    ] = None,
    wandb: Annotated[str, typer.Option(help="offline, online or off.")] = "offline",
    address: Annotated[str | None, typer.Option(help="Ray cluster to join (default: start a local one).")] = None,
    cpus_per_cell: Annotated[
        float, typer.Option(help="CPUs per run (its torch threads); sets how many run at once.")
    ] = 1.0,
    gpus_per_cell: Annotated[
        float | None, typer.Option(help="GPUs per run (default: 1 if the cluster has GPUs).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip cells whose run already finished.")] = False,
) -> None:
    """Run a grid of runs (e.g. guidance x cfg x particles x seeds) on Ray and write the diversity study."""
    import signal

    from pdray.config import ConfigError
    from pdray.study.grid import StudySpec, parse_vary, run_study

    def stop(signum, frame):  # SIGTERM (`kill`, a scheduler) cleans up like Ctrl-C: cells cancelled, scratch removed
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)

    if cpus_per_cell <= 0 or (gpus_per_cell is not None and gpus_per_cell < 0):
        raise ConfigError("--cpus-per-cell must be > 0 and --gpus-per-cell >= 0")
    spec = StudySpec(
        axes=parse_vary(vary),
        seeds=seeds,
        config=config,
        sets=set_ or [],
        prompt=prompt,
        wandb=wandb,
        address=address,
        cpus_per_cell=cpus_per_cell,
        gpus_per_cell=gpus_per_cell,
    )
    try:
        rows = run_study(spec, out, resume=resume)
    except KeyboardInterrupt:
        typer.echo(f"\ninterrupted: finished cells are kept in {out / 'runs'}; continue with --resume", err=True)
        raise typer.Exit(code=130) from None
    failed = [r["cell"] for r in rows if r["status"] != "done"]
    typer.echo(f"study folder: {out} ({len(rows) - len(failed)} of {len(rows)} runs done; report: {out / 'report.md'})")
    if failed:
        typer.echo(f"failed cells: {', '.join(failed)}", err=True)
        raise typer.Exit(code=1)
