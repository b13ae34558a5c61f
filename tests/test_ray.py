"""The Ray executor on a real local Ray cluster (2 CPUs), with the tiny random fixture prior."""

import json
import os
import signal
import threading
import time

import psutil
import pytest

from pdray.checkpoint import load_checkpoint
from pdray.config import load_config, save_config

ray = pytest.importorskip("ray")

# Slow on this 2-core machine: a Ray worker's first import of torch + diffusers took minutes here (see README).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
    )
    yield
    ray.shutdown()


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
            *overrides,
        ],
    )


def test_two_particles_on_two_actors_fill_the_run_folder_and_resume(cluster, tiny_model, tmp_path):
    from pdray.cluster.driver import run_ray

    config = ray_config(tiny_model, "steps=4")
    summary = run_ray(config, tmp_path)
    assert summary["executor"] == "ray" and summary["steps_done"] == 4 and summary["recoveries"] == 0
    assert summary["placement"]["actors"] == [[0], [1]]
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "checkpoints/latest/particles.safetensors",
        "checkpoints/latest/lora.safetensors",
        "checkpoints/latest/state.json",
        "particles/00/views.png",
        "particles/01/turntable.gif",
    ):
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]

    # Resume with more steps: continues from the checkpoint at step 4, never from 0.
    save_config(config.model_copy(update={"steps": 6}), tmp_path / "config.yaml")
    summary = run_ray(load_config(str(tmp_path / "config.yaml")), tmp_path, resume=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6] and summary["steps_done"] == 6
    assert load_checkpoint(tmp_path)[0]["step"] == 6


def test_a_killed_particle_actor_is_restored_and_no_particle_is_lost(cluster, tiny_model, tmp_path):
    from pdray.cluster.driver import run_ray

    config = ray_config(tiny_model, "steps=10")
    killed = []

    def kill_one_actor():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            metrics = tmp_path / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                for proc in psutil.process_iter(["pid", "cmdline"]):
                    if any("ParticleActor" in part for part in (proc.info["cmdline"] or [])):
                        os.kill(proc.info["pid"], signal.SIGKILL)
                        killed.append(proc.info["pid"])
                        return
            time.sleep(0.2)

    thread = threading.Thread(target=kill_one_actor, daemon=True)
    thread.start()
    summary = run_ray(config, tmp_path)
    thread.join(timeout=1)
    assert killed, "no ParticleActor process was found to kill"
    assert summary["recoveries"] >= 1 and summary["steps_done"] == 10
    info, tensors = load_checkpoint(tmp_path)
    assert info["step"] == 10
    assert {k[:4] for k in tensors["particles"]} == {"0000", "0001"}
    assert (tmp_path / "particles/00/views.png").exists() and (tmp_path / "particles/01/views.png").exists()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (
        steps[-1] == 10
        and max(json.loads(line)["recoveries"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()) >= 1
    )
