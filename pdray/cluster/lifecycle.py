"""How pdray's actors start: their process environment, their torch threads, how a restarted one is told apart, and
how a failed task is described.

Ray starts worker processes at niceness 15 (``RAY_worker_niceness``) so that its own daemons stay responsive.
Against any busy process at niceness 0 (an evaluation, a second job, the driver) that leaves an actor about 3%
of a core: on a 2-core machine a ParticleActor's first import of torch + diffusers took 264 s instead of 10 s.
pdray's actors *are* the job, so they run at niceness 0 (override by setting ``RAY_worker_niceness`` in the
driver's environment), with their thread pools sized to the CPUs they were given.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import ray
import torch
from ray.exceptions import RayError, RayTaskError

from pdray.memory import peak_memory

NICENESS = "RAY_worker_niceness"  # read by every Ray worker process at start; Ray's default is 15


class LostStateError(RuntimeError):
    """Raised by an actor that Ray restarted after its process died: it holds freshly initialised state and
    refuses work until the driver loads the last checkpoint into it (``load_state_tensors``)."""


def actor_threads(num_cpus: float) -> int:
    return max(1, int(num_cpus))


@contextmanager
def borrowed_threads(num_cpus: float) -> Iterator[None]:
    """Run the block on ``num_cpus`` threads (CPUs that other actors leave idle meanwhile), then on the actor's own."""
    own = torch.get_num_threads()
    torch.set_num_threads(actor_threads(num_cpus))
    try:
        yield
    finally:
        torch.set_num_threads(own)


def actor_runtime_env(num_cpus: float) -> dict:
    """The runtime_env of a pdray actor: niceness and thread-pool sizes, set before its process imports torch.

    Ray merges env_vars with the job's runtime_env (a working_dir or pip given at submission is kept)."""
    threads = str(actor_threads(num_cpus))
    env = {name: threads for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    env[NICENESS] = os.environ.get(NICENESS, "0")
    return {"env_vars": env}


def actor_location() -> dict[str, str | int]:
    """Where the calling actor runs: its Ray node id, that node's IP and its process id."""
    node_id = ray.get_runtime_context().get_node_id()
    return {"node_id": node_id, "ip": ray.util.get_node_ip_address(), "pid": os.getpid()}


def start_actor(num_cpus: float) -> bool:
    """Call first in an actor's __init__: sizes torch's threads; True when Ray restarted this actor."""
    torch.set_num_threads(actor_threads(num_cpus))
    with warnings.catch_warnings():  # Ray 2.60's own property reads its deprecated ``actor_id``
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


class ActorBase:
    """What every pdray actor shares: threads sized at start, where it runs, its peak memory, and the refusal of a
    restarted actor to work before the driver restores a checkpoint into it (``restored``)."""

    def __init__(self, num_cpus: float, what: str):
        self.lost_state, self._what = start_actor(num_cpus), what

    def check(self) -> None:
        if self.lost_state:
            raise LostStateError(f"{self._what} was restarted and awaits a checkpoint")

    def restored(self) -> None:
        self.lost_state = False

    def location(self) -> dict[str, str | int]:
        return actor_location()

    def memory(self) -> dict[str, float]:
        return peak_memory()


def describe_task_error(err: RayError) -> str:
    """One line for a summary: a failed task's own exception, or what happened to its worker."""
    cause = err.cause if isinstance(err, RayTaskError) and err.cause is not None else err
    first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{cause.__class__.__name__}: {first_line}"
