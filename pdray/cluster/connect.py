"""Joining a Ray cluster and reading what it offers: used by the run driver, the mesh tasks and the studies."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from pathlib import Path

import ray

from pdray.cluster.placement import Resources
from pdray.config import RunConfig


def connect(config: RunConfig) -> None:
    """Join the configured cluster, reuse an initialised one, join the cluster running this process as a Ray job
    (RAY_ADDRESS, set by the job supervisor: `pdray submit`), or start a local one (dashboard on loopback).

    ray.init replaces the SIGTERM handler with a plain exit; the caller's (`pdray run`: checkpoint, then exit) is
    put back, so `pdray jobs stop` and a Kubernetes pod's SIGTERM still leave a checkpoint."""
    if ray.is_initialized():
        return
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if config.ray.address:
        ray.init(address=config.ray.address)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        temp = Path(tempfile.gettempdir()) / f"pdray-ray-{os.getuid()}"
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=str(temp))
    if threading.current_thread() is threading.main_thread() and on_sigterm is not None:
        signal.signal(signal.SIGTERM, on_sigterm)


def cluster_resources() -> Resources:
    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    gpus = float(total.get("GPU", 0.0))
    per_gpu = [n.get("CPU", 0.0) / n["GPU"] for n in nodes if n.get("GPU")]
    return Resources(
        cpus=float(total.get("CPU", 0.0)),
        gpus=gpus,
        nodes=max(1, len(nodes)),
        gpus_per_node=gpus / max(1, len(nodes)),
        cpus_per_gpu=min(per_gpu, default=0.0),
        max_node_cpus=max((n.get("CPU", 0.0) for n in nodes), default=0.0),
    )
