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
