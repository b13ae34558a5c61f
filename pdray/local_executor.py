"""The local executor: the whole alternating VSD update in one process, every particle in one batched
score call. It is the reference the Ray executor is measured against, and reads top to bottom:

    render every particle -> latents        (ParticleGroup.render)
    score all latents in batched UNet calls  (ScoreEstimator.grads: SDS or VSD)
    fit the LoRA on the same latents         (ScoreEstimator.lora_update, VSD only)
    backpropagate each gradient and step     (ParticleGroup.apply)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pdray.checkpoint import config_digest, load_checkpoint, save_checkpoint
from pdray.config import RunConfig, save_config
from pdray.evaluate import eval_cameras, evaluate_particles
from pdray.particle import ParticleGroup
from pdray.priors.diffusion import load_prior
from pdray.score import ScoreEstimator
from pdray.tracking import Tracker, WandbLabels, run_summary


def run_local(
    config: RunConfig, run_dir: Path, resume: bool = False, labels: WandbLabels | None = None
) -> dict[str, Any]:
    """Run (or resume) the NeRF / 2D stage in this process and fill the run folder; returns the summary.

    ``labels`` file the W&B run in a group with extra config (a study's cell)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    torch.manual_seed(config.seed)
    prior = load_prior(config.prior)
    group = ParticleGroup(config, list(range(config.particles)), prior)
    score = ScoreEstimator(config, prior)
    start = 0
    if resume:
        info, tensors = load_checkpoint(run_dir)
        group.load_state_tensors(tensors["particles"])
        score.load_state_tensors(tensors.get("lora", {}))
        start = int(info["step"])
    tracker = Tracker(run_dir, config, resume=resume, labels=labels)
    started, totals = time.perf_counter(), {}
    step = start
    bar = tqdm(
        range(start, config.steps),
        desc=f"{config.guidance} x{config.particles}",
        unit="step",
        initial=start,
        total=config.steps,
    )
    try:
        for step in bar:
            step_started = time.perf_counter()
            render, stats = group.render(step)
            grads, score_stats = score.grads(step, render)
            stats |= score_stats | score.lora_update(step, render) | group.apply(step, grads[0])
            stats["time/step"] = time.perf_counter() - step_started
            for k, v in stats.items():
                if k.startswith("time/"):
                    totals[k] = totals.get(k, 0.0) + v
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                tracker.log(step + 1, stats)
                bar.set_postfix({k: f"{stats[k]:.3g}" for k in ("lora_loss", "grad_norm") if k in stats})
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                checkpoint(run_dir, step + 1, group, score, config)
        step = config.steps
    except KeyboardInterrupt:
        checkpoint(run_dir, step, group, score, config)
        tracker.finish()
        print(f"\ninterrupted at step {step}: checkpoint saved; continue with `pdray resume {run_dir}`")
        raise
    checkpoint(run_dir, config.steps, group, score, config)
    wall = time.perf_counter() - started
    summary = run_summary(config, "local", wall, config.steps - start, totals)
    summary |= evaluate_particles(config, group, run_dir)
    tracker.log_particles(config.steps, group.images(eval_cameras(config, 4 if config.particle == "nerf" else 1)))
    tracker.summary(summary)
    tracker.finish()
    return summary


def checkpoint(run_dir: Path, step: int, group: ParticleGroup, score: ScoreEstimator, config: RunConfig) -> None:
    tensors = {"particles": group.state_tensors()}
    lora = score.state_tensors()
    if lora:
        tensors["lora"] = lora
    save_checkpoint(run_dir, step, tensors, {"config_digest": config_digest(config)})
