"""The Ray executor: wiring only. Each step, ObjectRefs flow from the particle actors into the ScoreActor and
back; the driver fetches small stats dicts, never a tensor (checkpoints and final views excepted).

    refs   = [actor.render(step)]                       # RenderOut refs, one per actor
    grads  = score.grads(step, *refs)  (num_returns=A+1) # one gradient ref per actor, plus stats
    lora   = score.lora_update(step, *refs)              # overlaps the particles' backward pass
    [actor.apply(step, grads[i])]                        # backward + optimiser step

The run loop (``pdray.run_loop``) is shared with the local executor. A dead actor is restarted by Ray
(``ray.max_restarts``) and raises one of ``LOST``; the loop then restores every actor and the LoRA from the last
checkpoint and goes on from that step, so no particle is lost and the step counter never goes back past that
checkpoint. This holds wherever the process dies: mid-step, while a checkpoint is taken, during the final
evaluation, or between two calls (a restarted actor refuses work until it is restored: LostStateError).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pdray.cameras import Cameras
from pdray.cluster.connect import cluster_resources, connect
from pdray.cluster.lifecycle import LostStateError, actor_runtime_env
from pdray.cluster.particle_actor import ParticleActor
from pdray.cluster.placement import Placement, plan_placement
from pdray.cluster.score_actor import ScoreActor
from pdray.config import RunConfig
from pdray.run_loop import run_stage
from pdray.tracking import WandbLabels

LOST = (RayActorError, LostStateError)  # an actor process died (and may be restarting) or came back empty


class RayExecutor:
    """Particle actors (k particles each) and one ScoreActor in a placement group."""

    name = "ray"
    lost = LOST

    def __init__(self, config: RunConfig, run_dir: Path):
        self.config = config
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
        try:
            self.locations = self.wait_ready()
        except BaseException:
            self.close()
            raise

    def wait_ready(self) -> dict[str, Any]:
        """Block until every actor has finished __init__ (imports, prior loaded); print which node each runs on."""
        started = time.perf_counter()
        score, *actors = ray.get([a.location.remote() for a in [self.score, *self.actors]])
        lines = [f"  ScoreActor on node {score['node_id']} ({score['ip']}, pid {score['pid']})"]
        for ids, where in zip(self.placement.actors, actors, strict=True):
            lines.append(f"  particles {ids} on node {where['node_id']} ({where['ip']}, pid {where['pid']})")
        print("actor nodes:\n" + "\n".join(lines), flush=True)
        print(f"actors ready in {time.perf_counter() - started:.1f}s", flush=True)
        return {"score": score, "actors": actors}

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

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        particles: dict = {}
        for part in ray.get([a.state_tensors.remote() for a in self.actors]):
            particles.update(part)
        lora = ray.get(self.score.state_tensors.remote())
        return {"particles": particles, **({"lora": lora} if lora else {})}

    def load_state_tensors(self, tensors: dict[str, dict[str, torch.Tensor]], timeout: float = 1800.0) -> None:
        """Load a checkpoint into every actor (restarted ones included).

        The loads are retried by Ray until a restarting actor is back (its __init__ re-imports torch and
        reloads the prior: seconds on a GPU node, minutes on a busy small CPU); an actor out of restarts
        raises ActorDiedError at once."""
        calls = []
        for actor, ids in zip(self.actors, self.placement.actors, strict=True):
            prefixes = tuple(f"{pid:04d}." for pid in ids)
            mine = {k: v for k, v in tensors["particles"].items() if k.startswith(prefixes)}
            calls.append(actor.load_state_tensors.options(max_task_retries=-1).remote(mine))
        calls.append(self.score.load_state_tensors.options(max_task_retries=-1).remote(tensors.get("lora", {})))
        ray.get(calls, timeout=timeout)

    def images(self, cameras: Cameras) -> dict[int, torch.Tensor]:
        out: dict = {}
        for part in ray.get([a.images.remote(cameras) for a in self.actors]):
            out.update(part)
        return dict(sorted(out.items()))

    def report(self) -> dict[str, Any]:
        score, *actors = ray.get([a.memory.remote() for a in [self.score, *self.actors]])
        return {
            "actor_memory": {"score": score, **{f"particles_{i}": m for i, m in enumerate(actors)}},
            "placement": self.placement.as_dict() | {"nodes": self.locations},
        }

    def close(self) -> None:
        for actor in [*self.actors, self.score]:
            ray.kill(actor)
        remove_placement_group(self.pg)


def run_ray(
    config: RunConfig, run_dir: Path, resume: bool = False, labels: WandbLabels | None = None
) -> dict[str, Any]:
    """Run (or resume) the NeRF / 2D stage on Ray actors and fill the run folder; returns the summary."""
    return run_stage(config, run_dir, RayExecutor, resume=resume, labels=labels)
