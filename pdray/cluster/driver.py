"""The Ray driver: wiring only. Each step, ObjectRefs flow from the particle actors into the ScoreActor and
back; the driver fetches small stats dicts, never a tensor (checkpoints and final views excepted).

    refs   = [actor.render(step)]                       # RenderOut refs, one per actor
    grads  = score.grads(step, *refs)  (num_returns=A+1) # one gradient ref per actor, plus stats
    lora   = score.lora_update(step, *refs)              # overlaps the particles' backward pass
    [actor.apply(step, grads[i])]                        # backward + optimiser step

A dead actor is restarted by Ray (``ray.max_restarts``); the driver then restores every actor and the LoRA from
the last checkpoint and goes on from that step, so no particle is lost and the step counter never goes back
past that checkpoint. This holds wherever the process dies: mid-step, while a checkpoint is taken, during the
final evaluation, or between two calls (a restarted actor refuses work until it is restored: LostStateError).
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm.auto import tqdm

from pdray.checkpoint import config_digest, load_checkpoint, save_checkpoint
from pdray.cluster.lifecycle import LostStateError, actor_runtime_env
from pdray.cluster.particle_actor import ParticleActor
from pdray.cluster.placement import Placement, Resources, plan_placement
from pdray.cluster.score_actor import ScoreActor
from pdray.config import RunConfig, save_config
from pdray.evaluate import eval_cameras, evaluate_particles
from pdray.tracking import Tracker, run_summary

T = TypeVar("T")
LOST = (RayActorError, LostStateError)  # an actor process died (and may be restarting) or came back empty


def connect(config: RunConfig) -> None:
    """Join the configured cluster, reuse an initialised one, join the cluster running this process as a Ray job
    (RAY_ADDRESS, set by the job supervisor: `pdray submit`), or start a local one (dashboard on loopback).

    ray.init replaces the SIGTERM handler with a plain exit; the caller's (`pdray run`: checkpoint, then exit) is
    put back, so `pdray jobs stop` and a Kubernetes pod's SIGTERM still leave a checkpoint."""
    if ray.is_initialized():
        return
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if config.ray.address:
        ray.init(address=config.ray.address)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        temp = Path(tempfile.gettempdir()) / f"pdray-ray-{os.getuid()}"
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=str(temp))
    if threading.current_thread() is threading.main_thread() and on_sigterm is not None:
        signal.signal(signal.SIGTERM, on_sigterm)


def cluster_resources() -> Resources:
    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    gpus = float(total.get("GPU", 0.0))
    per_gpu = [n.get("CPU", 0.0) / n["GPU"] for n in nodes if n.get("GPU")]
    return Resources(
        cpus=float(total.get("CPU", 0.0)),
        gpus=gpus,
        nodes=max(1, len(nodes)),
        gpus_per_node=gpus / max(1, len(nodes)),
        cpus_per_gpu=min(per_gpu, default=0.0),
        max_node_cpus=max((n.get("CPU", 0.0) for n in nodes), default=0.0),
    )


class RemoteParticles:
    """The particle actors seen as one group: enough of ParticleGroup's interface for evaluation."""

    def __init__(self, actors: list):
        self.actors = actors

    def images(self, cameras) -> dict:
        out: dict = {}
        for part in ray.get([a.images.remote(cameras) for a in self.actors]):
            out.update(part)
        return dict(sorted(out.items()))


class Driver:
    def __init__(self, config: RunConfig, run_dir: Path):
        self.config, self.run_dir = config, run_dir
        connect(config)
        self.placement: Placement = plan_placement(
            cluster_resources(), config.particles, config.ray.actors, config.ray.gpus_per_actor
        )
        print(f"placement: {self.placement.describe()}", flush=True)
        self.pg = placement_group(self.placement.bundles, strategy=self.placement.strategy)
        ray.get(self.pg.ready(), timeout=120)
        spec = config.model_dump(mode="json")
        restarts = config.ray.max_restarts
        self.score = ScoreActor.options(
            num_cpus=self.placement.score_cpus,
            num_gpus=self.placement.score_gpus,
            max_restarts=restarts,
            runtime_env=actor_runtime_env(self.placement.score_cpus),
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=0),
        ).remote(spec, self.placement.score_cpus)
        self.actors = [
            ParticleActor.options(
                num_cpus=self.placement.actor_cpus,
                num_gpus=self.placement.actor_gpus,
                max_restarts=restarts,
                runtime_env=actor_runtime_env(self.placement.actor_cpus),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i + 1),
            ).remote(spec, ids, self.placement.actor_cpus)
            for i, ids in enumerate(self.placement.actors)
        ]
        self.recoveries = 0
        self.locations: dict = {}

    def wait_ready(self) -> float:
        """Block until every actor has finished __init__ (imports, prior loaded); print which node each runs on
        (stored in the summary's placement); returns the seconds waited."""
        started = time.perf_counter()
        score, *actors = ray.get([a.location.remote() for a in [self.score, *self.actors]])
        self.locations = {"score": score, "actors": actors}
        lines = [f"  ScoreActor on node {score['node_id']} ({score['ip']}, pid {score['pid']})"]
        for ids, where in zip(self.placement.actors, actors, strict=True):
            lines.append(f"  particles {ids} on node {where['node_id']} ({where['ip']}, pid {where['pid']})")
        print("actor nodes:\n" + "\n".join(lines), flush=True)
        return time.perf_counter() - started

    def step(self, step: int) -> dict[str, float]:
        outs = [a.render.remote(step) for a in self.actors]
        renders = [o[0] for o in outs]
        *grads, score_stats = self.score.grads.options(num_returns=len(self.actors) + 1).remote(step, *renders)
        lora = self.score.lora_update.remote(step, *renders)
        applies = [a.apply.remote(step, g) for a, g in zip(self.actors, grads, strict=True)]
        results = ray.get([score_stats, lora, *applies, *(o[1] for o in outs)])
        stats = {**results[0], **results[1]}
        per_actor = results[2:]
        for key in ("time/backward", "time/render", "time/encode"):
            values = [r[key] for r in per_actor if key in r]
            if values:
                stats[key] = max(values)  # actors run in parallel: the slowest one sets the pace
        stats["nonfinite_dropped"] = sum(r.get("nonfinite_dropped", 0) for r in per_actor)
        return stats

    def checkpoint(self, step: int) -> None:
        particles: dict = {}
        for part in ray.get([a.state_tensors.remote() for a in self.actors]):
            particles.update(part)
        tensors = {"particles": particles}
        lora = ray.get(self.score.state_tensors.remote())
        if lora:
            tensors["lora"] = lora
        save_checkpoint(
            self.run_dir, step, tensors, {"config_digest": config_digest(self.config), "recoveries": self.recoveries}
        )

    def restore(self, timeout: float = 1800.0) -> int:
        """Load the last checkpoint into every actor (restarted ones included); returns its step.

        The loads are retried by Ray until a restarting actor is back (its __init__ re-imports torch and
        reloads the prior: seconds on a GPU node, minutes on a busy small CPU); an actor out of restarts
        raises ActorDiedError at once."""
        info, tensors = load_checkpoint(self.run_dir)
        calls = []
        for actor, ids in zip(self.actors, self.placement.actors, strict=True):
            prefixes = tuple(f"{pid:04d}." for pid in ids)
            mine = {k: v for k, v in tensors["particles"].items() if k.startswith(prefixes)}
            calls.append(actor.load_state_tensors.options(max_task_retries=-1).remote(mine))
        calls.append(self.score.load_state_tensors.options(max_task_retries=-1).remote(tensors.get("lora", {})))
        ray.get(calls, timeout=timeout)
        return int(info["step"])

    def recover(self, err: Exception, where: str) -> int:
        """After an actor was lost: count it, restore the last checkpoint everywhere, return its step."""
        if getattr(err, "actor_init_failed", False):
            raise err  # a bug or a bad config, not a lost process: restarting cannot help
        self.recoveries += 1
        tqdm.write(f"{where}: an actor was lost ({err.__class__.__name__}); restoring the last checkpoint")
        return self.restore()

    def recovering(self, where: str, fn: Callable[[], T], attempts: int = 3) -> T:
        """fn() on the actors' current state (already checkpointed); after a lost actor, restore and retry."""
        for attempt in range(attempts):
            try:
                return fn()
            except LOST as err:
                if attempt == attempts - 1:
                    raise
                self.recover(err, where)
        raise AssertionError("unreachable")

    def close(self) -> None:
        for actor in [*self.actors, self.score]:
            ray.kill(actor)
        remove_placement_group(self.pg)


def run_ray(config: RunConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the NeRF / 2D stage on Ray actors and fill the run folder; returns the summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    created = time.perf_counter()
    driver = Driver(config, run_dir)
    try:
        driver.wait_ready()
        startup = time.perf_counter() - created
        print(f"actors ready in {startup:.1f}s", flush=True)
        if resume:
            step = driver.restore()
        else:
            step = 0
            driver.checkpoint(0)  # recovery always has a checkpoint to go back to
        tracker = Tracker(run_dir, config, resume=resume)
        started, totals = time.perf_counter(), {}
        bar = tqdm(total=config.steps, initial=step, desc=f"{config.guidance} x{config.particles} (ray)", unit="step")
        executed = 0
        try:
            while True:
                try:
                    if step < config.steps:
                        stats = driver.step(step)
                        step += 1
                        executed += 1
                        bar.update(1)
                        for k, v in stats.items():
                            if k.startswith("time/"):
                                totals[k] = totals.get(k, 0.0) + v
                        if step % config.log_every == 0 or step == config.steps:
                            tracker.log(step, {**stats, "recoveries": driver.recoveries})
                            bar.set_postfix({k: f"{stats[k]:.3g}" for k in ("lora_loss", "grad_norm") if k in stats})
                    if step % config.checkpoint_every == 0 or step >= config.steps:
                        driver.checkpoint(step)
                    if step >= config.steps:
                        break
                except LOST as err:
                    step = driver.recover(err, f"step {step}")
                    bar.n = step
                    bar.refresh()
        except KeyboardInterrupt:
            driver.checkpoint(step)
            tracker.finish()
            print(f"\ninterrupted at step {step}: checkpoint saved; continue with `pdray resume {run_dir}`")
            raise
        bar.close()
        wall = time.perf_counter() - started
        summary = run_summary(config, "ray", wall, executed, totals)  # redone steps count: they took the time
        everyone = [driver.score, *driver.actors]
        memory = driver.recovering("memory report", lambda: ray.get([a.memory.remote() for a in everyone]))
        summary["actor_memory"] = {"score": memory[0], **{f"particles_{i}": m for i, m in enumerate(memory[1:])}}
        group = RemoteParticles(driver.actors)
        summary |= driver.recovering("evaluation", lambda: evaluate_particles(config, group, run_dir))
        views = eval_cameras(config, 4 if config.particle == "nerf" else 1)
        tracker.log_particles(config.steps, driver.recovering("evaluation", lambda: group.images(views)))
        placement = driver.placement.as_dict() | {"nodes": driver.locations}
        summary |= {"recoveries": driver.recoveries, "placement": placement, "startup_s": startup}
        tracker.summary(summary)
        tracker.finish()
        return summary
    finally:
        driver.close()
