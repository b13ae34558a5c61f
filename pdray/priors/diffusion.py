"""DiffusionPrior: any Stable-Diffusion-format pipeline (hub id or folder), loaded through diffusers.

The same code path loads Stable Diffusion 2.1 on a GPU and the shipped toy-world prior on a CPU. It offers
cached text embeddings, a differentiable VAE encode, classifier-free-guided noise prediction in one batched
UNet call (epsilon and v-prediction models alike), and the noise schedule's ``alphas_cumprod``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel

from pdray.config import PriorConfig

TOY_MODEL = "toyworld"
TOY_MODEL_DIR = Path(__file__).parent / "toyworld" / "weights"


class PriorNotFoundError(RuntimeError):
    """The requested model is neither a local folder nor in the local Hugging Face cache."""


def resolve_model(model: str | Path) -> tuple[str, bool]:
    """Map a model name to (path or hub id, is_local_folder). "toyworld" is the shipped default."""
    if str(model) == TOY_MODEL:
        if not (TOY_MODEL_DIR / "model_index.json").exists():
            raise PriorNotFoundError(
                f"the shipped toy prior is missing from {TOY_MODEL_DIR}; train it with "
                f"`pdray prior train-toy --out {TOY_MODEL_DIR}`"
            )
        return str(TOY_MODEL_DIR), True
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "unet").is_dir():
            raise PriorNotFoundError(f"{path} is not a Stable-Diffusion-format folder (no unet/ inside)")
        return str(path), True
    if str(model).startswith((".", "/", "~")):
        raise PriorNotFoundError(f"model folder {model} does not exist")
    return str(model), False


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """Noise from a v-prediction: eps = sqrt(a) v + sqrt(1 - a) x_t; alpha_bar_t broadcasts as [B, 1, 1, 1]."""
    return alpha_bar_t.sqrt() * v + (1 - alpha_bar_t).sqrt() * x_t


def v_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """v-target from noise: v = (eps - sqrt(1 - a) x_t) / sqrt(a), the inverse of eps_from_v."""
    return (eps - (1 - alpha_bar_t).sqrt() * x_t) / alpha_bar_t.sqrt()


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """The clean-sample estimate: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)."""
    return (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()


class DiffusionPrior:
    """A pretrained text-to-image diffusion model used as a frozen score function."""

    def __init__(
        self,
        model: str | Path = TOY_MODEL,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        vae_only: bool = False,
    ):
        """vae_only: load just the VAE (and configs), what a particle actor needs to encode its renders."""
        self.model_name = str(model)
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        source, local = resolve_model(model)
        offline = local or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        kwargs = {"local_files_only": offline}
        self.tokenizer = self.text_encoder = self.unet = None
        try:
            self.vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=self.dtype, **kwargs)
            self.unet_config = UNet2DConditionModel.load_config(source, subfolder="unet", **kwargs)
            self.scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs)
            if not vae_only:
                self.tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
                self.text_encoder = CLIPTextModel.from_pretrained(
                    source, subfolder="text_encoder", torch_dtype=self.dtype, **kwargs
                )
                self.unet = UNet2DConditionModel.from_pretrained(
                    source, subfolder="unet", torch_dtype=self.dtype, **kwargs
                )
        except (OSError, ValueError) as err:
            hint = (
                (
                    "the hub is offline (HF_HUB_OFFLINE=1): download it on a machine with network "
                    f"(`hf download {source}`) or pass a local folder with --model PATH"
                )
                if offline
                else str(err)
            )
            raise PriorNotFoundError(f"could not load diffusion model {source!r}: {hint}") from err
        for module in (self.text_encoder, self.vae, self.unet):
            if module is not None:
                module.to(self.device).requires_grad_(False).eval()
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"{source}: prediction_type {self.prediction_type!r} is not supported (epsilon or v_prediction)"
            )
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self._embedding_cache: dict[str, torch.Tensor] = {}

    # ---- text -------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [B, L, D] for prompts, cached per prompt string; each prompt is encoded on its own, so its
        embedding does not depend on which other prompts came first (score replicas see different first batches)."""
        for prompt in dict.fromkeys(prompts):
            if prompt not in self._embedding_cache:
                ids = self.tokenizer(
                    [prompt],
                    padding="max_length",
                    max_length=self.tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(self.device)
                self._embedding_cache[prompt] = self.text_encoder(ids)[0][0]
        return torch.stack([self._embedding_cache[p] for p in prompts])

    # ---- image <-> latent ---------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def image_resolution(self) -> int:
        """The resolution the UNet was trained for (its sample size times the VAE's downsampling)."""
        return int(self.unet_config["sample_size"]) * self.vae_scale

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> latents [B, C, H/f, W/f]; differentiable (posterior mean x scale)."""
        x = images.to(self.dtype) * 2 - 1
        return self.vae.encode(x).latent_dist.mean * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, C, h, w] -> images [B, 3, h*f, w*f] in [0, 1]."""
        x = self.vae.decode(latents.to(self.dtype) / self.scaling_factor).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    # ---- noise ------------------------------------------------------------------------------------
    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod at integer timesteps t [B], shaped [B, 1, 1, 1] for broadcasting."""
        return self.alphas_cumprod[t.to(self.device)].view(-1, 1, 1, 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
        a = self.alpha_bar(t).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def model_output_to_eps(self, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return eps_from_v(x_t.float(), output.float(), self.alpha_bar(t))
        return output.float()

    def predict_eps(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None = None,
        guidance_scale: float = 7.5,
        class_labels: torch.Tensor | None = None,
        unet: torch.nn.Module | None = None,
        plain: torch.Tensor | None = None,
        view_guidance: float = 0.0,
    ) -> torch.Tensor:
        """Classifier-free-guided noise prediction in one batched UNet call; float32 [B, C, h, w].

        x_t: [B, C, h, w]; t: [B] integer timesteps; cond / uncond: [B, L, D] text embeddings.
        With guidance_scale == 1 (or no uncond) only the conditional pass runs. ``unet`` lets a caller
        pass a UNet carrying adapters (the LoRA); by default the prior's own UNet is used. ``plain``: the
        embeddings of the prompts without their view suffixes; with ``view_guidance`` > 0 a third pass adds
        guidance along the view alone (``view_guided``).
        """
        unet = unet or self.unet
        if plain is not None and view_guidance > 0.0:
            if uncond is None:
                raise ValueError("view guidance needs the unconditional embeddings too")
            labels = None if class_labels is None else torch.cat([class_labels] * 3)
            out = unet(
                torch.cat([x_t, x_t, x_t]).to(self.dtype),
                torch.cat([t, t, t]),
                encoder_hidden_states=torch.cat([uncond, cond, plain]).to(self.dtype),
                class_labels=labels,
            ).sample
            eps = self.model_output_to_eps(torch.cat([x_t, x_t, x_t]), out, torch.cat([t, t, t]))
            eps_uncond, eps_cond, eps_plain = eps.chunk(3)
            return view_guided(eps_uncond, eps_cond, eps_plain, guidance_scale, view_guidance)
        if uncond is None or guidance_scale == 1.0:
            out = unet(
                x_t.to(self.dtype), t, encoder_hidden_states=cond.to(self.dtype), class_labels=class_labels
            ).sample
            return self.model_output_to_eps(x_t, out, t)
        labels = None if class_labels is None else torch.cat([class_labels, class_labels])
        out = unet(
            torch.cat([x_t, x_t]).to(self.dtype),
            torch.cat([t, t]),
            encoder_hidden_states=torch.cat([uncond, cond]).to(self.dtype),
            class_labels=labels,
        ).sample
        eps_uncond, eps_cond = self.model_output_to_eps(torch.cat([x_t, x_t]), out, torch.cat([t, t])).chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def view_guided(
    eps_uncond: torch.Tensor,
    eps_cond: torch.Tensor,
    eps_plain: torch.Tensor,
    guidance_scale: float,
    view_guidance: float,
) -> torch.Tensor:
    """CFG plus guidance along the view suffix: ``eps_u + s (eps_c - eps_u) + s_view (d - mean(d))``, with
    ``d = eps_c - eps_plain``, eps_c conditioned on "PROMPT, VIEW view" and eps_plain on "PROMPT" (Perp-Neg's idea of
    guiding by a prompt difference, without its negatives). The difference's per-channel spatial mean, the tone a view
    prompt shifts, is removed: the view guides where things are (the door on the front), CFG alone sets the colour,
    so a particle stays one colour all round (uncentred, a quarter of the toy houses' views changed colour)."""
    view = eps_cond - eps_plain
    view = view - view.mean(dim=(-2, -1), keepdim=True)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond) + view_guidance * view


PRIOR_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_prior(config: PriorConfig, device: torch.device | str | None = None, vae_only: bool = False) -> DiffusionPrior:
    """The prior a run config names, at its dtype ("auto": float16 on CUDA, float32 on the CPU)."""
    return DiffusionPrior(config.model, device=device, dtype=PRIOR_DTYPES.get(config.dtype), vae_only=vae_only)
