"""The `pdray` command line: parses arguments and calls the library; nothing else lives here.

Heavy libraries (torch, diffusers, ray) are imported inside commands so that `pdray --help` stays fast.
"""

from __future__ import annotations

import importlib
import platform
import sys
from pathlib import Path
from typing import Annotated

import typer
from pdray.cli import options
from pdray.cli.errors import clean_errors, fail

app = typer.Typer(
    help="pdray: diverse text-to-3D with Variational Score Distillation, scaled out with Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
prior_app = typer.Typer(help="Train and inspect diffusion priors.", no_args_is_help=True)
app.add_typer(prior_app, name="prior")


@app.command()
def doctor() -> None:
    """Versions, CUDA devices, the backend each piece would use, and whether the default prior is present."""
    import torch

    from pdray.backends import nerfacc_unavailable_reason
    from pdray.geometry.hashgrid import encoding_backend_name, tcnn_unavailable_reason
    from pdray.priors.diffusion import TOY_MODEL_DIR
    from pdray.render.occupancy import march_backend_name
    from pdray.render.raster import backend_name as raster_backend
    from pdray.render.raster import nvdiffrast_unavailable_reason

    typer.echo(f"python      {platform.python_version()} ({sys.executable})")
    for name in ("pdray", "torch", "diffusers", "transformers", "peft", "ray", "wandb", "trimesh", "xatlas"):
        try:
            version = importlib.import_module(name).__version__
        except Exception as err:  # a broken optional install should not stop the report
            version = f"not importable ({err.__class__.__name__})"
        typer.echo(f"{name:<11} {version}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            typer.echo(f"cuda:{i}      {props.name}, {props.total_memory / 2**30:.1f} GiB")
    else:
        typer.echo("cuda        not available (CPU only)")
    grid = encoding_backend_name("auto")
    reason = tcnn_unavailable_reason()
    typer.echo(f"hash grid   {grid}" + (f" (tinycudann unused: {reason})" if reason else ""))
    raster_reason = nvdiffrast_unavailable_reason()
    typer.echo(
        f"rasteriser  {raster_backend('auto')}" + (f" (nvdiffrast unused: {raster_reason})" if raster_reason else "")
    )
    marcher_reason = nerfacc_unavailable_reason()
    marcher = march_backend_name("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    typer.echo(f"ray marcher {marcher}" + (f" (nerfacc unused: {marcher_reason})" if marcher_reason else ""))
    present = (TOY_MODEL_DIR / "model_index.json").exists()
    typer.echo(f"toy prior   {'present' if present else 'MISSING'} at {TOY_MODEL_DIR}")


@app.command()
@clean_errors
def sample(
    prompt: Annotated[str, typer.Option(help="Text prompt.")],
    out: Annotated[Path, typer.Option(help="Output PNG grid.")],
    n: Annotated[int, typer.Option("-n", "--n", min=1, help="Number of samples.")] = 8,
    model: Annotated[str, typer.Option(help="Prior: toyworld, a hub id or a local folder.")] = "toyworld",
    steps: Annotated[int, typer.Option(min=1, help="DDIM steps.")] = 50,
    cfg: Annotated[float, typer.Option(min=1.0, help="Classifier-free guidance scale.")] = 7.5,
    negative_prompt: Annotated[str, typer.Option(help="Negative prompt.")] = "",
    seed: Annotated[int, typer.Option(min=0, help="Random seed.")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda when available).")] = None,
) -> None:
    """Ancestral (DDIM) samples from a prior into an image grid: the way to check what a prior believes."""
    import torch

    from pdray.imaging import save_png
    from pdray.priors.diffusion import DiffusionPrior
    from pdray.priors.sampling import image_grid, sample_images

    if not prompt.strip():
        fail("--prompt is empty; say what to sample, e.g. --prompt 'a cube'")
    if out.suffix.lower() != ".png":
        fail(f"--out must be a .png file, got {out}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    prior = DiffusionPrior(model, device=device)
    images = sample_images(prior, [prompt] * n, steps=steps, cfg=cfg, negative_prompt=negative_prompt, seed=seed)
    save_png(image_grid(images, columns=min(n, 8)), out)
    typer.echo(f"wrote {out} ({n} samples of {prompt!r}, cfg {cfg}, {steps} DDIM steps, model {model})")


@prior_app.command("train-toy")
@clean_errors
def train_toy(
    out: Annotated[Path, typer.Option(help="Folder to write the prior into (SD format + judge/).")],
    seed: Annotated[int, typer.Option(min=0)] = 0,
    pool_size: Annotated[int, typer.Option(min=16, help="Rendered training images.")] = 20000,
    vae_steps: Annotated[int, typer.Option(min=1)] = 1200,
    unet_steps: Annotated[int, typer.Option(min=1)] = 4500,
    unet_batch_size: Annotated[int, typer.Option(min=1)] = 64,
    unet_lr: Annotated[float, typer.Option(min=0.0)] = 4e-4,
    judge_steps: Annotated[int, typer.Option(min=1)] = 800,
    judge_batch_size: Annotated[int, typer.Option(min=1)] = 64,
    max_minutes: Annotated[float, typer.Option(min=0.1, help="Stop the UNet phase past this wall time.")] = 100.0,
    offset_noise: Annotated[float, typer.Option(min=0.0, help="Std of per-channel offset noise.")] = 0.5,
    save_every_minutes: Annotated[float, typer.Option(min=0.1, help="Write the prior this often.")] = 10.0,
    init_from: Annotated[
        str | None, typer.Option(help="Fine-tune this prior (a folder or 'toyworld'): keeps its VAE and judge.")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    bf16: Annotated[bool, typer.Option(help="bf16 autocast (fast on CUDA; slow on this project's CPU).")] = False,
) -> None:
    """Render the toy world and train its prior (VAE, UNet, text encoder) and judge, or fine-tune one; seeded."""
    import json

    import torch

    from pdray.priors.toyworld.train import ToyTrainConfig, train_toy_prior

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = ToyTrainConfig(
        seed=seed,
        pool_size=pool_size,
        vae_steps=vae_steps,
        unet_steps=unet_steps,
        unet_batch_size=unet_batch_size,
        unet_lr=unet_lr,
        judge_steps=judge_steps,
        judge_batch_size=judge_batch_size,
        max_minutes=max_minutes,
        offset_noise=offset_noise,
        save_every_minutes=save_every_minutes,
        init_from=init_from,
        device=device,
        bf16=bf16,
    )
    report = train_toy_prior(out, cfg)
    typer.echo(json.dumps(report, indent=2))


def default_run_dir(prompt: str) -> Path:
    """runs/<date>-<time>-<prompt-slug>, the slug cut to a safe length."""
    import datetime
    import re

    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "run"
    return Path("runs") / f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{slug}"


@app.command()
@clean_errors
def run(
    prompt: options.Prompt = None,
    particles: options.Particles = None,
    config: Annotated[str, typer.Option("--config", help="Preset name or YAML path.")] = "default",
    set_: options.SetOverrides = None,
    guidance: options.Guidance = None,
    cfg: options.Cfg = None,
    steps: options.Steps = None,
    seed: options.Seed = None,
    stages: options.Stages = None,
    executor: Annotated[str | None, typer.Option(help="local (one process) or ray.")] = None,
    wandb: Annotated[str | None, typer.Option(help="offline, online or off.")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster to join (default: start a local one).")] = None,
    actors: options.Actors = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<date>-<time>-<prompt>).")] = None,
) -> None:
    """Distil a prompt into N diverse 3D particles (NeRF, then meshes) and fill a run folder."""
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
        address=address,
        actors=actors,
    )
    run_dir = out or default_run_dir(run_config.prompt)
    if (run_dir / "checkpoints").exists():
        fail(f"{run_dir} already holds a run; continue it with `pdray resume {run_dir}` or choose another --out")
    _execute(run_config, run_dir, resume=False)


def _execute(run_config, run_dir: Path, resume: bool) -> None:
    """The NeRF stage (skipped on resume once it is complete), then the mesh stage of every particle not yet meshed.

    A stop (Ctrl-C, SIGTERM, `pdray jobs stop`) ends the NeRF stage after the step in flight with a checkpoint of
    it, and the mesh stage at once with the meshes finished so far kept; either way `pdray resume` goes on."""
    import json
    import signal

    import torch

    from pdray.run.loop import RunStopped
    from pdray.run.mesh_stage import meshed_particles

    def stop(signum, frame):  # outside the NeRF stage's loop (which handles it itself) SIGTERM stops like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        if resume and nerf_stage_done(run_config, run_dir):
            typer.echo(f"{run_dir}: the NeRF stage is complete ({run_config.steps} steps)")
        else:
            if run_config.executor == "ray":
                from pdray.cluster.driver import run_ray as run_stage
            else:
                from pdray.run.local_executor import run_local as run_stage
            summary = run_stage(run_config, run_dir, resume=resume)
            typer.echo(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=2))
            typer.echo(f"run folder: {run_dir}")
        if "mesh" in run_config.stages:
            done = meshed_particles(run_dir) if resume else set()
            todo = [pid for pid in range(run_config.particles) if pid not in done]
            if done:
                typer.echo(f"mesh stage: particles {sorted(done)} are already meshed")
            if todo:
                _mesh(run_config, run_dir, todo)
    except RunStopped as stopped:
        typer.echo(f"\n{stopped}", err=True)
        raise typer.Exit(code=130) from None
    except KeyboardInterrupt:
        typer.echo(f"\nstopped; the meshes finished so far are kept: continue with `pdray resume {run_dir}`", err=True)
        raise typer.Exit(code=130) from None


def nerf_stage_done(run_config, run_dir: Path) -> bool:
    """Whether the run folder holds the finished NeRF stage of this config: its last checkpoint and summary."""
    import json

    from pdray.vsd.checkpoint import checkpoint_step

    try:
        step = checkpoint_step(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return step == run_config.steps and summary.get("steps_done") == run_config.steps


def _mesh(run_config, run_dir: Path, particle_ids: list[int]) -> None:
    """The mesh stage of particle_ids: Ray tasks with the Ray executor, else one after another in this process."""
    if run_config.executor == "ray":
        from pdray.cluster.mesh_tasks import run_mesh_ray

        summary = run_mesh_ray(run_config, run_dir, particle_ids)
    else:
        from pdray.run.mesh_stage import run_mesh_local

        summary = run_mesh_local(run_config, run_dir, particle_ids)
    for pid, result in summary["particles"].items():
        typer.echo(
            f"particle {pid}: {result['triangles']} triangles, watertight {result['watertight']}, "
            f"{result['texture_size']}px texture, {result['wall_time_s']:.0f}s -> {result['folder']}"
        )
    for pid, error in summary["failed"].items():
        typer.echo(f"particle {pid}: FAILED {error}", err=True)
    if summary["failed"]:
        raise typer.Exit(code=1)


@app.command()
@clean_errors
def resume(run_dir: Annotated[Path, typer.Argument(help="The run folder to continue.")]) -> None:
    """Continue a run from its last checkpoint with the same particles and seeds."""
    from pdray.config import load_config

    if not (run_dir / "config.yaml").exists():
        fail(f"{run_dir} is not a run folder (no config.yaml)")
    _execute(load_config(str(run_dir / "config.yaml")), run_dir, resume=True)


@app.command()
@clean_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder.")],
    particle: Annotated[int | None, typer.Option(min=0, help="Only this particle (default: all).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override: --set mesh.texture_steps=50.")] = None,
    executor: Annotated[str | None, typer.Option(help="local (one process) or ray (default: the run's).")] = None,
) -> None:
    """Run the mesh stage on a finished run: textured GLB and OBJ meshes into particles/NN/mesh/."""

    import torch

    from pdray.config import load_config
    from pdray.vsd.checkpoint import checkpoint_step

    if not (run_dir / "config.yaml").exists():
        fail(f"{run_dir} is not a run folder (no config.yaml)")
    run_config = load_config(str(run_dir / "config.yaml"), set_, {"executor": executor})
    if run_config.particle != "nerf":
        fail(f"{run_dir} holds 2D image particles; the mesh stage needs NeRF particles")
    if particle is not None and particle >= run_config.particles:
        fail(f"--particle {particle}: the run has particles 0 to {run_config.particles - 1}")
    step = checkpoint_step(run_dir)
    if step < run_config.steps:
        typer.echo(f"warning: the run stopped at step {step} of {run_config.steps}; meshing that checkpoint", err=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    _mesh(run_config, run_dir, [particle] if particle is not None else list(range(run_config.particles)))


from pdray.cli.jobs import jobs_app, submit  # noqa: E402  (the commands live in their own module)

app.command()(submit)
app.add_typer(jobs_app, name="jobs")


from pdray.cli.study import study  # noqa: E402  (the command lives in its own module)

app.command()(clean_errors(study))

from pdray.cli.eval import eval_  # noqa: E402  (the command lives in its own module)

app.command("eval")(clean_errors(eval_))


if __name__ == "__main__":
    app()
