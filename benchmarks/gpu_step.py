"""pdray's own VSD step on one GPU, part by part, at Stable Diffusion 2.1 scale, and a weak-scaling projection.

No download and no Ray: the paper's two bases are SD 2.1's architecture with random weights
(``pdray.priors.random_sd``: SD 2.1-base, epsilon, for the score; SD 2.1, v-prediction, under the LoRA), written in
SD's folder layout and loaded back through ``pdray.priors.diffusion.load_prior``, as downloaded ones would be. The
run config is the ``prolificdreamer`` preset (hash grid, occupancy grid, per-chunk recompute, camera LoRA) at
``--resolution``; each step is ``pdray.run.local_executor.LocalExecutor.step``, what ``pdray run --executor local``
runs, and its parts are the times that step reports:

- render:        every particle's NeRF rendered at one shared camera (autograd kept)
- encode:        the VAE encoder on the renders, resized to 512 px (autograd kept)
- unet_cfg:      the frozen UNet with classifier-free guidance
- unet_lora:     the LoRA UNet's prediction (camera-conditioned)
- lora_update:   the LoRA's AdamW step on the detached latents
- backward:      every particle's backward through encoder and renderer, and its optimiser step

and the peak GPU memory (on a CPU: the process's peak RSS so far). Times are means over ``--steps`` steps after
``--warmup``; the step is bracketed by ``torch.cuda.synchronize`` and its parts end where pdray copies results to the
host, which synchronises.

Weak-scaling projection to G GPUs with p particles each (P = p G particles), from the measured times at p:

- R = G (one ScoreActor replica per GPU, serving its own p particles; the replicas all-reduce the LoRA gradient,
  S bytes, as pdray does it: through Ray's object store in three rounds of actor calls, a reduce-scatter and an
  all-gather (``pdray.vsd.allreduce``), so each replica moves 2 (G-1)/G S over its link of B bytes/s, copies its share
  to the host and the sum back over PCIe at P bytes/s, and waits a per round):
  T = render(p) + encode(p) + unet_cfg(p) + unet_lora(p) + lora_update(p) + backward(p)
      + 2 (G-1)/G S/B + 2 S/P + 3 a
  (the particle and score work of a GPU share it, so they add up; nothing is assumed to overlap)
- R = 1 (one ScoreActor on a GPU of its own serves all P latents; its work grows linearly, at the per-latent cost
  measured at the largest p; latents of L bytes go to it and gradients come back over its one link):
  T = render(p) + encode(p) + 2 P L / B + (unet_cfg + unet_lora)(P) + max(backward(p), lora_update(P))
  (the LoRA update overlaps the particles' backward, as the driver schedules them)

Throughput is P / T; efficiency is the one-GPU step time (all parts at p, no communication) over T.

    python benchmarks/gpu_step.py --resolution 512 --dtype fp16 --particles 1,2,4 --out OUT_DIR
    python benchmarks/gpu_step.py --tiny --resolution 64 --particles 1,2 --steps 1   # CPU smoke test
    python benchmarks/gpu_step.py --device cpu --dtype fp32 --resolution 64 --particles 1 --steps 2   # full size
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from pdray.config import RunConfig, load_config
from pdray.geometry.hashgrid import encoding_backend_name
from pdray.priors.diffusion import DiffusionPrior, load_prior
from pdray.priors.random_sd import write_random_sd
from pdray.run.local_executor import LocalExecutor

COMPONENTS = ("render", "encode", "unet_cfg", "unet_lora", "lora_update", "backward")
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
PROMPT = "a dslr photo of a pineapple"
GPU_COUNTS = (8, 16, 64)


def run_config(args: argparse.Namespace, folders: dict[str, Path], particles: int) -> RunConfig:
    """The ``prolificdreamer`` preset's NeRF stage at --resolution on the random SD 2.1 folders (tiny: a small grid)."""
    overrides = [
        f"particles={particles}",
        "stages=[nerf]",
        "executor=local",
        "wandb=off",
        f"prior.model={folders['prior']}",
        f"prior.dtype={DTYPES[args.dtype]}",
        f"lora.base={folders['lora']}",
        f"nerf.resolution={args.resolution}",
        f"nerf.n_samples={args.samples}",
        f"prompt={PROMPT}",
    ]
    if args.tiny:
        overrides += ["nerf.field.grid.n_levels=4", "nerf.field.grid.log2_hashmap_size=12"]
        overrides += ["nerf.field.grid.base_resolution=8", "nerf.field.grid.per_level_scale=2.0"]
        overrides += ["nerf.field.hidden_dim=16"]
    return load_config("prolificdreamer", overrides)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated since the last reset; on a CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


STATS = {c: f"time/{'unet' if c == 'unet_cfg' else c}" for c in COMPONENTS}
"""The stat of pdray's step that times each component."""


def measure(args: argparse.Namespace, folders: dict[str, Path], prior: DiffusionPrior, n: int) -> dict:
    """Per-component mean seconds and peak memory of pdray's VSD step with ``n`` particles on this device."""
    config = run_config(args, folders, n)
    if prior.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(prior.device)
    with tempfile.TemporaryDirectory() as run_dir:
        executor = LocalExecutor(config, Path(run_dir), prior=prior)
        seconds, wall, nonfinite = dict.fromkeys(COMPONENTS, 0.0), 0.0, 0
        for step in range(args.warmup + args.steps):
            sync(prior.device)
            started = time.perf_counter()
            stats = executor.step(step)
            sync(prior.device)
            if step >= args.warmup:
                wall += time.perf_counter() - started
                for component, key in STATS.items():
                    seconds[component] += stats[key]
                nonfinite += int(stats["nonfinite_dropped"])
        lora_parameters = sum(p.numel() for p in executor.score.lora.parameters())
    return {
        "particles": n,
        "seconds": {k: v / args.steps for k, v in seconds.items()},
        "step_s": wall / args.steps,
        "peak_memory_mb": peak_memory_mb(prior.device),
        "nonfinite_grads": nonfinite,
        "lora_parameters": lora_parameters,
    }


def allreduce_seconds(gpus: int, lora_bytes: int, bandwidth: float, pcie: float, latency: float) -> float:
    """One LoRA all-reduce over ``gpus`` replicas, as the module docstring models pdray's."""
    return 2 * (gpus - 1) / gpus * lora_bytes / bandwidth + 2 * lora_bytes / pcie + 3 * latency


def project(
    rows: list[dict], lora_bytes: int, latent_bytes: int, bandwidth: float, latency: float, pcie: float = 25e9
) -> list[dict]:
    """The weak-scaling projection of the module docstring, for every measured p and G in GPU_COUNTS."""
    measured = [r for r in rows if "seconds" in r]
    if not measured:
        return []
    largest = max(measured, key=lambda r: r["particles"])
    per_latent_score = (largest["seconds"]["unet_cfg"] + largest["seconds"]["unet_lora"]) / largest["particles"]
    per_latent_lora_update = largest["seconds"]["lora_update"] / largest["particles"]
    out = []
    for row in measured:
        p, s = row["particles"], row["seconds"]
        one_gpu = sum(s.values())
        for gpus in GPU_COUNTS:
            total = p * gpus
            replicated = one_gpu + allreduce_seconds(gpus, lora_bytes, bandwidth, pcie, latency)
            single = (
                s["render"]
                + s["encode"]
                + 2 * total * latent_bytes / bandwidth
                + per_latent_score * total
                + max(s["backward"], per_latent_lora_update * total)
            )
            for replicas, step in (("1", single), ("G", replicated)):
                out.append(
                    {
                        "particles_per_gpu": p,
                        "gpus": gpus,
                        "replicas": replicas,
                        "particles": total,
                        "step_s": step,
                        "particles_per_s": total / step,
                        "efficiency": one_gpu / step,
                    }
                )
    return out


def markdown(report: dict) -> str:
    """The component table and the projection table, as markdown."""
    lines = [
        f"SD 2.1-shaped prior (random weights), {report['config']['dtype']}, {report['config']['resolution']} px, "
        f"{report['config']['samples']} samples per ray, hash grid backend {report['config']['grid_backend']}, "
        f"device {report['device']}",
        "",
        "| particles | " + " | ".join(f"{c} ms" for c in COMPONENTS) + " | step ms | peak memory MB |",
        "|---" * (len(COMPONENTS) + 3) + "|",
    ]
    for row in report["components"]:
        if "seconds" in row:
            cells = [f"{1000 * row['seconds'][c]:.1f}" for c in COMPONENTS]
            lines.append(
                f"| {row['particles']} | {' | '.join(cells)} | {1000 * row['step_s']:.1f} | "
                f"{row['peak_memory_mb']:.0f} |"
            )
        else:
            lines.append(f"| {row['particles']} | {row['error']} |")
    lines += [
        "",
        report["projection"]["model"],
        "",
        "| p per GPU | GPUs | R | particles | step s | particles/s | efficiency |",
    ]
    lines.append("|---" * 7 + "|")
    for r in report["projection"]["rows"]:
        lines.append(
            f"| {r['particles_per_gpu']} | {r['gpus']} | {r['replicas']} | {r['particles']} | {r['step_s']:.3f} | "
            f"{r['particles_per_s']:.1f} | {r['efficiency']:.2f} |"
        )
    checks = report["checks"]
    lines += ["", *(f"- {k}: {v}" for k, v in checks.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny widths of the same layout (CPU smoke test)")
    parser.add_argument("--particles", default="1,2,4", help="particles per GPU, comma-separated")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="the frozen prior's precision")
    parser.add_argument("--resolution", type=int, default=512, help="NeRF render resolution (pixels)")
    parser.add_argument("--samples", type=int, default=512, help="most samples per ray (the preset's 512)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per particle count")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--prior-dir", type=Path, default=None, help="where the random SD 2.1 folders are written")
    parser.add_argument("--bandwidth-gbs", type=float, default=5.0, help="object-store bandwidth per replica, GB/s")
    parser.add_argument("--pcie-gbs", type=float, default=25.0, help="GPU <-> host copy bandwidth, GB/s")
    parser.add_argument("--latency-ms", type=float, default=2.0, help="latency per round of actor calls, ms")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_step.json and gpu_step.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    started = time.perf_counter()
    root = args.prior_dir or Path(tempfile.mkdtemp(prefix="pdray-sd21-"))
    size = "tiny" if args.tiny else "full"
    folders = {base: write_random_sd(root / base, size, base, device) for base in ("prior", "lora")}
    built = time.perf_counter()
    prior = load_prior(run_config(args, folders, 1).prior, device=device)
    loaded = time.perf_counter()
    resident = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None

    rows = []
    for n in [int(p) for p in args.particles.split(",")]:
        try:
            rows.append(measure(args, folders, prior, n))
        except torch.cuda.OutOfMemoryError:
            rows.append({"particles": n, "error": "out of GPU memory"})
        print(f"particles {n}: {json.dumps(rows[-1])}", flush=True)

    lora_parameters = next((r["lora_parameters"] for r in rows if "lora_parameters" in r), 0)
    lora_bytes = 4 * lora_parameters  # float32 gradients
    latent_bytes = 4 * prior.latent_channels * (prior.image_resolution // prior.vae_scale) ** 2  # renders encode at 512
    bandwidth, pcie, latency = args.bandwidth_gbs * 1e9, args.pcie_gbs * 1e9, args.latency_ms * 1e-3
    exchange = allreduce_seconds(max(GPU_COUNTS), lora_bytes, bandwidth, pcie, latency)
    model_text = (
        f"Projection (measured per-GPU times at p; LoRA gradient S = {lora_bytes / 2**20:.2f} MiB float32, latent "
        f"L = {latent_bytes / 2**10:.0f} KiB, object-store bandwidth B = {args.bandwidth_gbs:g} GB/s, PCIe "
        f"P = {args.pcie_gbs:g} GB/s, latency a = {args.latency_ms:g} ms per round of actor calls). R=G: T = render "
        f"+ encode + unet_cfg + unet_lora + lora_update + backward (all at p) + 2(G-1)/G S/B + 2 S/P + 3 a. R=1 "
        f"(score actor on its own GPU, work linear in P = pG at the per-latent cost of the largest p): T = render(p) "
        f"+ encode(p) + 2 P L/B + (unet_cfg + unet_lora)(P) + max(backward(p), lora_update(P)). Efficiency = "
        f"one-GPU step at p / T. With R=G at {max(GPU_COUNTS)} GPUs the all-reduce takes {1000 * exchange:.1f} ms: "
        f"efficiency >= 90% wherever the one-GPU step is at least {9000 * exchange:.0f} ms."
    )
    report = {
        "config": {
            "tiny": args.tiny,
            "dtype": args.dtype,
            "resolution": args.resolution,
            "samples": args.samples,
            "steps": args.steps,
            "warmup": args.warmup,
            "grid_backend": encoding_backend_name("auto") if device.type == "cuda" else "torch",
            "lora_parameters": lora_parameters,
            "unet_parameters": sum(p.numel() for p in prior.unet.parameters()),
        },
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "setup": {
            "build_s": built - started,
            "load_s": loaded - built,
            "resident_memory_mb": resident,
        },
        "components": rows,
        "projection": {"model": model_text, "rows": project(rows, lora_bytes, latent_bytes, bandwidth, latency, pcie)},
        "checks": {
            "ray imported": "ray" in sys.modules,
        },
    }
    text = markdown(report)
    print(text, flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_step.json").write_text(json.dumps(report, indent=2))
        (args.out / "gpu_step.md").write_text(text)
    return report


if __name__ == "__main__":
    main()
