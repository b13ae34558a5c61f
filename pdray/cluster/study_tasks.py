"""A study's cells on Ray: one task per cell, each running the local executor in its own worker process.

    refs = [study_cell.remote(config, labels, name, cpus) for every cell]   # Ray runs as many as fit
    ray.wait(refs) one at a time -> the cell's summary and run-folder files, or its error -> retry once

Why tasks running the local executor, not the Ray executor per cell: a study's cells are independent, so the
parallelism is across cells; one process per cell holds its particles and its score network with no messages
between actors, and a cell's CPU share (``cpus_per_cell``, torch threads to match) sets how many run at once.
A task writes its run into a temporary folder and returns the files (kilobytes to a few MB on the toy prior),
so the study folder lives only on the driver's machine, as with the mesh tasks. Retries are the driver's own
(``max_retries=0`` in Ray), so a failure is reported as it happens before the one retry.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayError
from tqdm.auto import tqdm

from pdray.cluster.connect import cluster_resources, connect
from pdray.cluster.lifecycle import actor_runtime_env, actor_threads, describe_task_error
from pdray.config import RunConfig
from pdray.evaluation.tracking import WandbLabels, flush_wandb
from pdray.run.local_executor import run_local

SCRATCH_PREFIX = "pdray-study-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_scratch(root: Path | None = None) -> list[Path]:
    """Remove the scratch folders of studies on this host whose driver process is gone (one killed with SIGKILL, or
    whose workers outlived it); returns what was removed."""
    root = root or Path(tempfile.gettempdir())
    host, removed = socket.gethostname(), []
    for folder in root.glob(f"{SCRATCH_PREFIX}*"):
        owner_host, _, rest = folder.name[len(SCRATCH_PREFIX) :].rpartition("@")
        pid = rest.split("-")[0]
        if owner_host == host and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@contextmanager
def study_scratch(root: Path | None = None) -> Iterator[Path]:
    """The temporary folder of one study invocation, which its cells' run folders live in until copied back: removed
    on every exit of the block (done, failed, Ctrl-C, SIGTERM); stale ones of dead drivers are swept on entry."""
    root = root or Path(tempfile.gettempdir())
    sweep_stale_scratch(root)
    folder = root / f"{SCRATCH_PREFIX}{socket.gethostname()}@{os.getpid()}-{secrets.token_hex(4)}"
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@ray.remote
def study_cell(
    config: dict, labels: dict, name: str, num_cpus: float, scratch: str
) -> tuple[dict[str, Any], dict[str, bytes], float]:
    """One cell in a Ray worker: its summary, its run folder's files by relative path, and its wall time. The run
    folder lives in the study's scratch folder (created here on another host; gone here once the study ended)."""
    started = time.perf_counter()
    torch.set_num_threads(actor_threads(num_cpus))
    if not Path(scratch).name.startswith(f"{SCRATCH_PREFIX}{socket.gethostname()}@"):
        Path(scratch).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cell-", dir=scratch) as tmp:
        run_dir = Path(tmp) / name
        run_config = RunConfig.model_validate(config)
        summary = run_local(run_config, run_dir, labels=WandbLabels(**labels))
        if run_config.wandb != "off":
            flush_wandb()
        files = {}
        for root, _, names in os.walk(run_dir):
            for file_name in names:
                path = Path(root) / file_name
                if not path.is_symlink():
                    files[str(path.relative_to(run_dir))] = path.read_bytes()
    return summary, files, time.perf_counter() - started


@dataclass
class CellOutcome:
    """What became of one cell: its summary and files, or the error of its last attempt."""

    cell: Any
    attempts: int
    summary: dict[str, Any] | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    wall_s: float | None = None
    error: str | None = None


def cell_runtime_env(num_cpus: float) -> dict:
    """An actor's environment (niceness 0, threads = CPUs), with the run's own progress bar off: the study has one."""
    env = actor_runtime_env(num_cpus)
    env["env_vars"]["TQDM_DISABLE"] = "1"
    return env


def run_cells(cells: list[tuple[Any, RunConfig]], spec: Any, study_name: str, scratch: Path) -> Iterator[CellOutcome]:
    """Submit every cell at once; yield each outcome as it finishes. A failed attempt is reported and retried
    ``spec.retries`` times; then the cell is yielded with its error. Cells still running when the caller stops
    (Ctrl-C, an error) are cancelled."""
    if not cells:
        return
    connect(cells[0][1])  # every cell's config carries the study's ray.address
    gpus = spec.gpus_per_cell
    if gpus is None:
        gpus = 1.0 if cluster_resources().gpus >= 1 else 0.0
    cpus = spec.cpus_per_cell
    task = study_cell.options(num_cpus=cpus, num_gpus=gpus, max_retries=0, runtime_env=cell_runtime_env(cpus))

    def submit(cell: Any, config: RunConfig) -> ray.ObjectRef:
        labels = {"group": study_name, "config": {"study": study_name, "cell": cell.name, "grid": cell.values}}
        return task.remote(config.model_dump(mode="json"), labels, cell.name, cpus, str(scratch))

    pending = {submit(cell, config): (cell, config, 1) for cell, config in cells}
    try:
        yield from _outcomes(pending, submit, spec)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def _outcomes(pending: dict, submit, spec: Any) -> Iterator[CellOutcome]:
    while pending:
        (done,), _ = ray.wait(list(pending), num_returns=1)
        cell, config, attempt = pending.pop(done)
        try:
            summary, files, wall = ray.get(done)
        except RayError as err:
            error = describe_task_error(err)
            if attempt <= spec.retries:
                tqdm.write(f"cell {cell.name} failed (attempt {attempt}): {error}; retrying")
                pending[submit(cell, config)] = (cell, config, attempt + 1)
            else:
                yield CellOutcome(cell, attempt, error=error)
            continue
        yield CellOutcome(cell, attempt, summary, files, wall)
