"""One VSD step on one GPU, component by component, at Stable Diffusion 2.1 scale, and a weak-scaling projection.

No download and no Ray: the prior is SD 2.1's architecture with random weights (its UNet, VAE and CLIP text encoder
configs, a small BPE tokenizer, the v-prediction scheduler), written in SD's folder layout and loaded back through
``pdray.priors.diffusion.load_prior``, as a downloaded SD 2.1 would be. The particles are pdray's NeRF particles
(the paper's hash grid, tinycudann when it imports on CUDA, else the torch grid) rendered at ``--resolution``.

For 1, 2 and 4 particles per GPU it times each part of a VSD step as the particle and score actors run it:

- render:        every particle's NeRF rendered at one shared camera (autograd kept)
- encode:        the VAE encoder on the renders (autograd kept), on the particle actor
- unet_cfg:      the frozen UNet with classifier-free guidance (one batched call of 2 x particles)
- unet_lora:     the LoRA UNet's prediction (camera-conditioned, no CFG)
- lora_update:   one AdamW step of the LoRA's diffusion loss on the detached latents
- backward:      every particle's backward through encoder and renderer, and its optimiser step

and the peak GPU memory (on a CPU: the process's peak RSS so far). Times are means over ``--steps`` steps after
``--warmup``, each part bracketed by ``torch.cuda.synchronize``.

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
"""

from __future__ import annotations

import argparse
import json
import resource
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

from pdray.config import LoraConfig, NerfConfig, PriorConfig, RunConfig
from pdray.geometry.hashgrid import GridConfig, encoding_backend_name
from pdray.geometry.nerf import FieldConfig
from pdray.priors.diffusion import DiffusionPrior, load_prior
from pdray.render.cameras import CameraRanges, sample_cameras
from pdray.rng import SHARED, Purpose, Stage, stream
from pdray.vsd.distill import drop_nonfinite, sample_timesteps, surrogate_loss, vsd_grad
from pdray.vsd.lora import CameraLoRA
from pdray.vsd.particle import NeRFParticle, ParticleGroup
from pdray.vsd.score import ScoreEstimator

COMPONENTS = ("render", "encode", "unet_cfg", "unet_lora", "lora_update", "backward")
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
PROMPT = "a dslr photo of a pineapple"
GPU_COUNTS = (8, 16, 64)


def sd21_configs(tiny: bool) -> dict[str, dict]:
    """Constructor arguments of SD 2.1's UNet, VAE and text encoder (``tiny``: the same layout, tiny widths)."""
    unet = {
        "sample_size": 96,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 1024,
        "attention_head_dim": (5, 10, 20, 20),
        "use_linear_projection": True,
        "upcast_attention": True,
        "norm_num_groups": 32,
    }
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 768,
        "scaling_factor": 0.18215,
    }
    text = {
        "vocab_size": 49408,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 23,
        "num_attention_heads": 16,
        "max_position_embeddings": 77,
        "projection_dim": 512,
        "hidden_act": "gelu",
    }
    if tiny:
        unet |= {
            "block_out_channels": (8, 16, 16, 16),
            "layers_per_block": 1,
            "cross_attention_dim": 16,
            "attention_head_dim": (1, 2, 2, 2),
            "norm_num_groups": 4,
        }
        vae |= {"block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 4}
        text |= {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    return {"unet": unet, "vae": vae, "text_encoder": text}


def build_tokenizer(words: list[str]):
    """A CLIP BPE tokenizer over lowercase letters, with merges that make each of ``words`` one token."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        merged = symbols[0]
        for symbol in symbols[1:]:
            if (merged, symbol) not in merges:
                merges.append((merged, symbol))
            merged += symbol
            vocab.setdefault(merged, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_sd21_folder(folder: Path, tiny: bool, device: torch.device) -> Path:
    """Write an SD 2.1-shaped pipeline with random weights in SD's folder layout (model_index.json, unet/, vae/,
    text_encoder/, tokenizer/, scheduler/), weights in float16; a folder already written is reused."""
    if (folder / "model_index.json").exists():
        return folder
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = sd21_configs(tiny)
    tokenizer = build_tokenizer(PROMPT.split())
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU takes seconds where the CPU takes a minute
        parts = {
            "unet": UNet2DConditionModel(**configs["unet"]),
            "vae": AutoencoderKL(**configs["vae"]),
            "text_encoder": CLIPTextModel(
                CLIPTextConfig(
                    **configs["text_encoder"],
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            ),
        }
    for name, module in parts.items():
        module.to(torch.float16).save_pretrained(folder / name)
    tokenizer.save_pretrained(folder / "tokenizer")
    DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
        steps_offset=1,
    ).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def run_config(args: argparse.Namespace, model: Path, particles: int, particle_score: str = "lora") -> RunConfig:
    """The run config of the measured step: the paper's NeRF (hash grid) at --resolution, VSD with a LoRA."""
    grid = (
        GridConfig(n_levels=4, log2_hashmap_size=12, base_resolution=8, per_level_scale=2.0)
        if args.tiny
        else GridConfig()
    )
    return RunConfig(
        prompt=PROMPT,
        particles=particles,
        particle_score=particle_score,
        stages=["nerf"],
        executor="local",
        wandb="off",
        prior=PriorConfig(model=str(model), dtype=DTYPES[args.dtype], view_dependent_prompting=False),
        lora=LoraConfig(rank=4, alpha=4.0),
        nerf=NerfConfig(
            field=FieldConfig(grid=grid, hidden_dim=16 if args.tiny else 64),
            resolution=args.resolution,
            n_samples=args.samples,
        ),
    )


class Clock:
    """Seconds per component, each call bracketed by device synchronisation so GPU work is counted where it runs."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, dict.fromkeys(COMPONENTS, 0.0)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, name: str, fn, *args, **kwargs):
        self.sync()
        started = time.perf_counter()
        out = fn(*args, **kwargs)
        self.sync()
        self.seconds[name] += time.perf_counter() - started
        return out


def vsd_step(step: int, config: RunConfig, prior: DiffusionPrior, lora: CameraLoRA, particles: list, clock: Clock):
    """One VSD step of ``particles`` on one device, the work of ParticleGroup.render / ScoreEstimator.grads /
    ParticleGroup.apply / ScoreEstimator.lora_update in that order, each part timed. Returns non-finite grads."""
    c = config.camera
    cameras = sample_cameras(
        1,
        CameraRanges(c.elevation, c.azimuth, c.distance, c.fov),
        stream(config.seed, Stage.NERF, Purpose.CAMERA, SHARED, step),
    )
    device_generator = torch.Generator(prior.device).manual_seed(step)
    renders = [clock("render", p.render, cameras, device_generator) for p in particles]
    latents = [clock("encode", prior.encode, r.rgb.permute(0, 3, 1, 2)) for r in renders]

    z = torch.cat(latents).detach().float()
    n = z.shape[0]
    c2w = cameras.c2w().to(prior.device).expand(n, 4, 4)
    generator = stream(config.seed, Stage.NERF, Purpose.SCORE, SHARED, step)
    t = sample_timesteps(n, config.t_range.start, prior.num_train_timesteps, generator).to(prior.device)
    noise = torch.randn(z.shape, generator=generator).to(prior.device)
    x_t, a = prior.add_noise(z, noise, t), prior.alpha_bar(t)
    cond, uncond = prior.embed([config.prompt] * n), prior.embed([config.negative_prompt] * n)
    with torch.no_grad():
        eps_pre = clock("unet_cfg", prior.predict_eps, x_t, t, cond, uncond, config.cfg)
        eps_lora = clock("unet_lora", lora.predict_eps, x_t, t, cond, c2w, uncond)
    grads, nonfinite = drop_nonfinite(vsd_grad(eps_pre, eps_lora, a))

    def backward() -> None:
        for particle, z_i, g_i in zip(particles, latents, grads.split(1), strict=True):
            loss = surrogate_loss(z_i, g_i.to(z_i.dtype)) + particle.regularisation()
            particle.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            particle.optimizer.step()

    clock("backward", backward)
    draw = lora.draw(z, stream(config.seed, Stage.NERF, Purpose.LORA, SHARED, step))
    clock("lora_update", lora.train_step, z, cond, c2w, draw, config.score_batch_size)
    return nonfinite


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated since the last reset; on a CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args: argparse.Namespace, model: Path, prior: DiffusionPrior, lora: CameraLoRA, n: int) -> dict:
    """Per-component mean seconds and peak memory of a VSD step with ``n`` particles on this device."""
    config = run_config(args, model, n)
    if prior.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(prior.device)
    particles = [NeRFParticle(config, prior, pid) for pid in range(n)]
    clock, nonfinite = Clock(prior.device), 0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            clock.seconds = dict.fromkeys(COMPONENTS, 0.0)
        nonfinite += vsd_step(step, config, prior, lora, particles, clock)
    seconds = {k: v / args.steps for k, v in clock.seconds.items()}
    return {
        "particles": n,
        "seconds": seconds,
        "step_s": sum(seconds.values()),
        "peak_memory_mb": peak_memory_mb(prior.device),
        "nonfinite_grads": nonfinite,
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


def end_to_end_check(args: argparse.Namespace, model: Path, prior: DiffusionPrior) -> str:
    """One step through pdray's own ParticleGroup and ScoreEstimator (Gaussian particle score, so the prior's UNet
    takes no second adapter): what the actors run, with their device handling."""
    try:
        config = run_config(args, model, 1, particle_score="gaussian")
        group = ParticleGroup(config, [0], prior)
        started = time.perf_counter()
        out, _ = group.render(0)
        grads, _ = ScoreEstimator(config, prior).grads(0, out)
        group.apply(0, grads[0])
        return f"ok ({time.perf_counter() - started:.2f} s)"
    except Exception as error:  # reported, not raised: the component timings stand on their own
        return f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny widths of the same layout (CPU smoke test)")
    parser.add_argument("--particles", default="1,2,4", help="particles per GPU, comma-separated")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="the frozen prior's precision")
    parser.add_argument("--resolution", type=int, default=512, help="NeRF render resolution (pixels)")
    parser.add_argument("--samples", type=int, default=32, help="samples per ray")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per particle count")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--prior-dir", type=Path, default=None, help="where the random SD 2.1 folder is written")
    parser.add_argument("--bandwidth-gbs", type=float, default=5.0, help="object-store bandwidth per replica, GB/s")
    parser.add_argument("--pcie-gbs", type=float, default=25.0, help="GPU <-> host copy bandwidth, GB/s")
    parser.add_argument("--latency-ms", type=float, default=2.0, help="latency per round of actor calls, ms")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_step.json and gpu_step.md")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    started = time.perf_counter()
    folder = args.prior_dir or Path(tempfile.mkdtemp(prefix="pdray-sd21-"))
    model = build_sd21_folder(folder, args.tiny, device)
    built = time.perf_counter()
    prior = load_prior(run_config(args, model, 1).prior, device=device)
    lora = CameraLoRA(prior, run_config(args, model, 1).lora)
    loaded = time.perf_counter()
    resident = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None

    rows = []
    for n in [int(p) for p in args.particles.split(",")]:
        try:
            rows.append(measure(args, model, prior, lora, n))
        except torch.cuda.OutOfMemoryError:
            rows.append({"particles": n, "error": "out of GPU memory"})
        print(f"particles {n}: {json.dumps(rows[-1])}", flush=True)

    lora_bytes = sum(p.numel() * 4 for p in lora.parameters())  # float32 gradients
    latent_bytes = 4 * prior.latent_channels * (args.resolution // prior.vae_scale) ** 2
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
            "lora_parameters": sum(p.numel() for p in lora.parameters()),
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
            "ParticleGroup + ScoreEstimator step on this device": end_to_end_check(args, model, prior),
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
