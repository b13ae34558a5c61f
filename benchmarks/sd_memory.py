"""GPU memory of VSD at Stable Diffusion 2.1 scale, estimated on a CPU: how many particles fit on one 80 GB GPU?

Without a GPU, peak GPU memory cannot be read, but what dominates it can be counted exactly: the weights, and the
activations autograd keeps for backward. This script runs each differentiable part of a VSD step for real on the
CPU, in 16-bit where the GPU runs 16-bit, and sums the bytes of every tensor saved for backward
(``torch.autograd.graph.saved_tensors_hooks``, each storage counted once):

- nerf:        one particle's NeRF render as the ``prolificdreamer`` preset runs it (pdray's torch hash grid in
               float32, the occupancy grid with early termination, activations recomputed per chunk of 2^18
               samples), from the blob it starts as, at --render-resolution, scaled to --resolution by the ray
               count (a render's activations are per ray sample); plus one chunk's recompute in the backward;
- vae_encode:  the VAE encoder on one render at --resolution (the particle actor keeps it until the backward);
- lora_unet:   the LoRA UNet's training forward on one latent (the score replica's LoRA update), rank 4 on every
               attention projection, with the camera embedding.

and adds the resident weights (the two UNets of the paper's two bases, SD 2.1-base for the score and SD 2.1 under
the LoRA, text encoder and VAE in 16-bit; LoRA, camera MLP and AdamW moments in float32).
Per GPU with a replica and its particles (R = #GPUs, the particle actor and replica sharing the GPU):

    memory(p) = weights + p (nerf + vae_encode + lora_unet) + context
    (context: a CUDA context per process, stated, not measured; the frozen UNet's CFG forward runs without grad and
    keeps nothing).

Not counted: allocator fragmentation and transient workspaces (attention, convolution), which are why the answer is
an estimate. The CPU's attention kernels save what the GPU's fused ones save (no attention matrix).

    python benchmarks/sd_memory.py [--resolution 512] [--render-resolution 128] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from pdray.priors.random_sd import sd21_configs

GPU_GB = 80.0
CONTEXT_GB = 0.6  # a CUDA context with cuBLAS/cuDNN handles, per process (two processes: particle actor, replica)


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward while the block runs, the module's own weights
    (resident anyway) left out."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.storages: dict[int, int] = {}
        self.weights = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}

    @contextmanager
    def counting(self):
        def pack(t: torch.Tensor):
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.weights:
                self.storages[storage.data_ptr()] = max(self.storages.get(storage.data_ptr(), 0), storage.nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield self

    @property
    def gb(self) -> float:
        return sum(self.storages.values()) / 1e9


def nbytes(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 1e9


def lora_unet_saved(configs: dict, dtype: torch.dtype, latent: int) -> tuple[float, float, float, int]:
    """(saved GB of one latent's LoRA training forward, UNet weights GB, LoRA + camera + AdamW GB, LoRA params)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import TimestepEmbedding
    from peft import LoraConfig

    from pdray.vsd.lora import CAMERA_DIM, TARGET_MODULES

    unet = UNet2DConditionModel(**configs["unet"]).to(dtype).requires_grad_(False).eval()
    weights = nbytes(unet)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGET_MODULES))
    camera = TimestepEmbedding(CAMERA_DIM, unet.time_embedding.linear_2.out_features).to(dtype)
    unet.class_embedding = camera
    trained = [p for n, p in unet.named_parameters() if "lora_" in n] + list(camera.parameters())
    for p in trained:
        p.requires_grad_(True)
    n_trained = sum(p.numel() for p in trained)
    x = torch.randn(1, 4, latent, latent, dtype=dtype)
    cond = torch.randn(1, 77, configs["unet"]["cross_attention_dim"], dtype=dtype)
    counter = SavedBytes(unet)
    with counter.counting():
        out = unet(x, torch.tensor([500]), encoder_hidden_states=cond, class_labels=torch.randn(1, 16, dtype=dtype))
    out.sample.float().square().mean().backward()  # the step runs: nothing saved was a dead end
    return counter.gb, weights, 4 * 4 * n_trained / 1e9, n_trained  # weights, grads, Adam m and v in float32


def vae_encode_saved(configs: dict, dtype: torch.dtype, resolution: int) -> tuple[float, float]:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**configs["vae"]).to(dtype).requires_grad_(False).eval()
    image = torch.rand(1, 3, resolution, resolution, dtype=dtype, requires_grad=True)
    counter = SavedBytes(vae)
    with counter.counting():
        z = vae.encode(image).latent_dist.sample()
    z.float().sum().backward()
    return counter.gb, nbytes(vae)


def nerf_saved(resolution: int, measured_at: int, cameras: int = 4) -> dict:
    """The paper preset's NeRF render (``configs/prolificdreamer.yaml``: hash grid, occupancy grid with early
    termination, activations recomputed per chunk), from its blob initialisation after the grid's first refresh,
    measured at ``measured_at`` px and scaled to ``resolution`` by the ray count; the largest over ``cameras`` cameras
    drawn from the preset's ranges, and the nearest, narrowest camera the ranges allow (the blob fills the frame)."""
    from types import SimpleNamespace

    from pdray.config import load_config
    from pdray.render.cameras import CameraRanges, Cameras, sample_cameras
    from pdray.vsd.particle import NeRFParticle

    config = load_config("prolificdreamer", [f"nerf.resolution={measured_at}"])
    particle = NeRFParticle(config, SimpleNamespace(device=torch.device("cpu")), 0)  # the render needs no prior
    particle.occupancy.update(0, particle.field.density, particle.step_size, torch.Generator().manual_seed(0))
    c = config.camera
    drawn = sample_cameras(cameras, CameraRanges(c.elevation, c.azimuth, c.distance, c.fov), torch.Generator())
    views = [drawn.index([i]) for i in range(cameras)]
    views.append(Cameras(*(torch.tensor([v]) for v in (c.elevation[0], 0.0, c.distance[0], c.fov[0]))))
    worst = {"saved_gb": 0.0}
    scale = (resolution / measured_at) ** 2
    for view in views:
        counter = SavedBytes(particle.field)
        with counter.counting():
            out = particle.render(view, torch.Generator().manual_seed(0))
        out.rgb.sum().backward()
        samples = len(out.ray_index)
        saved = (counter.gb + 12 * samples / 1e9) * scale  # the points each recomputed chunk keeps
        if saved > worst["saved_gb"]:
            worst = {"saved_gb": saved, "samples_per_ray": samples / measured_at**2, "samples": samples * scale}
    chunk = config.nerf.recompute_chunk
    counter = SavedBytes(particle.field)
    points = torch.rand(chunk, 3) * 0.6 - 0.3
    with counter.counting():  # one chunk's forward as the backward recomputes it
        density, albedo = particle.field(points)
    (density.sum() + albedo.sum()).backward()
    return worst | {
        "recompute_chunk_gb": counter.gb,
        "kept_bytes_per_sample_without_recompute": counter.gb * 1e9 / chunk,
        "occupied_fraction": particle.occupancy.occupied_fraction,
    }


def text_encoder_gb(configs: dict, dtype: torch.dtype) -> float:
    from transformers import CLIPTextConfig, CLIPTextModel

    return nbytes(CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])).to(dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=512, help="render and VAE resolution (pixels)")
    parser.add_argument("--render-resolution", type=int, default=128, help="NeRF render measured, then scaled")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16  # the GPU's float16 has the same size; bfloat16 is what this CPU runs fast
    configs = sd21_configs("full", "lora")  # the LoRA's base; SD 2.1-base has the same UNet, VAE and text encoder
    started = time.perf_counter()
    timings = {}

    def timed(name, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        timings[name] = round(time.perf_counter() - t, 1)
        print(f"{name}: {out} ({timings[name]} s)", flush=True)
        return out

    nerf_report = timed("nerf", nerf_saved, args.resolution, args.render_resolution)
    nerf = nerf_report["saved_gb"] + nerf_report["recompute_chunk_gb"]
    vae_act, vae_w = timed("vae_encode", vae_encode_saved, configs, dtype, args.resolution)
    lora_act, unet_w, lora_state, lora_params = timed(
        "lora_unet", lora_unet_saved, configs, dtype, args.resolution // 8
    )
    text_w = timed("text_encoder", text_encoder_gb, configs, dtype)
    weights = 2 * unet_w + text_w + 2 * vae_w + lora_state  # two bases; the particle actor holds its own VAE
    per_particle = nerf + vae_act + lora_act
    fits = int((GPU_GB - weights - 2 * CONTEXT_GB) // per_particle)
    report = {
        "resolution": args.resolution,
        "nerf_measured_at": args.render_resolution,
        "nerf": nerf_report,
        "per_particle_gb": {"nerf": nerf, "vae_encode": vae_act, "lora_unet": lora_act, "total": per_particle},
        "resident_gb": {
            "unets_x2": 2 * unet_w,
            "text_encoder": text_w,
            "vae_x2": 2 * vae_w,
            "lora_and_adamw": lora_state,
        },
        "lora_parameters": lora_params,
        "lora_gradient_mib": 4 * lora_params / 2**20,
        "context_gb": 2 * CONTEXT_GB,
        "particles_per_80gb_gpu": fits,
        "memory_gb": {p: weights + 2 * CONTEXT_GB + p * per_particle for p in (1, 2, 4, 8)},
        "seconds": timings | {"total": round(time.perf_counter() - started, 1)},
    }
    print(json.dumps(report, indent=2))
    print(
        f"\nper particle {per_particle:.2f} GB (NeRF {nerf:.2f}, VAE encode {vae_act:.2f}, LoRA UNet {lora_act:.2f});"
        f" resident {weights:.2f} GB + contexts {2 * CONTEXT_GB:.1f} GB -> {fits} particles per {GPU_GB:g} GB GPU"
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sd_memory.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
