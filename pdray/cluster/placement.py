"""Placement: from the cluster's resources and the config, which actors exist and where they go.

A pure function of its inputs, so every decision is testable without a cluster. Rules:
- particles are split as evenly as possible over A particle actors (A defaults to one per GPU, or one per
  CPU pair on CPU-only clusters, never more than the particles);
- with at least 2 GPUs the ScoreActor gets a GPU of its own; with one GPU everything shares it (fractions);
- on CPU-only clusters the CPUs are split between the ScoreActor and the particle actors;
- particle actors are SPREAD over nodes; the placement group is PACK on one node;
- on several nodes every bundle must fit on one node: a GPU actor asks for no more CPUs than its node has per
  GPU, and a CPU-only ScoreActor for no more than the largest node.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Resources:
    """What the cluster offers: totals, and how many nodes hold them."""

    cpus: float
    gpus: float = 0.0
    nodes: int = 1
    gpus_per_node: float = 0.0
    cpus_per_gpu: float = 0.0
    """The fewest CPUs per GPU on any GPU node (0: unknown): a GPU actor's CPUs must fit beside its GPU."""
    max_node_cpus: float = 0.0
    """The most CPUs on one node (0: unknown): a CPU-only ScoreActor's bundle must fit on one node."""


@dataclass
class Placement:
    actors: list[list[int]]  # particle ids per particle actor
    actor_cpus: float
    actor_gpus: float
    score_cpus: float
    score_gpus: float
    strategy: str
    bundles: list[dict[str, float]] = field(default_factory=list)  # bundle 0: ScoreActor, then one per actor

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        sizes = [len(a) for a in self.actors]
        return (
            f"{len(self.actors)} particle actor(s) holding {sizes} particles, each {self.actor_cpus:g} CPU"
            f" / {self.actor_gpus:g} GPU; ScoreActor {self.score_cpus:g} CPU / {self.score_gpus:g} GPU;"
            f" placement group {self.strategy} with {len(self.bundles)} bundles"
        )


def split(items: list[int], parts: int) -> list[list[int]]:
    """Split items into `parts` contiguous groups whose sizes differ by at most one."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(items[start : start + size])
        start += size
    return out


def plan_placement(
    resources: Resources, particles: int, actors: int | None = None, gpus_per_actor: float | None = None
) -> Placement:
    """Decide actors, their resources and the placement group; raises ValueError when it cannot fit."""
    if particles < 1:
        raise ValueError("need at least one particle")
    gpus, cpus = resources.gpus, resources.cpus
    if gpus >= 2:  # the ScoreActor gets a GPU of its own
        score_gpus, score_cpus = 1.0, 1.0
        n = actors or max(1, min(particles, int((gpus - 1) // (gpus_per_actor or 1.0))))
        per_gpu = gpus_per_actor if gpus_per_actor is not None else min(1.0, (gpus - 1) / n)
        per_cpu = max(1.0, (cpus - score_cpus) // n)
    elif gpus > 0:  # one GPU, shared in fractions
        n = actors or 1
        per_gpu = gpus_per_actor if gpus_per_actor is not None else gpus / 2 / n
        score_gpus, score_cpus = max(0.0, gpus - n * per_gpu), 1.0
        per_cpu = max(1.0, (cpus - score_cpus) // n)
    else:  # CPU only: half the CPUs score, the rest split over the particle actors
        if cpus < 2:
            raise ValueError(f"a CPU-only cluster needs at least 2 CPUs (one for the ScoreActor), has {cpus:g}")
        score_gpus, per_gpu = 0.0, 0.0
        score_cpus = float(max(1, int(cpus // 2)))
        if resources.max_node_cpus:  # one bundle cannot span nodes
            score_cpus = min(score_cpus, float(int(resources.max_node_cpus)))
        n = actors or max(1, min(particles, int(cpus - score_cpus)))
        per_cpu = (cpus - score_cpus) / min(n, particles)
        if resources.nodes > 1:  # whole CPUs pack into the nodes' leftovers
            per_cpu = max(1.0, float(math.floor(per_cpu)))
    n = min(n, particles)
    if per_gpu and resources.cpus_per_gpu:  # a node's GPU bundles must not ask for more CPUs than it has
        per_cpu = max(1.0, min(per_cpu, float(math.floor(resources.cpus_per_gpu * per_gpu))))
    if per_gpu * n + score_gpus > gpus + 1e-9:
        raise ValueError(f"{n} actors x {per_gpu} GPU + ScoreActor {score_gpus} GPU exceed the cluster's {gpus} GPUs")
    bundles = [{"CPU": score_cpus, **({"GPU": score_gpus} if score_gpus else {})}]
    bundles += [{"CPU": per_cpu, **({"GPU": per_gpu} if per_gpu else {})} for _ in range(n)]
    strategy = "PACK" if resources.nodes == 1 else "SPREAD"
    return Placement(split(list(range(particles)), n), per_cpu, per_gpu, score_cpus, score_gpus, strategy, bundles)
