import pytest

from pdray.cluster.placement import Resources, plan_placement, split


def test_split_is_even():
    assert split(list(range(8)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert split([0, 1], 2) == [[0], [1]]


def test_cpu_only_splits_the_cpus():
    p = plan_placement(Resources(cpus=2), particles=2, actors=2)
    assert p.actors == [[0], [1]] and p.score_cpus == 1 and p.actor_cpus == 0.5 and p.actor_gpus == 0
    assert p.score_cpus + 2 * p.actor_cpus <= 2
    p = plan_placement(Resources(cpus=16), particles=8)
    assert p.score_cpus == 8 and len(p.actors) == 8 and p.actor_cpus == 1
    p = plan_placement(Resources(cpus=2), particles=8)  # two actors fill the core the ScoreActor leaves idle
    assert p.actors == [[0, 1, 2, 3], [4, 5, 6, 7]] and p.score_cpus == 1 and p.actor_cpus == 0.5
    assert plan_placement(Resources(cpus=2), particles=1).actors == [[0]]
    # the particle actors wait for their gradients: the ScoreActor's grads run on their CPUs too, on one node only
    assert p.grads_cpus == 2 and plan_placement(Resources(cpus=16), particles=8).grads_cpus == 16
    assert plan_placement(Resources(cpus=32, nodes=2, max_node_cpus=16), particles=8).grads_cpus == 16
    assert plan_placement(Resources(cpus=8, gpus=1), particles=8).grads_cpus == 1
    assert plan_placement(Resources(cpus=4), particles=8, replicas=2).grads_cpus == 2
    assert plan_placement(Resources(cpus=2), particles=8, borrow_idle_cpus=False).grads_cpus == 1
    assert plan_placement(Resources(cpus=4), particles=8, replicas=2, borrow_idle_cpus=False).grads_cpus == 1
    with pytest.raises(ValueError, match="at least 2 CPUs"):
        plan_placement(Resources(cpus=1), particles=2)


def test_one_gpu_is_shared():
    p = plan_placement(Resources(cpus=8, gpus=1), particles=8)
    assert len(p.actors) == 1 and p.actor_gpus + p.score_gpus <= 1 and p.score_gpus > 0


def test_four_gpus_give_the_score_actor_its_own():
    p = plan_placement(Resources(cpus=32, gpus=4), particles=8)
    assert p.score_gpus == 1 and len(p.actors) == 3 and p.actor_gpus == 1
    assert sorted(i for a in p.actors for i in a) == list(range(8))


def test_eight_gpus_and_more_actors_than_particles():
    p = plan_placement(Resources(cpus=64, gpus=8), particles=4)
    assert len(p.actors) == 4 and p.score_gpus == 1 and p.actor_gpus == 1


def test_two_nodes_spread():
    p = plan_placement(Resources(cpus=64, gpus=8, nodes=2, gpus_per_node=4), particles=64)
    assert p.strategy == "SPREAD" and len(p.actors) == 7 and sum(len(a) for a in p.actors) == 64
    assert len(p.bundles) == 8 and p.bundles[0]["GPU"] == 1


def test_fractional_gpus_per_actor_and_overcommit_is_refused():
    p = plan_placement(Resources(cpus=16, gpus=2), particles=8, actors=4, gpus_per_actor=0.25)
    assert p.actor_gpus == 0.25 and p.score_gpus == 1
    with pytest.raises(ValueError, match="exceed"):
        plan_placement(Resources(cpus=16, gpus=2), particles=8, actors=4, gpus_per_actor=0.5)


def test_only_the_ray_layer_imports_ray():
    import pathlib

    root = pathlib.Path(__file__).parents[1]
    offenders = [
        str(p.relative_to(root))
        for p in (root / "pdray").rglob("*.py")
        if "cluster" not in p.parts and ("import ray" in p.read_text() or "from ray" in p.read_text())
    ]
    assert offenders == []


def test_every_bundle_fits_on_one_node():
    # 2 pods x (32 CPUs, 4 GPUs) and a head without resources: 7 GPU actors must not ask 9 CPUs each (4 x 9 > 32).
    two_pods = Resources(cpus=64, gpus=8, nodes=3, gpus_per_node=8 / 3, cpus_per_gpu=8, max_node_cpus=32)
    p = plan_placement(two_pods, particles=64)
    assert len(p.actors) == 7 and p.actor_cpus == 8 and p.score_gpus == 1 and p.strategy == "SPREAD"
    assert 4 * p.actor_cpus <= 32 and p.score_cpus + 3 * p.actor_cpus <= 32
    # CPU-only, 3 nodes x 4 CPUs: the ScoreActor gets one node, not half of all CPUs (6 fit on no node).
    p = plan_placement(Resources(cpus=12, nodes=3, max_node_cpus=4), particles=3)
    assert p.score_cpus == 4 and p.actor_cpus == 2 and len(p.actors) == 3


def test_replica_groups_put_each_replica_in_its_particles_bundle():
    # 8 GPUs, 8 replicas: one group per GPU, a replica and its actor share the GPU's bundle.
    p = plan_placement(Resources(cpus=64, gpus=8), particles=16, replicas=8)
    assert p.replicas == [[i] for i in range(8)] and p.score_bundles == p.actor_bundles == list(range(8))
    assert p.replica_particles() == [[2 * i, 2 * i + 1] for i in range(8)]
    assert all(b == {"CPU": 8.0, "GPU": 1.0} for b in p.bundles)
    assert p.score_gpus + p.actor_gpus <= 1 and p.score_cpus + p.actor_cpus <= 8
    # 8 GPUs on two nodes, 2 replicas: a group of 4 GPUs per node, the replica on one and 3 actors on the others.
    two_nodes = Resources(cpus=64, gpus=8, nodes=2, gpus_per_node=4, cpus_per_gpu=8, max_node_cpus=32)
    p = plan_placement(two_nodes, particles=64, replicas=2)
    assert p.strategy == "SPREAD" and [b["GPU"] for b in p.bundles] == [4.0, 4.0] and p.score_gpus == 1
    assert len(p.actors) == 6 and p.actor_gpus == 1 and p.actor_bundles == [0, 0, 0, 1, 1, 1]
    assert p.score_cpus + 3 * p.actor_cpus <= 32
    assert sorted(i for ids in p.replica_particles() for i in ids) == list(range(64))
    # 3 replicas on that cluster: groups shrink to 2 GPUs so that they fit whole on the nodes.
    p = plan_placement(two_nodes, particles=64, replicas=3)
    assert [b["GPU"] for b in p.bundles] == [2.0, 2.0, 2.0] and 2 * 2 <= 4


def test_replica_groups_on_cpus_and_what_cannot_fit():
    p = plan_placement(Resources(cpus=2), particles=8, replicas=2)
    assert p.actors == [[0, 1, 2, 3], [4, 5, 6, 7]] and p.bundles == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert p.score_cpus + p.actor_cpus <= 1 and p.replicas == [[0], [1]]
    p = plan_placement(Resources(cpus=2), particles=6, actors=3, replicas=2)
    assert p.replicas == [[0, 1], [2]] and p.score_cpus + 2 * p.actor_cpus <= 1
    assert "replica 1 serves particles [4, 5]" in p.describe()
    assert p.as_dict()["replica_particles"] == [[0, 1, 2, 3], [4, 5]]
    with pytest.raises(ValueError, match="need a GPU each"):
        plan_placement(Resources(cpus=16, gpus=2), particles=8, replicas=3)
    with pytest.raises(ValueError, match="at least 3 particles"):
        plan_placement(Resources(cpus=8), particles=2, replicas=3)
    one = plan_placement(Resources(cpus=2), particles=2, actors=2)  # one replica: the layout of before
    assert one.replicas == [[0, 1]] and one.score_bundles == [0] and one.actor_bundles == [1, 2]
