"""CameraLoRA: the score model of the particles' own render distribution (VSD's eps_phi).

A peft LoRA on the UNet's attention projections plus a camera embedding (the flattened 4x4 camera-to-world
matrix mapped into the time-embedding space, plugged in as diffusers' class embedding). With base "same"
the LoRA sits on the prior's own UNet: the pretrained prediction comes from the same weights with the
adapter disabled and no camera embedding, so nothing leaks and no second copy is held in memory.
With another base (the paper: SD 2.1 v-prediction beside SD 2.1-base) a separate UNet carries the LoRA.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models.embeddings import TimestepEmbedding
from peft import LoraConfig as PeftLoraConfig

from pdray.config import LoraConfig
from pdray.priors.diffusion import DiffusionPrior, resolve_model, v_from_eps
from pdray.types import LoraGrads
from pdray.vsd.allreduce import sum_in_order
from pdray.vsd.distill import lora_loss

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
CAMERA_DIM = 16


@dataclass
class LoraDraw:
    """The random inputs of one LoRA training step: timesteps [B], noise [B, C, h, w], camera keep-mask [B]."""

    t: torch.Tensor
    noise: torch.Tensor
    keep: torch.Tensor

    @staticmethod
    def cat(draws: list[LoraDraw]) -> LoraDraw:
        return LoraDraw(*(torch.cat([getattr(d, k) for d in draws]) for k in ("t", "noise", "keep")))


class CameraLoRA:
    """LoRA + camera embedding on a UNet, with its own AdamW; predicts eps and trains on particle latents."""

    def __init__(self, prior: DiffusionPrior, config: LoraConfig, init_seed: int = 0):
        """``init_seed`` seeds the adapter's initial weights (torch's global state is put back afterwards)."""
        self.prior, self.config = prior, config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            self._build()

    def _build(self) -> None:
        prior, config = self.prior, self.config
        if config.base == "same":
            self.unet, self.prediction_type = prior.unet, prior.prediction_type
        else:
            source, local = resolve_model(config.base)
            self.unet = UNet2DConditionModel.from_pretrained(
                source, subfolder="unet", torch_dtype=prior.dtype, local_files_only=True if local else None
            )
            self.unet.to(prior.device).requires_grad_(False).eval()
            self.prediction_type = DDPMScheduler.from_pretrained(source, subfolder="scheduler").config.prediction_type
        if self.unet.class_embedding is not None:
            raise ValueError(f"{config.base}: the UNet already has a class embedding; the camera cannot be added")
        self.unet.add_adapter(
            PeftLoraConfig(
                r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian", target_modules=TARGET_MODULES
            )
        )
        self.unet.disable_adapters()
        time_dim = self.unet.time_embedding.linear_2.out_features
        self.camera_embedding = TimestepEmbedding(CAMERA_DIM, time_dim).to(prior.device)
        torch.nn.init.zeros_(self.camera_embedding.linear_2.weight)  # starts as the base model exactly
        torch.nn.init.zeros_(self.camera_embedding.linear_2.bias)
        self.lora_parameters = [p for n, p in self.unet.named_parameters() if "lora_" in n]
        for p in self.lora_parameters:
            p.data = p.data.float()  # train the LoRA in float32 even on a float16 UNet
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=config.lr)

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.lora_parameters + list(self.camera_embedding.parameters())

    @contextmanager
    def active(self) -> Iterator[torch.nn.Module]:
        """The UNet with the adapter and camera embedding switched on; both are off again on exit."""
        self.unet.enable_adapters()
        self.unet.class_embedding = self.camera_embedding if self.config.camera_condition else None
        try:
            yield self.unet
        finally:
            self.unet.class_embedding = None
            self.unet.disable_adapters()

    def _camera_labels(self, c2w: torch.Tensor) -> torch.Tensor | None:
        return (
            c2w.reshape(-1, CAMERA_DIM).to(self.prior.device, torch.float32) if self.config.camera_condition else None
        )

    def _to_eps(self, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            a = self.prior.alpha_bar(t)
            return a.sqrt() * out.float() + (1 - a).sqrt() * x_t.float()
        return out.float()

    def _forward(self, unet, x_t, t, cond, labels) -> torch.Tensor:
        dtype = self.prior.dtype
        return unet(x_t.to(dtype), t, encoder_hidden_states=cond.to(dtype), class_labels=labels).sample

    @torch.no_grad()
    def predict_eps(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        c2w: torch.Tensor,
        uncond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """eps_lora(x_t, t, c, y): x_t [B, C, h, w], t [B], cond [B, L, D], c2w [B, 4, 4] -> float32 eps."""
        labels = self._camera_labels(c2w)
        with self.active() as unet:
            if self.config.cfg == 1.0 or uncond is None:
                return self._to_eps(x_t, self._forward(unet, x_t, t, cond, labels), t)
            both_labels = None if labels is None else torch.cat([labels, labels])
            out = self._forward(unet, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond]), both_labels)
            eps_u, eps_c = self._to_eps(torch.cat([x_t, x_t]), out, torch.cat([t, t])).chunk(2)
            return eps_u + self.config.cfg * (eps_c - eps_u)

    def draw(self, latents: torch.Tensor, generator: torch.Generator) -> LoraDraw:
        """The random part of a training step for ``latents`` [B, ...]: timesteps, noise and camera keep-mask."""
        b = latents.shape[0]
        t = torch.randint(0, self.prior.num_train_timesteps, (b,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        keep = torch.rand(b, generator=generator) >= self.config.camera_dropout
        return LoraDraw(t, noise, keep)

    def loss_grads(
        self, latents: torch.Tensor, cond: torch.Tensor, c2w: torch.Tensor, draw: LoraDraw, batch_size: int
    ) -> LoraGrads:
        """The gradient of the diffusion loss summed over ``latents`` (detached particle latents with the draw's t
        and noise; camera dropped where the draw says), in chunks of at most ``batch_size`` latents: the batch size
        bounds memory and does not change the result. Parameters are not touched (``apply_grads`` steps)."""
        device = self.prior.device
        latents = latents.detach().to(device, torch.float32)
        params = self.parameters()
        for p in params:
            p.grad = None
        total = 0.0
        with self.active() as unet:  # backward inside: peft freezes LoRA weights again on exit
            for s in range(0, latents.shape[0], batch_size):
                sl = slice(s, s + batch_size)
                t, noise = draw.t[sl].to(device), draw.noise[sl].to(device)
                x_t = self.prior.add_noise(latents[sl], noise, t)
                labels = self._camera_labels(c2w[sl])
                if labels is not None:
                    labels = labels * draw.keep[sl].to(labels)[:, None]
                target = noise if self.prediction_type == "epsilon" else v_from_eps(x_t, noise, self.prior.alpha_bar(t))
                loss = lora_loss(self._forward(unet, x_t, t, cond[sl], labels), target) * x_t.shape[0]
                loss.backward()
                total += float(loss.detach())
        flat = torch.cat(
            [torch.zeros(p.numel(), device=device) if p.grad is None else p.grad.flatten() for p in params]
        )
        for p in params:
            p.grad = None
        return LoraGrads(flat.float(), total, latents.shape[0])

    def apply_grads(self, *parts: LoraGrads) -> float:
        """One AdamW step on the mean loss over every latent of ``parts`` (summed in the order given, so replicas
        that apply the same parts hold the same LoRA, bit for bit). Returns that mean loss."""
        grad_sum = sum_in_order([part.grad for part in parts])
        return self.apply_summed(grad_sum, sum(part.loss_sum for part in parts), sum(part.count for part in parts))

    def apply_summed(self, grad_sum: torch.Tensor, loss_sum: float, count: int) -> float:
        """One AdamW step with the gradient ``grad_sum / count`` (grad_sum: [N], the loss gradients of ``count``
        latents summed, in ``parameters()`` order); returns the mean loss ``loss_sum / count``."""
        if count == 0:
            raise ValueError("apply_summed: no latents in the gradient")
        params = self.parameters()
        if grad_sum.numel() != sum(p.numel() for p in params):
            raise ValueError(f"apply_summed: {grad_sum.numel()} gradient values for {sum(p.numel() for p in params)}")
        offset = 0
        for p in params:
            piece = grad_sum[offset : offset + p.numel()].to(p.device, torch.float32)
            p.grad = (piece / count).view_as(p).to(p.dtype)
            offset += p.numel()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / count

    def train_step(
        self, latents: torch.Tensor, cond: torch.Tensor, c2w: torch.Tensor, draw: LoraDraw, batch_size: int
    ) -> float:
        """One AdamW step of the diffusion loss averaged over every latent; returns the loss."""
        return self.apply_grads(self.loss_grads(latents, cond, c2w, draw, batch_size))

    def digest(self) -> str:
        """A hash of the LoRA weights and camera embedding: replicas that hold one LoRA have equal digests."""
        h = hashlib.blake2b(digest_size=8)
        for key, value in sorted(self.state_tensors().items()):
            h.update(key.encode())
            h.update(value.float().numpy().tobytes())
        return h.hexdigest()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """LoRA weights and camera embedding by name (safetensors-ready)."""
        names = {id(p): n for n, p in self.unet.named_parameters() if "lora_" in n}
        out = {f"lora.{names[id(p)]}": p.detach().cpu().contiguous() for p in self.lora_parameters}
        out.update(
            {f"camera.{k}": v.detach().cpu().contiguous() for k, v in self.camera_embedding.state_dict().items()}
        )
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(self.unet.named_parameters())
        with torch.no_grad():
            for key, value in tensors.items():
                if key.startswith("lora."):
                    params[key[len("lora.") :]].copy_(value)
        self.camera_embedding.load_state_dict(
            {k[len("camera.") :]: v for k, v in tensors.items() if k.startswith("camera.")}
        )
