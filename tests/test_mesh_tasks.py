"""The mesh stage as Ray tasks on a real local Ray cluster (2 CPUs), from a tiny NeRF run."""

from __future__ import annotations

import json

import pytest
import trimesh

from pdray.cluster.placement import Resources
from pdray.config import load_config


def test_task_resources_take_a_gpu_each_or_share_the_cpus() -> None:
    from pdray.cluster.mesh_tasks import task_resources

    config = load_config("default")
    assert task_resources(Resources(cpus=16, gpus=8), config, 4) == (1.0, 1.0)
    assert task_resources(Resources(cpus=2), config, 1) == (2.0, 0.0)
    assert task_resources(Resources(cpus=2), config, 4) == (1.0, 0.0)
    assert task_resources(Resources(cpus=8), load_config("default", ["mesh.cpus_per_task=3"]), 4) == (3.0, 0.0)


@pytest.mark.slow
def test_one_particle_meshes_as_a_ray_task_and_failed_ones_are_reported(local_ray, tiny_model, tmp_path):
    from pdray.cluster.mesh_tasks import run_mesh_ray
    from pdray.run.local_executor import run_local
    from pdray.vsd.checkpoint import load_checkpoint, save_checkpoint

    config = load_config(
        "default",
        [
            f"prior.model={tiny_model}",
            "particles=2",
            "steps=2",
            "executor=ray",
            "wandb=off",
            "nerf.resolution=16",
            "nerf.n_samples=8",
            "eval_views=2",
            "mesh.tet_resolution=8",
            "mesh.geometry_steps=2",
            "mesh.texture_steps=2",
            "mesh.render_resolution=16",
            "mesh.texture_resolution=32",
        ],
    )
    run_local(config, tmp_path)  # the NeRF stage, in this process
    info, tensors = load_checkpoint(tmp_path)
    tensors["particles"]["0001.field.mlp.2.bias"][0] = -1e3  # particle 1 has no density anywhere: no surface
    save_checkpoint(tmp_path, info.pop("step"), tensors, info)
    summary = run_mesh_ray(config, tmp_path, [0, 1, 5])  # the run has no particle 5
    assert list(summary["particles"]) == ["0"] and list(summary["failed"]) == ["1", "5"]
    assert summary["failed"]["1"].startswith("MeshStageError: particle 1: no surface at any mesh.threshold")
    assert "holds no state for particle 5" in summary["failed"]["5"]
    assert summary["executor"] == "ray" and summary["task_resources"] == {"cpus": 1.0, "gpus": 0.0}
    result = summary["particles"]["0"]
    assert result["watertight"] and result["triangles"] > 0 and result["texture_size"] == 32
    mesh = trimesh.load(tmp_path / "particles" / "00" / "mesh" / "model.glb", force="mesh")
    assert len(mesh.faces) == result["triangles"]
    assert mesh.visual.uv is not None and mesh.visual.uv.shape == (len(mesh.vertices), 2)
    assert mesh.visual.material.baseColorTexture.size == (32, 32)
    assert (tmp_path / "particles" / "00" / "mesh" / "turntable.gif").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["mesh"]["failed"] == summary["failed"]
