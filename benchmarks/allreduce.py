"""The score replicas' LoRA all-reduce on a real local Ray cluster: seconds and bytes per exchange for R replicas
that each serve k particle actors, with a gradient of the SD 2.1 LoRA's size, wired as pdray.cluster.driver wires it
(local sum of the k shares -> cut -> reduce piece j on replica j -> join on all), with pdray.vsd.allreduce's
functions and the ScoreActor's wire format (numpy pieces), and no UNet: the exchange alone.

Each replica counts the bytes it receives from the other replicas (its inputs' sizes), so "moved" is measured, and is
printed beside the model 2(R-1)/R S. ``--no-local-sum`` sends each of the k shares' pieces instead, as pdray did
before the local sum: (k+1)(R-1)/R S. The sum is checked against a one-process sum of all R k shares.
One machine: the object store is shared memory, so this measures the latency of the three rounds of actor calls
more than bandwidth.

    python benchmarks/allreduce.py [--replicas 2,4] [--actors-per-replica 1,4] [--numel 2491392] [--iterations 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import ray
import torch

from pdray.cluster.score_actor import from_wire, to_wire
from pdray.types import LoraGrads
from pdray.vsd.allreduce import cut, join, local_sum, sum_in_order


@ray.remote
class Replica:
    def __init__(self, numel: int, index: int, k: int, local: bool):
        torch.set_num_threads(1)
        self.index, self.local = index, local
        self.shares = [
            LoraGrads(torch.randn(numel, generator=torch.Generator().manual_seed(index * k + a)), 1.0, 1)
            for a in range(k)
        ]

    def grads(self, parts: int):
        if self.local:
            mine = local_sum(self.shares)
            pieces = [[to_wire(p)] for p in cut(mine.grad, parts)]
        else:  # every share's pieces cross: k per destination
            split = [cut(share.grad, parts) for share in self.shares]
            pieces = [[to_wire(s[j]) for s in split] for j in range(parts)]
        return (*pieces, (float(len(self.shares)), len(self.shares)))

    def reduce(self, *pieces):
        received = sum(p.nbytes for r, replica in enumerate(pieces) if r != self.index for p in replica)
        return to_wire(sum_in_order([from_wire(p) for replica in pieces for p in replica])), received

    def apply(self, parts: int, *sums_and_counts) -> int:
        sums = [pair[0] for pair in sums_and_counts[:parts]]
        join([from_wire(p) for p in sums])
        reduce_bytes = sums_and_counts[self.index][1]
        return reduce_bytes + sum(p.nbytes for r, p in enumerate(sums) if r != self.index)

    def share_tensors(self) -> list[torch.Tensor]:
        return [s.grad for s in self.shares]


def exchange(replicas: list) -> list:
    r = len(replicas)
    cuts = [rep.grads.options(num_returns=r + 1).remote(r) for rep in replicas]
    sums = [rep.reduce.remote(*(pieces[j] for pieces in cuts)) for j, rep in enumerate(replicas)]
    counts = [pieces[r] for pieces in cuts]
    return [sums, [rep.apply.remote(r, *sums, *counts) for rep in replicas]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", default="2,4")
    parser.add_argument("--actors-per-replica", default="1,4", help="k: particle actors each replica serves")
    parser.add_argument("--numel", type=int, default=2_491_392, help="LoRA + camera MLP parameters (SD 2.1, rank 4)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--no-local-sum", action="store_true", help="send every actor's share (the old exchange)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="pdray-ar-"))
    size = 4 * args.numel
    local = not args.no_local_sum
    summing = "on" if local else "off"
    print(f"gradient {size / 2**20:.2f} MiB float32; {os.cpu_count()} CPUs, one node; local sum {summing}")
    print(f"{'R':>3}{'k':>4}{'median s':>11}{'min s':>9}{'max s':>9}{'moved MiB':>11}{'model 2(R-1)/R':>16}")
    for r in [int(x) for x in args.replicas.split(",")]:
        for k in [int(x) for x in args.actors_per_replica.split(",")]:
            replicas = [Replica.options(num_cpus=2 / r).remote(args.numel, i, k, local) for i in range(r)]
            whole = sum_in_order([t for ts in ray.get([rep.share_tensors.remote() for rep in replicas]) for t in ts])
            sums, applied = exchange(replicas)
            joined = join([from_wire(s) for s, _ in ray.get(sums)])
            torch.testing.assert_close(joined, whole, rtol=1e-5, atol=1e-5)  # grouped sums: float32 rounding only
            moved = max(ray.get(applied)) / 2**20
            times = []
            for _ in range(args.iterations):
                started = time.perf_counter()
                ray.get(exchange(replicas)[1])
                times.append(time.perf_counter() - started)
            model = 2 * (r - 1) / r * size / 2**20
            print(
                f"{r:>3}{k:>4}{statistics.median(times):>11.4f}{min(times):>9.4f}{max(times):>9.4f}"
                f"{moved:>11.1f}{model:>16.1f}",
                flush=True,
            )
            for rep in replicas:
                ray.kill(rep)
    ray.shutdown()


if __name__ == "__main__":
    main()
