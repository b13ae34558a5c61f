"""`pdray submit` and `pdray jobs status|logs|stop`: `pdray run` as a Ray job. Registered in cli/main.py.

The logic (config file, runtime_env, token, errors) lives in pdray.cluster.submit; these commands parse and print.
Bad input and unreachable or refusing clusters print one line and exit with code 2.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer
from pdray.cli import options
from pdray.cli.errors import clean_errors

jobs_app = typer.Typer(help="Follow, inspect and stop jobs sent by `pdray submit`.", no_args_is_help=True)

Address = Annotated[
    str | None,
    typer.Option(envvar="RAY_API_SERVER_ADDRESS", help="The cluster's dashboard (Jobs API), e.g. http://HEAD:8265."),
]
JobId = Annotated[str, typer.Argument(help="The job id that `pdray submit` printed.")]


def finish(jobs, job_id: str) -> None:
    """Stream the job's logs to stdout and exit 0 if it SUCCEEDED, 1 otherwise."""
    status = jobs.follow(job_id, lambda lines: typer.echo(lines, nl=False))
    typer.echo(f"job {job_id}: {status}", err=True)
    if status != "SUCCEEDED":
        raise typer.Exit(code=1)


@clean_errors
def submit(
    out: Annotated[
        str, typer.Option(help="Run folder on the cluster: an absolute path its nodes can write (a shared filesystem).")
    ],
    address: Address = None,
    prompt: options.Prompt = None,
    particles: options.Particles = None,
    config: Annotated[str, typer.Option("--config", help="Preset name or YAML path (read here).")] = "default",
    set_: options.SetOverrides = None,
    guidance: options.Guidance = None,
    cfg: options.Cfg = None,
    steps: options.Steps = None,
    seed: options.Seed = None,
    stages: options.Stages = None,
    executor: Annotated[str | None, typer.Option(help="ray (actors on the cluster) or local (one process).")] = None,
    wandb: Annotated[str | None, typer.Option(help="offline, online (WANDB_API_KEY on the cluster) or off.")] = None,
    actors: options.Actors = None,
    working_dir: Annotated[
        Path | None, typer.Option(help="Ship this pdray checkout; its code replaces the cluster's pdray.")
    ] = None,
    runtime_env: Annotated[
        Path | None, typer.Option(help="YAML runtime_env to merge (env_vars, pip, ...), e.g. deploy/runtime_env.yaml.")
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Stream the logs; exit with the job's outcome.")] = False,
) -> None:
    """Submit `pdray run ...` to a Ray cluster as a Ray job; prints the job id."""
    from pdray.cluster import submit as jobs_api

    run_out = jobs_api.check_out(out)
    run_config = options.run_config(
        config,
        set_,
        prompt=prompt,
        particles=particles,
        guidance=guidance,
        cfg=cfg,
        steps=steps,
        seed=seed,
        stages=stages,
        executor=executor,
        wandb=wandb,
        actors=actors,
    )
    user_env = jobs_api.read_runtime_env(runtime_env) if runtime_env else None
    jobs = jobs_api.Jobs(address)
    with tempfile.TemporaryDirectory(prefix="pdray-job-") as scratch:
        folder = jobs_api.write_job_folder(run_config, Path(scratch) / "job")
        package = jobs_api.package_checkout(working_dir.resolve(), Path(scratch) / "site") if working_dir else None
        job_id = jobs.submit(
            jobs_api.entrypoint(run_out),
            jobs_api.runtime_env(folder, package, user_env),
            {"pdray_out": run_out, "prompt": run_config.prompt},
        )
    typer.echo(job_id)
    if follow:
        finish(jobs, job_id)


@jobs_app.command()
@clean_errors
def status(job_id: JobId, address: Address = None) -> None:
    """Print a job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and Ray's message about it."""
    from pdray.cluster.submit import Jobs

    state, message = Jobs(address).status(job_id)
    typer.echo(f"{state}{': ' + message if message else ''}")


@jobs_app.command()
@clean_errors
def logs(
    job_id: JobId,
    address: Address = None,
    follow: Annotated[bool, typer.Option("--follow", help="Stream until the job ends; exit with its outcome.")] = False,
) -> None:
    """Print a job's logs so far (the output of `pdray run`), or stream them."""
    from pdray.cluster.submit import Jobs

    jobs = Jobs(address)
    if follow:
        finish(jobs, job_id)
    else:
        typer.echo(jobs.logs(job_id), nl=False)


@jobs_app.command()
@clean_errors
def stop(job_id: JobId, address: Address = None) -> None:
    """Stop a job: `pdray run` gets SIGTERM, checkpoints and exits (continue with `pdray resume OUT`)."""
    from pdray.cluster.submit import Jobs

    stopped = Jobs(address).stop(job_id)
    typer.echo(f"job {job_id}: {'stop requested' if stopped else 'already ended'}")
