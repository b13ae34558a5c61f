"""The weak-scaling projection of benchmarks/gpu_step.py from ESTIMATED one-GPU component times, for a session without
a GPU. The R=G all-reduce cost and the break-even step time follow from the LoRA's size and the link; the table
needs a one-GPU step time and its split, which are assumptions (stated in --help). Replace them with gpu_step.py's
measured table when a GPU is lent.

    python benchmarks/scaling_estimate.py [--bandwidth-gbs 5] [--latency-ms 2] [--step-s 0.46]
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

LORA_BYTES = 2_491_392 * 4  # SD 2.1 LoRA (rank 4, to_q/k/v/out.0) + camera MLP, float32 (benchmarks/sd_memory.py)
LATENT_BYTES = 4 * 4 * 64 * 64  # one float32 SD latent at 512 px


def load_gpu_step():
    spec = importlib.util.spec_from_file_location("gpu_step", Path(__file__).with_name("gpu_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bandwidth-gbs", type=float, default=5.0, help="object-store bandwidth per replica")
    parser.add_argument("--pcie-gbs", type=float, default=25.0)
    parser.add_argument("--latency-ms", type=float, default=2.0, help="per round of actor calls")
    parser.add_argument(
        "--step-s",
        type=float,
        default=0.46,
        help="assumed one-GPU step at 1 particle: the premise of ~9 h for the paper's 25k + 15k + 30k steps",
    )
    args = parser.parse_args()
    gpu_step = load_gpu_step()
    bandwidth, pcie, latency = args.bandwidth_gbs * 1e9, args.pcie_gbs * 1e9, args.latency_ms * 1e-3
    print(f"B = {args.bandwidth_gbs:g} GB/s, P = {args.pcie_gbs:g} GB/s, a = {args.latency_ms:g} ms")
    for gpus in (8, 16, 64):
        c = gpu_step.allreduce_seconds(gpus, LORA_BYTES, bandwidth, pcie, latency)
        print(
            f"R=G all-reduce at {gpus} GPUs: {1000 * c:.1f} ms;"
            f" efficiency >= 0.90 needs a one-GPU step >= {9000 * c:.0f} ms"
        )
    # The assumed step split as the toy CPU step splits (score side 0.11 s : particle side 0.06 s per particle).
    score, particle = args.step_s * 0.11 / 0.17, args.step_s * 0.06 / 0.17
    seconds = {
        "render": particle * 0.4,
        "encode": particle * 0.1,
        "unet_cfg": score * 0.5,
        "unet_lora": score * 0.2,
        "lora_update": score * 0.3,
        "backward": particle * 0.5,
    }
    rows = gpu_step.project([{"particles": 1, "seconds": seconds}], LORA_BYTES, LATENT_BYTES, bandwidth, latency, pcie)
    print(f"assumed one-GPU step at p=1: {args.step_s} s, split { ({k: round(v, 3) for k, v in seconds.items()}) }")
    print("| GPUs | R | particles | step s | efficiency |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['gpus']} | {r['replicas']} | {r['particles']} | {r['step_s']:.3f} | {r['efficiency']:.3f} |")


if __name__ == "__main__":
    main()
