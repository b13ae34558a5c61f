"""The mesh stage on Ray: one task per particle, all submitted at once; the driver only waits and records.

    refs = [mesh_task.remote(config, nerf_weights[pid], pid) for pid in particles]   # num_gpus=1 on GPU clusters
    ray.wait(refs) one at a time -> progress bar; write each particle's files, or record its error

The math lives in ``pdray.run.mesh_stage``. The run folder lives on the driver's machine (a worker on another node need
not see it), so the driver reads each particle's NeRF weights from the checkpoint and sends them with its task,
and a task returns its files (GLB, OBJ, MTL, PNG, GIF: kilobytes to a few MB) for the driver to write.
Ray re-runs a task whose worker process died (``mesh.max_retries``); an exception raised by the stage (no surface
at the threshold) is deterministic, so it is reported, not retried. A failed particle never costs the others:
their meshes are written and summary.json lists the failure.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayError
from tqdm.auto import tqdm

from pdray.cluster.connect import cluster_resources, connect
from pdray.cluster.lifecycle import actor_runtime_env, actor_threads, describe_task_error
from pdray.cluster.placement import Resources
from pdray.config import RunConfig
from pdray.run.mesh_stage import mesh_folder, mesh_summary, record_mesh_summary, run_mesh_stage, write_files
from pdray.vsd.checkpoint import load_particle_tensors


@ray.remote
def mesh_task(
    config: dict, nerf_tensors: dict[str, torch.Tensor], particle_id: int, num_cpus: float
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The mesh stage of one particle in a Ray worker: its stats and its files by name."""
    torch.set_num_threads(actor_threads(num_cpus))
    with tempfile.TemporaryDirectory(prefix="pdray-mesh-") as tmp:
        result = run_mesh_stage(RunConfig.model_validate(config), nerf_tensors, particle_id, Path(tmp))
        return result, {p.name: p.read_bytes() for p in Path(tmp).iterdir()}


def task_resources(resources: Resources, config: RunConfig, n_tasks: int) -> tuple[float, float]:
    """(CPUs, GPUs) per mesh task: a whole GPU each on GPU clusters, else an equal share of the CPUs."""
    if resources.gpus >= 1:
        return config.mesh.cpus_per_task or 1.0, 1.0
    if config.mesh.cpus_per_task is not None:
        return config.mesh.cpus_per_task, 0.0
    return max(1.0, float(int(resources.cpus // max(1, n_tasks)))), 0.0


def run_mesh_ray(config: RunConfig, run_dir: Path, particle_ids: list[int]) -> dict[str, Any]:
    """Run the mesh stage of ``particle_ids`` as parallel Ray tasks; records and returns summary.json["mesh"]."""
    connect(config)
    started = time.perf_counter()
    cpus, gpus = task_resources(cluster_resources(), config, len(particle_ids))
    spec = config.model_dump(mode="json")
    task = mesh_task.options(
        num_cpus=cpus, num_gpus=gpus, max_retries=config.mesh.max_retries, runtime_env=actor_runtime_env(cpus)
    )
    results, failed, owner = {}, {}, {}
    for pid in particle_ids:
        try:
            _, tensors = load_particle_tensors(run_dir, pid)
        except KeyError as err:
            failed[pid] = f"KeyError: {err.args[0]}"
            continue
        owner[task.remote(spec, tensors, pid, cpus)] = pid
    pending = list(owner)

    def record() -> dict[str, Any]:
        summary = mesh_summary(config, "ray", results, failed, time.perf_counter() - started)
        summary["task_resources"] = {"cpus": cpus, "gpus": gpus}
        return record_mesh_summary(run_dir, summary)

    try:
        with tqdm(total=len(particle_ids), initial=len(failed), desc=f"mesh x{len(particle_ids)} (ray)") as bar:
            while pending:
                (done,), pending = ray.wait(pending, num_returns=1)
                pid = owner[done]
                try:
                    result, files = ray.get(done)
                    folder = mesh_folder(run_dir, pid)
                    write_files(folder, files)
                    results[pid] = result | {"folder": str(folder)}
                except RayError as err:
                    failed[pid] = describe_task_error(err)
                    tqdm.write(f"mesh stage of particle {pid} failed: {failed[pid]}")
                record()  # after each particle, so a stop keeps every mesh finished
                bar.update(1)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return record()
