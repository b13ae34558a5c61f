"""The local executor: every particle and the score model in this process, every particle in one batched score
call. It is the reference the Ray executor is measured against, and one step reads top to bottom:

    render every particle -> latents        (ParticleGroup.render)
    score all latents in batched UNet calls  (ScoreEstimator.grads: SDS or VSD)
    fit the LoRA on the same latents         (ScoreEstimator.lora_update, VSD with a LoRA only)
    backpropagate each gradient and step     (ParticleGroup.apply)

The run loop around it (checkpoints, stop, resume, evaluation) is ``pdray.run.loop``, shared with the Ray executor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pdray.config import RunConfig
from pdray.evaluation.tracking import WandbLabels
from pdray.memory import peak_memory
from pdray.priors.diffusion import DiffusionPrior, load_prior
from pdray.render.cameras import Cameras
from pdray.run.loop import run_stage
from pdray.vsd.checkpoint import read_lora, read_particles, write_lora_shard, write_particle_shard
from pdray.vsd.particle import ParticleGroup
from pdray.vsd.score import ScoreEstimator


class LocalExecutor:
    name = "local"
    lost: tuple[type[BaseException], ...] = ()  # one process: nothing is lost that could be restored

    def __init__(self, config: RunConfig, run_dir: Path, prior: DiffusionPrior | None = None):
        """``prior``: one already loaded (benchmarks time several particle counts on one); default: the config's."""
        prior = prior or load_prior(config.prior)
        self.group = ParticleGroup(config, list(range(config.particles)), prior)
        self.score = ScoreEstimator(config, prior)

    def step(self, step: int) -> dict[str, float]:
        render, stats = self.group.render(step)
        grads, score_stats = self.score.grads(step, render)
        return stats | score_stats | self.score.lora_update(step, render) | self.group.apply(step, grads[0])

    def write_checkpoint(self, folder: Path) -> tuple[dict[str, list[int]], str | None]:
        shards = write_particle_shard(folder, self.group.particle_ids, self.group.state_tensors())
        return shards, write_lora_shard(folder, self.score.state_tensors())

    def load_checkpoint(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.group.load_state_tensors(read_particles(folder, manifest, self.group.particle_ids))
        self.score.load_state_tensors(read_lora(folder, manifest))

    def write_views(self, run_dir: Path, views: Cameras, turntable: Cameras | None) -> None:
        self.group.write_views(run_dir, views, turntable)

    def report(self) -> dict[str, Any]:
        """This process's peak memory: host RSS and, on CUDA, the allocator's peak (MB)."""
        memory = peak_memory()
        return {"memory": {"peak_rss_mb": memory["peak_rss_mb"], "peak_gpu_mb": memory["peak_cuda_mb"] or None}}

    def close(self) -> None:
        pass


def run_local(
    config: RunConfig, run_dir: Path, resume: bool = False, labels: WandbLabels | None = None
) -> dict[str, Any]:
    """Run (or resume) the NeRF / 2D stage in this process and fill the run folder; returns the summary."""
    return run_stage(config, run_dir, LocalExecutor, resume=resume, labels=labels)
