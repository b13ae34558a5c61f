"""The run loop of the NeRF (or 2D) stage, for every executor: step order, logging, checkpoints, stop and resume.

An executor says where particles and the score model live (one process: ``pdray.run.local_executor``; Ray actors:
``pdray.cluster.driver``); this loop is the only place that decides what happens when:

    restore the last checkpoint (resume) or write step 0's (each holder writes its shard, then the loop the manifest)
    for each step: executor.step(step) -> stats; log every log_every; checkpoint every checkpoint_every, with
        the views, eval.json, report.html and W&B's per-particle table refreshed
    SIGINT / SIGTERM: the step in flight finishes, the state after it is checkpointed under its step, RunStopped
    a lost worker (executor.lost): the last checkpoint is restored everywhere and the loop goes on from its step
    the end: a last checkpoint, evaluation views and judge scores, summary.json

Because every random draw is keyed by (seed, stage, purpose, particle, step) (``pdray.rng``) and the checkpoint
holds every parameter and optimiser moment, a run stopped at any step and resumed ends equal to one never stopped.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tqdm.auto import tqdm

from pdray.config import RunConfig, save_config
from pdray.evaluation.evaluate import evaluate_checkpoint, evaluate_particles, load_views
from pdray.evaluation.tracking import Tracker, WandbLabels, run_summary
from pdray.render.cameras import Cameras
from pdray.vsd.checkpoint import (
    checkpoint_folder,
    checkpoint_step,
    commit_checkpoint,
    config_digest,
    new_checkpoint_folder,
    read_manifest,
)

T = TypeVar("T")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Executor(Protocol):
    """Where the particles and the score model live; the loop drives it."""

    name: str
    lost: tuple[type[BaseException], ...]
    """Failures after which the last checkpoint is restored and the run goes on (a Ray actor's process died)."""

    def step(self, step: int) -> dict[str, float]:
        """One alternating VSD update of every particle (render, score, LoRA, backward); returns its stats."""

    def write_checkpoint(self, folder: Path) -> tuple[dict[str, list[int]], str | None]:
        """Every holder of state writes its own shard into folder: -> ({file: particle ids}, the LoRA's file or
        None). The loop then writes the manifest (``pdray.vsd.checkpoint``)."""

    def load_checkpoint(self, folder: Path, manifest: dict[str, Any]) -> None:
        """Every particle and the LoRA from a checkpoint's shards, each holder reading its own."""

    def write_views(self, run_dir: Path, views: Cameras, turntable: Cameras | None) -> None:
        """Each particle's views.png (and turntable.gif) from the same cameras, written where it lives."""

    def report(self) -> dict[str, Any]:
        """Executor-specific summary fields (placement, memory)."""

    def close(self) -> None: ...


class RunStopped(Exception):
    """The run stopped on a signal after checkpointing a consistent state; ``pdray resume`` continues it."""

    def __init__(self, step: int, run_dir: Path):
        super().__init__(f"stopped at step {step}: checkpoint saved; continue with `pdray resume {run_dir}`")
        self.step, self.run_dir = step, run_dir


class StopSignals:
    """SIGINT / SIGTERM request a stop that the loop honours between steps; a second signal aborts at once
    (KeyboardInterrupt; the last checkpoint written stays valid, as checkpoints are swapped in atomically)."""

    def __init__(self) -> None:
        self.requested: str | None = None

    def request(self, signum: int, frame: object = None) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: stopping after the step in flight (again: abort, no checkpoint)", flush=True)

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Handle the stop signals inside the block (main thread only: Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self.request) for s in STOP_SIGNALS}
        self._installed = True
        try:
            yield self
        finally:
            self._installed = False
            for s, handler in previous.items():
                signal.signal(s, handler)

    def reclaim(self) -> None:
        """Take the stop signals back from libraries that set their own while the run started (Ray's driver and W&B
        may install a SIGTERM handler that just exits)."""
        if getattr(self, "_installed", False):
            for s in STOP_SIGNALS:
                signal.signal(s, self.request)


class Loop:
    """One run of the stage on one executor: the state shared by the steps, checkpoints and recoveries."""

    def __init__(self, config: RunConfig, run_dir: Path, executor: Executor):
        self.config, self.run_dir, self.executor = config, run_dir, executor
        self.recoveries = 0

    def checkpoint(self, step: int) -> None:
        info = {"config_digest": config_digest(self.config), "recoveries": self.recoveries}
        folder = new_checkpoint_folder(self.run_dir, step)
        shards, lora = self.executor.write_checkpoint(folder)
        commit_checkpoint(folder, step, shards, lora, info)

    def restore(self) -> int:
        """Load the last checkpoint into the executor; returns its step."""
        folder = checkpoint_folder(self.run_dir)
        manifest = read_manifest(folder)
        if manifest.get("config_digest") not in (None, config_digest(self.config)) and int(manifest["step"]) > 0:
            tqdm.write("note: the run's config changed since its last checkpoint; going on with the new one")
        self.executor.load_checkpoint(folder, manifest)
        return int(manifest["step"])

    def recover(self, err: BaseException, where: str) -> int:
        """After a lost worker: count it, restore the last checkpoint everywhere, return its step."""
        if getattr(err, "actor_init_failed", False):
            raise err  # a bug or a bad config, not a lost process: restarting cannot help
        self.recoveries += 1
        tqdm.write(f"{where}: a worker was lost ({err.__class__.__name__}); restoring the last checkpoint")
        return self.restore()

    def recovering(self, where: str, fn: Callable[[], T], attempts: int = 3) -> T:
        """fn() on the executor's current (checkpointed) state; after a lost worker, restore and retry."""
        for attempt in range(attempts):
            try:
                return fn()
            except self.executor.lost as err:
                if attempt == attempts - 1:
                    raise
                self.recover(err, where)
        raise AssertionError("unreachable")

    def stop(self, step: int, tracker: Tracker) -> RunStopped:
        """Checkpoint the state after ``step`` steps; if a worker was lost meanwhile, the last checkpoint stands."""
        try:
            self.checkpoint(step)
        except self.executor.lost:
            step = checkpoint_step(self.run_dir)
            tqdm.write(f"a worker was lost while stopping: the checkpoint of step {step} stands")
        tracker.finish()
        return RunStopped(step, self.run_dir)

    def run(self, resume: bool, labels: WandbLabels | None, startup: float, stop: StopSignals) -> dict[str, Any]:
        config, executor = self.config, self.executor
        if resume:
            step = self.recovering("resume", self.restore)
        else:
            step = 0
            self.checkpoint(0)  # recovery always has a checkpoint to go back to
        tracker = Tracker(self.run_dir, config, resume=resume, labels=labels)
        stop.reclaim()
        started, totals, executed = time.perf_counter(), {}, 0
        suffix = "" if executor.name == "local" else f" ({executor.name})"
        bar = tqdm(total=config.steps, initial=step, desc=f"{config.guidance} x{config.particles}{suffix}", unit="step")
        while step < config.steps and stop.requested is None:
            try:
                step_started = time.perf_counter()
                stats = {**executor.step(step), "time/step": time.perf_counter() - step_started}
                step += 1
                if step % config.checkpoint_every == 0 and step < config.steps:
                    self.checkpoint(step)
                    if stop.requested is None:  # a stop should not wait for the views
                        evaluate_checkpoint(config, executor, self.run_dir, step, tracker)  # eval.json, report.html
            except executor.lost as err:
                step = self.recover(err, f"step {step}")
                bar.n = step
                bar.refresh()
                continue
            executed += 1
            bar.update(1)
            for k, v in stats.items():
                if k.startswith("time/"):
                    totals[k] = totals.get(k, 0.0) + v
            if step % config.log_every == 0 or step == config.steps:
                # after a stop signal only to metrics.jsonl: a SIGTERM to the process group may have ended W&B's service
                tracker.log(step, {**stats, "recoveries": self.recoveries}, to_wandb=stop.requested is None)
                bar.set_postfix({k: f"{stats[k]:.3g}" for k in ("lora_loss", "grad_norm") if k in stats})
        bar.close()
        if stop.requested is not None:
            raise self.stop(step, tracker)
        self.recovering("final checkpoint", lambda: self.checkpoint(config.steps))
        wall = time.perf_counter() - started
        summary = run_summary(config, executor.name, wall, executed, totals)  # redone steps count: they took time
        summary |= self.recovering("report", executor.report)
        summary |= self.recovering("evaluation", lambda: evaluate_particles(config, executor, self.run_dir))
        if tracker.wandb is not None:  # the views the executor wrote, from disk
            tracker.log_particles(config.steps, load_views(self.run_dir))
        summary |= {"recoveries": self.recoveries, "startup_s": startup}
        tracker.summary(summary)
        tracker.finish()
        return summary


def run_stage(
    config: RunConfig,
    run_dir: Path,
    make_executor: Callable[[RunConfig, Path], Executor],
    resume: bool = False,
    labels: WandbLabels | None = None,
) -> dict[str, Any]:
    """Run (or resume) the NeRF / 2D stage on the executor ``make_executor`` builds; fills the run folder and
    returns the summary. Raises RunStopped after a stop signal (the checkpoint then holds the last whole step).

    ``labels`` file the W&B run in a group with extra config (a study's cell)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    print(f"{config.particles} particle(s), {config.estimator}", flush=True)
    stop = StopSignals()
    with stop.installed():
        created = time.perf_counter()
        executor = make_executor(config, run_dir)
        try:
            startup = time.perf_counter() - created
            return Loop(config, run_dir, executor).run(resume, labels, startup, stop)
        finally:
            executor.close()
