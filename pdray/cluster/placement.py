"""Placement: from the cluster's resources and the config, which actors exist and where they go.

A pure function of its inputs, so every decision is testable without a cluster. Rules:
- particles are split as evenly as possible over A particle actors (A defaults to one per GPU, or one per
  CPU pair on CPU-only clusters, never more than the particles);
- with at least 2 GPUs the ScoreActor gets a GPU of its own; with one GPU everything shares it (fractions);
- on CPU-only clusters the CPUs are split between the ScoreActor and the particle actors, with at least two particle
  actors: a step is a chain (render, score, backward), so the particle work can use the CPUs the ScoreActor
  leaves idle meanwhile (measured on 2 CPUs, 8 particles: 0.29 s per step with one actor, 0.20 with two; Ray's
  CPUs are logical and not enforced);
- while a ScoreActor computes gradients the particle actors it serves wait for them, so on a one-node CPU-only
  cluster its ``grads`` call runs on their CPUs too (``grads_cpus``; measured on 2 CPUs, the toy UNet's 48-latent
  batch: 0.20 s on one thread, 0.13 s on two);
- particle actors are SPREAD over nodes; the placement group is PACK on one node;
- on several nodes every bundle must fit on one node: a GPU actor asks for no more CPUs than its node has per
  GPU, and a CPU-only ScoreActor for no more than the largest node.

With R > 1 ScoreActor replicas (``ray.score_replicas``) the cluster is cut into R groups, one bundle each, and a
group's replica and the particle actors it serves share that bundle, so a replica sits on the node (and on a
one-GPU group, the GPU) of its particles: its latents and gradients never cross the network.
- GPUs: each group gets G // R whole GPUs (fewer where a group would not fit on one node); in a group of one GPU
  the replica takes half of it and the actors share the rest, in larger groups the replica takes one GPU and
  each actor one of the others;
- CPUs: each group gets an equal share; on CPU-only clusters the replica half of it;
- particle actors (at least R) are split evenly over the groups, particles evenly over the actors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace


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
    score_cpus: float  # per ScoreActor replica
    score_gpus: float  # per ScoreActor replica
    strategy: str
    bundles: list[dict[str, float]] = field(default_factory=list)
    replicas: list[list[int]] = field(default_factory=list)
    """The particle-actor indices each ScoreActor replica serves (default: one replica serving all)."""
    score_bundles: list[int] = field(default_factory=lambda: [0])
    """The bundle of each replica."""
    actor_bundles: list[int] = field(default_factory=list)
    """The bundle of each particle actor (default: bundle 0 the ScoreActor's, then one per actor)."""
    grads_cpus: float = 0.0
    """The CPUs a ScoreActor's ``grads`` call runs on (0: its own), which the particle actors it serves leave idle."""

    def __post_init__(self) -> None:
        if not self.replicas:
            self.replicas = [list(range(len(self.actors)))]
        if not self.actor_bundles:
            self.actor_bundles = [i + 1 for i in range(len(self.actors))]
        if not self.grads_cpus:
            self.grads_cpus = self.score_cpus

    def replica_particles(self) -> list[list[int]]:
        """The particle ids each replica serves."""
        return [[pid for a in served for pid in self.actors[a]] for served in self.replicas]

    def as_dict(self) -> dict:
        out = asdict(self)
        out["replica_particles"] = self.replica_particles()
        return out

    def describe(self) -> str:
        sizes = [len(a) for a in self.actors]
        grads = f", its gradients on {self.grads_cpus:g} CPU" if self.grads_cpus != self.score_cpus else ""
        shards = "; ".join(f"replica {r} serves particles {ids}" for r, ids in enumerate(self.replica_particles()))
        return (
            f"{len(self.actors)} particle actor(s) holding {sizes} particles, each {self.actor_cpus:g} CPU"
            f" / {self.actor_gpus:g} GPU; {len(self.replicas)} ScoreActor replica(s), each {self.score_cpus:g} CPU"
            f" / {self.score_gpus:g} GPU{grads} ({shards}); placement group {self.strategy}"
            f" with {len(self.bundles)} bundles"
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


def floor4(x: float) -> float:
    """Round down to Ray's resource precision (1e-4), so that fractions of one bundle never add up past it."""
    return math.floor(x * 1e4 + 1e-9) / 1e4


def plan_placement(
    resources: Resources,
    particles: int,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    replicas: int = 1,
    borrow_idle_cpus: bool = True,
) -> Placement:
    """Decide actors, their resources and the placement group; raises ValueError when it cannot fit.
    ``borrow_idle_cpus``: the ScoreActor's grads may run on the waiting particle actors' CPUs (``grads_cpus``)."""
    if particles < 1:
        raise ValueError("need at least one particle")
    if replicas > 1:
        plan = plan_replica_groups(resources, particles, actors, gpus_per_actor, replicas)
        return plan if borrow_idle_cpus else replace(plan, grads_cpus=plan.score_cpus)
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
        n = actors or max(min(2, particles), min(particles, int(cpus - score_cpus)))
        per_cpu = (cpus - score_cpus) / min(n, particles)
        if resources.nodes > 1:  # whole CPUs pack into the nodes' leftovers
            per_cpu = max(1.0, float(math.floor(per_cpu)))
    n = min(n, particles)
    borrows = borrow_idle_cpus and not gpus and resources.nodes == 1
    grads_cpus = score_cpus + n * per_cpu if borrows else score_cpus
    if per_gpu and resources.cpus_per_gpu:  # a node's GPU bundles must not ask for more CPUs than it has
        per_cpu = max(1.0, min(per_cpu, float(math.floor(resources.cpus_per_gpu * per_gpu))))
    if per_gpu * n + score_gpus > gpus + 1e-9:
        raise ValueError(f"{n} actors x {per_gpu} GPU + ScoreActor {score_gpus} GPU exceed the cluster's {gpus} GPUs")
    bundles = [{"CPU": score_cpus, **({"GPU": score_gpus} if score_gpus else {})}]
    bundles += [{"CPU": per_cpu, **({"GPU": per_gpu} if per_gpu else {})} for _ in range(n)]
    strategy = "PACK" if resources.nodes == 1 else "SPREAD"
    return Placement(
        split(list(range(particles)), n),
        per_cpu,
        per_gpu,
        score_cpus,
        score_gpus,
        strategy,
        bundles,
        grads_cpus=grads_cpus,
    )


def plan_replica_groups(
    resources: Resources, particles: int, actors: int | None, gpus_per_actor: float | None, replicas: int
) -> Placement:
    """R > 1 ScoreActor replicas: R groups (one bundle each) of a replica and the particle actors it serves."""
    r = replicas
    if particles < r:
        raise ValueError(f"{r} score replicas need at least {r} particles, got {particles}")
    if actors is not None and actors < r:
        raise ValueError(f"{r} score replicas need at least {r} particle actors, got {actors}")
    gpus, cpus = resources.gpus, resources.cpus
    if gpus > 0:
        if gpus < r:
            raise ValueError(f"{r} score replicas need a GPU each; the cluster has {gpus:g}")
        group_gpus = int(gpus // r)
        if resources.gpus_per_node and resources.nodes > 1:  # groups must fit whole on the nodes
            while group_gpus > 1 and resources.nodes * int(resources.gpus_per_node // group_gpus) < r:
                group_gpus -= 1
        score_gpus = 1.0 if group_gpus >= 2 else 0.5
        n = min(particles, max(r, actors or r * max(1, group_gpus - 1)))
        largest = math.ceil(n / r)
        per_gpu = gpus_per_actor if gpus_per_actor is not None else floor4((group_gpus - score_gpus) / largest)
        if score_gpus + largest * per_gpu > group_gpus + 1e-9:
            raise ValueError(
                f"{largest} actors x {per_gpu} GPU + a replica's {score_gpus} GPU exceed a group's {group_gpus} GPUs"
            )
        group_cpus = float(max(1, int(cpus // r)))
        if resources.cpus_per_gpu:
            group_cpus = max(1.0, min(group_cpus, float(math.floor(resources.cpus_per_gpu * group_gpus))))
        score_cpus = 1.0 if group_cpus >= 1 + largest else floor4(group_cpus / (1 + largest))
        per_cpu = floor4((group_cpus - score_cpus) / largest)
        if per_cpu >= 1:
            per_cpu = float(math.floor(per_cpu))
    else:
        group_cpus = cpus / r
        if resources.max_node_cpus:
            group_cpus = min(group_cpus, float(int(resources.max_node_cpus)))
        if resources.nodes > 1:
            group_cpus = float(max(1, math.floor(group_cpus)))
        if group_cpus < 1:
            raise ValueError(f"{r} score replicas on a CPU-only cluster need at least {r} CPUs, has {cpus:g}")
        group_gpus, score_gpus, per_gpu = 0, 0.0, 0.0
        n = min(particles, max(r, actors or int(cpus // 2)))
        largest = math.ceil(n / r)
        score_cpus = floor4(group_cpus / 2)
        per_cpu = floor4((group_cpus - score_cpus) / largest)
    groups = split(list(range(n)), r)
    bundle = {"CPU": group_cpus, **({"GPU": float(group_gpus)} if group_gpus else {})}
    return Placement(
        actors=split(list(range(particles)), n),
        actor_cpus=per_cpu,
        actor_gpus=per_gpu,
        score_cpus=score_cpus,
        score_gpus=score_gpus,
        strategy="PACK" if resources.nodes == 1 else "SPREAD",
        bundles=[dict(bundle) for _ in range(r)],
        replicas=groups,
        score_bundles=list(range(r)),
        actor_bundles=[g for g, members in enumerate(groups) for _ in members],
        grads_cpus=group_cpus if not gpus else score_cpus,  # a group shares one bundle, on one node
    )
