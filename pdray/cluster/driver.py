"""The Ray executor: wiring only. Each step, ObjectRefs flow from the particle actors into the ScoreActor and
back; the driver fetches small stats dicts, never a tensor: the actors write their own checkpoint shards and
evaluation views into the run folder.

    refs   = [actor.render(step)]                        # RenderOut and moment refs, one per actor
    grads  = score.grads(step, A, *moments, *renders)  (num_returns=A+1)  # a gradient ref per actor, plus stats
    lora   = score.lora_update(step, *refs)              # overlaps the particles' backward pass
    [actor.apply(step, grads[i])]                        # backward + optimiser step

With R ScoreActor replicas (``ray.score_replicas``) replica r scores the actors it serves (the Gaussian particle
score is fitted from per-camera moments: each actor sums its own particles', each replica its actors', and every
replica adds the R sums; no render leaves its group), and each LoRA step is an all-reduce of ObjectRefs
(``lora_grads`` summed per replica and cut in R pieces -> ``lora_reduce`` of piece j on replica j -> ``lora_apply``
of the R sums on every replica): all apply the same summed gradient, so they keep one LoRA, and the driver compares
their digests after every update.

The run loop (``pdray.run.loop``) is shared with the local executor. A dead actor is restarted by Ray
(``ray.max_restarts``) and raises one of ``LOST``; the loop then restores every actor and the LoRA from the last
checkpoint and goes on from that step, so no particle is lost and the step counter never goes back past that
checkpoint. This holds wherever the process dies: mid-step, while a checkpoint is taken, during the final
evaluation, or between two calls (a restarted actor refuses work until it is restored: LostStateError).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pdray.cluster.connect import cluster_resources, connect
from pdray.cluster.lifecycle import LostStateError, actor_runtime_env
from pdray.cluster.particle_actor import ParticleActor
from pdray.cluster.placement import Placement, plan_placement
from pdray.cluster.score_actor import ScoreActor
from pdray.config import RunConfig
from pdray.evaluation.tracking import WandbLabels
from pdray.render.cameras import Cameras
from pdray.run.loop import run_stage

LOST = (RayActorError, LostStateError)  # an actor process died (and may be restarting) or came back empty


class ReplicaDivergence(RuntimeError):
    """The ScoreActor replicas no longer hold one LoRA (their digests differ after an update): the run stops, and
    its last checkpoint (one LoRA) stands."""


def combine_score_stats(stats: list[dict[str, float]], weights: list[int]) -> dict[str, float]:
    """One step's score stats from every replica's (replicas run in parallel: the slowest sets the time)."""
    if len(stats) == 1:
        return stats[0]
    total = sum(weights)
    return {
        "t_min": min(s["t_min"] for s in stats),
        "t_max": max(s["t_max"] for s in stats),
        "t_high": stats[0]["t_high"],
        "grad_norm": sum(s["grad_norm"] * w for s, w in zip(stats, weights, strict=True)) / total,
        **{k: max(s[k] for s in stats) for k in stats[0] if k.startswith("time/")},
    }


def check_one_lora(step: int, updates: list[list[dict]]) -> dict[str, float]:
    """updates[k][r]: replica r's result of LoRA step k. Raises ReplicaDivergence unless every replica reports the
    same digest after every step; returns the mean loss, the final digest (as a 48-bit integer, for the logs) and
    the slowest replica's apply time."""
    for k, results in enumerate(updates):
        digests = [r["lora_digest"] for r in results]
        if len(set(digests)) != 1:
            raise ReplicaDivergence(
                f"step {step}: the ScoreActor replicas hold different LoRAs after LoRA step {k} (digests {digests});"
                " stopping, the last checkpoint stands"
            )
    return {
        "lora_loss": sum(results[0]["lora_loss"] for results in updates) / len(updates),
        "lora_digest": int(updates[-1][0]["lora_digest"][:12], 16),
        "time/lora_apply": sum(max(r["time/lora_apply"] for r in results) for results in updates),
    }


class RayExecutor:
    """Particle actors (k particles each) and R ScoreActor replicas (one by default) in a placement group."""

    name = "ray"
    lost = LOST

    def __init__(self, config: RunConfig, run_dir: Path):
        self.config = config
        connect(config)
        self.placement: Placement = plan_placement(
            cluster_resources(),
            config.particles,
            config.ray.actors,
            config.ray.gpus_per_actor,
            config.ray.score_replicas,
            config.ray.borrow_idle_cpus,
        )
        print(f"placement: {self.placement.describe()}", flush=True)
        self.pg = placement_group(self.placement.bundles, strategy=self.placement.strategy)
        ray.get(self.pg.ready(), timeout=120)
        spec = config.model_dump(mode="json")

        def placed(actor_class, cpus: float, gpus: float, bundle: int):
            """The actor class with its resources, restarts, threads and placement-group bundle."""
            return actor_class.options(
                num_cpus=cpus,
                num_gpus=gpus,
                max_restarts=config.ray.max_restarts,
                runtime_env=actor_runtime_env(cpus),
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundle),
            )

        plan = self.placement
        self.scores = [
            placed(ScoreActor, plan.score_cpus, plan.score_gpus, bundle).remote(spec, plan.score_cpus, plan.grads_cpus)
            for bundle in plan.score_bundles
        ]
        self.actors = [
            placed(ParticleActor, plan.actor_cpus, plan.actor_gpus, bundle).remote(spec, ids, plan.actor_cpus)
            for ids, bundle in zip(plan.actors, plan.actor_bundles, strict=True)
        ]
        try:
            self.locations = self.wait_ready()
        except BaseException:
            self.close()
            raise

    def wait_ready(self) -> dict[str, Any]:
        """Block until every actor has finished __init__ (imports, prior loaded); print which node each runs on."""
        started = time.perf_counter()
        found = ray.get([a.location.remote() for a in [*self.scores, *self.actors]])
        scores, actors = found[: len(self.scores)], found[len(self.scores) :]
        lines = []
        for r, (where, ids) in enumerate(zip(scores, self.placement.replica_particles(), strict=True)):
            lines.append(
                f"  ScoreActor {r} (particles {ids}) on node {where['node_id']} ({where['ip']}, pid {where['pid']})"
            )
        for ids, where in zip(self.placement.actors, actors, strict=True):
            lines.append(f"  particles {ids} on node {where['node_id']} ({where['ip']}, pid {where['pid']})")
        print("actor nodes:\n" + "\n".join(lines), flush=True)
        print(f"actors ready in {time.perf_counter() - started:.1f}s", flush=True)
        return {"score": scores[0], "replicas": scores, "actors": actors}

    def step(self, step: int) -> dict[str, float]:
        outs = [a.render.remote(step) for a in self.actors]
        renders = [o[0] for o in outs]
        fits = self.fit_moments([o[1] for o in outs]) if self.config.fits_all_particles else []
        grads: list = [None] * len(self.actors)
        score_stats = []
        for score, served in zip(self.scores, self.placement.replicas, strict=True):
            args = (len(fits), *fits, *(renders[i] for i in served))  # a replica receives its own renders only
            *mine, stats = score.grads.options(num_returns=len(served) + 1).remote(step, *args)
            for i, ref in zip(served, mine, strict=True):
                grads[i] = ref
            score_stats.append(stats)
        lora = self.lora_update(step, renders)  # overlaps the particles' backward pass
        applies = [a.apply.remote(step, g) for a, g in zip(self.actors, grads, strict=True)]
        results = ray.get([*score_stats, *applies, *(o[2] for o in outs)])
        stats = combine_score_stats(results[: len(self.scores)], [len(p) for p in self.placement.replica_particles()])
        stats |= lora()
        per_actor = results[len(self.scores) :]  # apply stats, then render stats, of every actor
        for key in ("time/backward", "time/render", "time/encode"):
            values = [r[key] for r in per_actor if key in r]
            if values:
                stats[key] = max(values)  # actors run in parallel: the slowest one sets the pace
        stats["nonfinite_dropped"] = sum(r.get("nonfinite_dropped", 0) for r in per_actor)
        # The tensors this step's calls returned (renders and moments, gradients; the LoRA exchange aside).
        score_bytes = sum(r["bytes/grads"] for r in results[: len(self.scores)])
        stats["bytes/step"] = sum(r.get("bytes/render", 0) for r in per_actor) + score_bytes
        stats.pop("bytes/grads", None)
        return stats

    def fit_moments(self, moments: list) -> list:
        """The refs of the per-camera moments every replica fits the Gaussian particle score from: with one replica
        the particle actors' own; with R, each replica's sum over its actors (``ScoreActor.add_moments``, on its
        node), so a replica receives R moment sets, whatever the number of particles."""
        if len(self.scores) == 1:
            return moments
        return [
            score.add_moments.remote(*(moments[i] for i in served))
            for score, served in zip(self.scores, self.placement.replicas, strict=True)
        ]

    def lora_update(self, step: int, renders: list) -> Callable[[], dict[str, float]]:
        """Submit this step's LoRA update; returns the function that waits for it and gives its stats.

        One replica fits the LoRA on every render in one call. R replicas run each LoRA step as an all-reduce
        through the object store (``pdray.vsd.allreduce``): R ``lora_grads`` (each summing its actors' shares, cut in R
        pieces), R ``lora_reduce`` (replica j sums piece j of all) and R ``lora_apply`` (each joins the R sums and
        steps), so each replica fetches 2 (R - 1) / R of the LoRA's size per step, as in a ring all-reduce, whatever
        the number of actors it serves."""
        if len(self.scores) == 1:
            ref = self.scores[0].lora_update.remote(step, *renders)
            return lambda: ray.get(ref)
        if not self.config.trains_lora:
            return dict
        r, updates = len(self.scores), []
        for k in range(self.config.lora.steps_per_update):
            cuts = [
                score.lora_grads.options(num_returns=r + 1).remote(step, k, r, *(renders[i] for i in served))
                for score, served in zip(self.scores, self.placement.replicas, strict=True)
            ]
            sums = [score.lora_reduce.remote(*(pieces[j] for pieces in cuts)) for j, score in enumerate(self.scores)]
            counts = [pieces[r] for pieces in cuts]
            updates.append([score.lora_apply.remote(r, *sums, *counts) for score in self.scores])
        return lambda: check_one_lora(step, [ray.get(refs) for refs in updates])

    def write_checkpoint(self, folder: Path) -> tuple[dict[str, list[int]], str | None]:
        """Every particle actor writes its own shard and replica 0 the LoRA (the replicas hold one LoRA, checked every
        update), in parallel; the driver receives file names only."""
        shards = [a.write_shard.remote(str(folder)) for a in self.actors]
        lora = self.scores[0].write_lora.remote(str(folder))
        written: dict[str, list[int]] = {}
        for part in ray.get(shards):
            written.update(part)
        return written, ray.get(lora)

    def load_checkpoint(self, folder: Path, manifest: dict[str, Any], timeout: float = 1800.0) -> None:
        """Every actor (restarted ones included) reads its own particles from the checkpoint's shards, every replica
        the one LoRA.

        The loads are retried by Ray until a restarting actor is back (its __init__ re-imports torch and
        reloads the prior: seconds on a GPU node, minutes on a busy small CPU); an actor out of restarts
        raises ActorDiedError at once."""
        calls = [a.load_shard.options(max_task_retries=-1).remote(str(folder), manifest) for a in self.actors]
        calls += [s.load_lora.options(max_task_retries=-1).remote(str(folder), manifest) for s in self.scores]
        ray.get(calls, timeout=timeout)

    def write_views(self, run_dir: Path, views: Cameras, turntable: Cameras | None) -> None:
        ray.get([a.write_views.remote(str(run_dir.resolve()), views, turntable) for a in self.actors])

    def report(self) -> dict[str, Any]:
        memory = ray.get([a.memory.remote() for a in [*self.scores, *self.actors]])
        scores, actors = memory[: len(self.scores)], memory[len(self.scores) :]
        names = ["score"] if len(scores) == 1 else [f"score_{r}" for r in range(len(scores))]
        return {
            "actor_memory": {
                **dict(zip(names, scores, strict=True)),
                **{f"particles_{i}": m for i, m in enumerate(actors)},
            },
            "placement": self.placement.as_dict() | {"nodes": self.locations},
        }

    def close(self) -> None:
        for actor in [*self.actors, *self.scores]:
            ray.kill(actor)
        remove_placement_group(self.pg)


def run_ray(
    config: RunConfig, run_dir: Path, resume: bool = False, labels: WandbLabels | None = None
) -> dict[str, Any]:
    """Run (or resume) the NeRF / 2D stage on Ray actors and fill the run folder; returns the summary."""
    return run_stage(config, run_dir, RayExecutor, resume=resume, labels=labels)
