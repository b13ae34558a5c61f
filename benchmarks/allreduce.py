"""The score replicas' LoRA all-reduce on a real local Ray cluster: seconds per exchange for R replicas and a gradient
of the SD 2.1 LoRA's size, wired as pdray.cluster.driver wires it (cut -> reduce piece j on replica j -> join on all),
with pdray.allreduce's functions and the ScoreActor's wire format (numpy pieces), and no UNet: the exchange alone.

It checks the sum against a one-process sum (bit for bit) and prints, per R, the median seconds per exchange over
--iterations, next to gpu_step.py's model term 2(R-1)/R S/B + 3a (without the PCIe copies: CPU tensors here).
One machine: the object store is shared memory, so this measures the latency of the three rounds of actor calls
more than bandwidth.

    python benchmarks/allreduce.py [--replicas 2,4] [--numel 2491392] [--iterations 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import ray
import torch

from pdray.allreduce import cut, join, sum_in_order
from pdray.cluster.score_actor import from_wire, to_wire
from pdray.types import LoraGrads


@ray.remote
class Replica:
    def __init__(self, numel: int, seed: int):
        torch.set_num_threads(1)
        self.share = LoraGrads(torch.randn(numel, generator=torch.Generator().manual_seed(seed)), 1.0, 1)

    def grads(self, parts: int):
        pieces = [[to_wire(p) for p in piece] for piece in cut([self.share], parts)]
        return (*pieces, [(self.share.loss_sum, self.share.count)])

    def reduce(self, *pieces):
        return to_wire(sum_in_order([from_wire(p) for replica in pieces for p in replica]))

    def apply(self, parts: int, *sums_and_counts) -> float:
        total = join([from_wire(p) for p in sums_and_counts[:parts]])
        return float(total[0])

    def share_tensor(self) -> torch.Tensor:
        return self.share.grad


def exchange(replicas: list) -> list:
    r = len(replicas)
    cuts = [rep.grads.options(num_returns=r + 1).remote(r) for rep in replicas]
    sums = [rep.reduce.remote(*(pieces[j] for pieces in cuts)) for j, rep in enumerate(replicas)]
    counts = [pieces[r] for pieces in cuts]
    return [sums, [rep.apply.remote(r, *sums, *counts) for rep in replicas]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", default="2,4")
    parser.add_argument("--numel", type=int, default=2_491_392, help="LoRA + camera MLP parameters (SD 2.1, rank 4)")
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="pdray-ar-"))
    size = 4 * args.numel
    print(f"gradient {size / 2**20:.2f} MiB float32; {os.cpu_count()} CPUs, one node")
    print(f"{'R':>3}{'median s':>12}{'min s':>10}{'max s':>10}{'moved per replica MiB':>24}")
    for r in [int(x) for x in args.replicas.split(",")]:
        replicas = [Replica.options(num_cpus=2 / r).remote(args.numel, seed) for seed in range(r)]
        whole = sum_in_order(ray.get([rep.share_tensor.remote() for rep in replicas]))
        sums, applied = exchange(replicas)
        assert torch.equal(join([from_wire(s) for s in ray.get(sums)]), whole), (
            "the all-reduce differs from the one-process sum"
        )
        ray.get(applied)
        times = []
        for _ in range(args.iterations):
            started = time.perf_counter()
            ray.get(exchange(replicas)[1])
            times.append(time.perf_counter() - started)
        moved = 2 * (r - 1) / r * size / 2**20
        print(f"{r:>3}{statistics.median(times):>12.4f}{min(times):>10.4f}{max(times):>10.4f}{moved:>24.1f}")
        for rep in replicas:
            ray.kill(rep)
    ray.shutdown()


if __name__ == "__main__":
    main()
