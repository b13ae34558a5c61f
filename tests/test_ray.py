"""The Ray executor on a real local Ray cluster (2 CPUs), with the tiny random fixture prior."""

import itertools
import json
import os
import shutil
import signal
import threading
import time

import psutil
import pytest
import torch

from pdray.config import load_config, save_config
from pdray.vsd.checkpoint import checkpoint_folder, load_checkpoint

# End-to-end runs on a local cluster: about 2 minutes on an idle 2-core machine.
pytestmark = pytest.mark.slow

STEPS = 12


def ray_config(model, *overrides):
    return load_config(
        "default",
        [
            f"prior.model={model}",
            "executor=ray",
            "ray.actors=2",
            "particles=2",
            "nerf.resolution=16",
            "nerf.n_samples=8",
            "log_every=1",
            "checkpoint_every=2",
            "eval_views=2",
            "wandb=offline",
            "particle_score=lora",  # the LoRA's state must survive actor loss and resume too
            "ray.borrow_idle_cpus=false",  # one thread per actor: runs on other placements agree to float rounding
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def reference(local_ray, tiny_model, tmp_path_factory):
    """An uninterrupted run: what a run that loses an actor must reproduce exactly (every random draw is keyed by
    seed, particle and step, and every actor computes with one thread)."""
    from pdray.cluster.driver import run_ray

    config = ray_config(tiny_model, f"steps={STEPS}")
    run_dir = tmp_path_factory.mktemp("reference")
    return config, run_dir, run_ray(config, run_dir)


def logged(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_particles_on_two_actors_fill_the_run_folder_and_resume(reference, tmp_path):
    from pdray.cluster.driver import run_ray

    config, run_dir, summary = reference
    assert summary["executor"] == "ray" and summary["steps_done"] == STEPS and summary["recoveries"] == 0
    assert summary["placement"]["actors"] == [[0], [1]] and summary["startup_s"] > 0
    assert {m["pid"] for m in summary["actor_memory"].values()} and len(summary["actor_memory"]) == 3
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "particles/00/views.png",
        "particles/01/turntable.gif",
    ):
        assert (run_dir / name).exists(), name
    folder = checkpoint_folder(run_dir)  # one shard per particle actor, written by the actor, and the manifest last
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["particles"] == {"particles-0000.safetensors": [0], "particles-0001.safetensors": [1]}
    assert manifest["lora"] == "lora.safetensors" and manifest["step"] == STEPS
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*manifest["particles"], "lora.safetensors", "manifest.json"]
    )
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [folder.name]  # older checkpoints deleted
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [m["step"] for m in logged(run_dir)] == list(range(1, STEPS + 1))

    # Resume (a copy) with more steps: continues from the checkpoint at STEPS, never from 0.
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    save_config(config.model_copy(update={"steps": STEPS + 2}), resumed / "config.yaml")
    summary = run_ray(load_config(str(resumed / "config.yaml")), resumed, resume=True)
    assert [m["step"] for m in logged(resumed)] == list(range(1, STEPS + 3)) and summary["steps_done"] == STEPS + 2
    assert load_checkpoint(resumed)[0]["step"] == STEPS + 2


def kill_one_mid_run(actor_class: str, metrics, started: float, killed: list) -> threading.Thread:
    """A thread that SIGKILLs one process of ``actor_class`` of this run once ``metrics`` holds 3 lines."""
    me = psutil.Process()

    def this_runs_actors() -> list[psutil.Process]:
        found = []
        for proc in me.children(recursive=True):  # the local raylet is our child, its workers its children
            try:
                if proc.create_time() >= started - 1 and any(f"ray::{actor_class}" in p for p in proc.cmdline()):
                    found.append(proc)
            except psutil.Error:
                pass
        return found

    def kill():
        while time.time() < started + 600 and not killed:
            lines = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            if lines >= 3:
                for proc in this_runs_actors():
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.append((proc.pid, lines))
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def assert_same_checkpoint(run_dir, reference_dir, atol: float = 0.0) -> dict:
    """The run's last checkpoint equals the reference's, tensor for tensor; returns its info."""
    info, tensors = load_checkpoint(run_dir)
    _, expected = load_checkpoint(reference_dir)
    assert tensors.keys() == expected.keys()
    for part in expected:
        assert tensors[part].keys() == expected[part].keys(), part
        for key, value in tensors[part].items():
            torch.testing.assert_close(value, expected[part][key], atol=atol, rtol=0, msg=f"{part} {key} differs")
    return info


@pytest.mark.parametrize("actor_class", ["ParticleActor", "ScoreActor"])
def test_a_killed_actor_is_restored_and_no_particle_is_lost(reference, tmp_path, actor_class):
    from pdray.cluster.driver import run_ray

    config, reference_dir, _ = reference
    if actor_class == "ScoreActor":  # a replica of two: restored with the one LoRA the other replica also rolls back to
        config = config.model_copy(update={"ray": config.ray.model_copy(update={"score_replicas": 2})})
    killed: list[tuple[int, int]] = []  # (pid, metrics lines when it was killed)
    thread = kill_one_mid_run(actor_class, tmp_path / "metrics.jsonl", time.time(), killed)
    summary = run_ray(config, tmp_path)
    thread.join(timeout=1)
    assert killed, f"no {actor_class} process of this run was found to kill"
    assert killed[0][1] < STEPS, f"the kill came after the last step ({killed})"
    assert summary["recoveries"] >= 1 and summary["steps_done"] == STEPS

    # Every particle is there, trained exactly as far as in the uninterrupted run: no step lost or applied twice.
    info = assert_same_checkpoint(tmp_path, reference_dir, atol=1e-6)
    assert info["step"] == STEPS and info["recoveries"] >= 1
    assert (tmp_path / "particles/00/views.png").exists() and (tmp_path / "particles/01/views.png").exists()

    # The step counter went back once per recovery, never past the last checkpoint; restarts are in the metrics.
    records = logged(tmp_path)
    steps = [m["step"] for m in records]
    assert steps[-1] == STEPS and set(steps) == set(range(1, STEPS + 1))
    went_back = 0
    for before, after in itertools.pairwise(steps):
        if after != before + 1:
            went_back += 1
            restored = after - 1
            assert restored % config.checkpoint_every == 0 and 0 <= before - restored <= config.checkpoint_every, steps
    assert went_back <= summary["recoveries"]
    assert records[0]["recoveries"] == 0 and records[-1]["recoveries"] == summary["recoveries"]


def test_two_score_replicas_keep_one_lora_and_resume_to_the_one_replica_run(reference, tmp_path):
    """R=2 (a replica per particle actor) stopped halfway and resumed ends bit for bit where R=1 ends."""
    from pdray.cluster.driver import run_ray

    config, reference_dir, _ = reference
    config = config.model_copy(update={"ray": config.ray.model_copy(update={"score_replicas": 2})})
    half = config.model_copy(update={"steps": STEPS // 2})
    summary = run_ray(half, tmp_path)
    placement = summary["placement"]
    assert placement["replicas"] == [[0], [1]] and placement["replica_particles"] == [[0], [1]]
    assert len(placement["nodes"]["replicas"]) == 2 and {"score_0", "score_1"} <= summary["actor_memory"].keys()
    save_config(config, tmp_path / "config.yaml")
    run_ray(load_config(str(tmp_path / "config.yaml")), tmp_path, resume=True)  # one LoRA restored to both replicas
    assert_same_checkpoint(tmp_path, reference_dir)
    digests = [m["lora_digest"] for m in logged(tmp_path)]
    assert len(digests) == STEPS and len(set(digests)) == STEPS, "a digest per step, and the LoRA moves every step"


@pytest.mark.parametrize("score", ["gaussian", "gaussian_lora"])
def test_the_gaussian_score_on_two_replicas_of_two_actors_each_equals_one_replica(tiny_model, tmp_path, score):
    """R=2 with two particle actors per replica: each actor sends its per-camera moments, each replica sums its own
    actors' and receives the other's sum (and with the LoRA beside the Gaussian, the replicas all-reduce its
    gradients); stopped halfway and resumed from four shards, it ends where R=1 ends."""
    from pdray.cluster.driver import run_ray

    def gaussian(replicas: int, steps: int):
        return ray_config(
            tiny_model,
            f"particle_score={score}",
            "particles=4",
            "ray.actors=4",
            f"ray.score_replicas={replicas}",
            f"steps={steps}",
            "wandb=off",
        )

    one = run_ray(gaussian(1, 4), tmp_path / "one")
    two = run_ray(gaussian(2, 2), tmp_path / "two")
    assert two["placement"]["replicas"] == [[0, 1], [2, 3]] and one["placement"]["replicas"] == [[0, 1, 2, 3]]
    save_config(gaussian(2, 4), tmp_path / "two" / "config.yaml")
    run_ray(load_config(str(tmp_path / "two" / "config.yaml")), tmp_path / "two", resume=True)
    manifest = json.loads((checkpoint_folder(tmp_path / "two") / "manifest.json").read_text())
    assert manifest["particles"] == {f"particles-{i:04d}.safetensors": [i] for i in range(4)}
    assert (manifest["lora"] is None) == (score == "gaussian") and manifest["step"] == 4
    # The moments are float64 sums, grouped differently by one and two replicas: equal to float32 rounding.
    if score == "gaussian":
        assert_same_checkpoint(tmp_path / "two", tmp_path / "one", atol=1e-6)
        return
    # Beside the LoRA, the particles' finer gradients are eps_pre - eps_lora, near zero where the LoRA has learnt the
    # prior, and Adam (eps 1e-15) turns that rounding into lr-sized steps on a few grid entries: the LoRA is one to
    # rounding, and all but a few of the particles' 7 million numbers are too.
    _, two_tensors = load_checkpoint(tmp_path / "two")
    _, one_tensors = load_checkpoint(tmp_path / "one")
    for key, value in one_tensors["lora"].items():
        torch.testing.assert_close(two_tensors["lora"][key], value, atol=1e-6, rtol=0, msg=key)
    diffs = torch.cat([(two_tensors["particles"][k] - v).abs().flatten() for k, v in one_tensors["particles"].items()])
    assert float((diffs > 1e-6).float().mean()) < 1e-3


def test_the_local_and_the_ray_executor_run_one_loop_to_the_same_particles(reference, tmp_path):
    from pdray.run.local_executor import run_local

    config, reference_dir, _ = reference
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each actor: Adam (eps 1e-15) turns rounding in near-zero gradients into lr steps
    try:
        # UNet calls never mix two particle actors' latents: the Ray run scored each particle's views alone (one
        # particle per actor), and so does this one-process run with batches of one particle's views.
        one_particle = config.camera.views_per_step
        run_local(config.model_copy(update={"executor": "local", "score_batch_size": one_particle}), tmp_path)
    finally:
        torch.set_num_threads(threads)
    _, local = load_checkpoint(tmp_path)
    _, remote = load_checkpoint(reference_dir)
    assert local.keys() == remote.keys()
    for part in local:
        for key, value in local[part].items():
            diff = float((value.double() - remote[part][key].double()).abs().max()) if value.numel() else 0.0
            assert diff <= 1e-5, f"{part} {key} differs by {diff}"
    assert logged(tmp_path)[-1]["step"] == logged(reference_dir)[-1]["step"] == STEPS


def test_a_ray_run_stopped_by_sigint_resumes_to_exactly_the_uninterrupted_run(reference, tmp_path):
    from pdray.cluster.driver import run_ray
    from pdray.run.loop import RunStopped

    config, reference_dir, _ = reference
    sent = []

    def interrupt_mid_run():
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.time() + 600
        while time.time() < deadline and not sent:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                os.kill(os.getpid(), signal.SIGINT)
                sent.append(True)
            time.sleep(0.01)

    thread = threading.Thread(target=interrupt_mid_run, daemon=True)
    thread.start()
    with pytest.raises(RunStopped) as err:
        run_ray(config, tmp_path)
    thread.join(timeout=1)
    info, _ = load_checkpoint(tmp_path)
    assert 3 <= info["step"] == err.value.step < STEPS == config.steps
    print(f"ray: stopped at step {info['step']} of {STEPS}")
    run_ray(config, tmp_path, resume=True)
    _, resumed = load_checkpoint(tmp_path)
    _, expected = load_checkpoint(reference_dir)
    worst = 0.0
    for part in expected:
        assert resumed[part].keys() == expected[part].keys()
        for key, value in resumed[part].items():
            diff = float((value.double() - expected[part][key].double()).abs().max()) if value.numel() else 0.0
            worst = max(worst, diff)
    assert worst <= 1e-5, worst
    print(f"ray: resumed run vs uninterrupted, max |difference| {worst:.3g}")
    assert [m["step"] for m in logged(tmp_path)] == list(range(1, STEPS + 1))


def test_the_scoreactor_borrows_the_waiting_cpus_and_resumes_exactly(local_ray, tiny_model, tmp_path):
    """The default on a one-node CPU cluster: grads on the particle actors' CPUs too, and resume still exact."""
    from pdray.cluster.driver import run_ray

    config = ray_config(tiny_model, "ray.borrow_idle_cpus=true", f"steps={STEPS}")
    whole = run_ray(config, tmp_path / "whole")
    assert whole["placement"]["grads_cpus"] == 2 and whole["placement"]["score_cpus"] == 1
    run_ray(config.model_copy(update={"steps": STEPS // 2}), tmp_path / "halves")
    run_ray(config, tmp_path / "halves", resume=True)
    assert_same_checkpoint(tmp_path / "halves", tmp_path / "whole")
