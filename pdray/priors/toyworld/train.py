"""Train the toy prior end to end: render a pool of the world, fit the VAE, measure its scaling factor,
train the judge, train the UNet and text encoder (EMA weights, min-SNR weighting), save in SD format.

Or fine-tune one (`init_from`): its VAE, tokenizer and judge are kept, its UNet and text encoder train on.
Seeded and reproducible on one device; `pdray prior train-toy --out DIR` is the documented command.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPTextModel

from pdray.files import replace_folder
from pdray.priors.diffusion import resolve_model
from pdray.priors.toyworld import model as toy
from pdray.priors.toyworld.captions import caption_variants
from pdray.priors.toyworld.judge import load_judge, save_judge, train_judge
from pdray.priors.toyworld.world import COLOUR_NAMES, SHAPES, VIEWS, sample_world


@dataclass
class ToyTrainConfig:
    """Knobs of the toy prior's training; the defaults fit this project's 2-core CPU budget."""

    seed: int = 0
    pool_size: int = 20000  # rendered images the VAE, UNet and judge train on (captions redrawn each step)
    render_chunk: int = 500  # images rendered at once
    vae_steps: int = 1200
    vae_batch_size: int = 32
    unet_steps: int = 4500
    unet_batch_size: int = 64
    unet_lr: float = 4e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    # Std of a per-channel constant added to the training noise ("offset noise"). Under SD's schedule x_T keeps
    # 6.8% of the image, so a model trained on plain noise reads the colour off the initial noise's channel means
    # and ignores the prompt's colour; offset noise makes those means uninformative at every t.
    offset_noise: float = 0.5
    judge_steps: int = 800
    judge_batch_size: int = 64
    max_minutes: float = 100.0  # stop the UNet phase early (and still save) past this wall time
    save_every_minutes: float = 10.0  # write the prior (EMA weights) this often, so a stopped run leaves one
    init_from: str | None = None  # a prior folder (or "toyworld") to fine-tune instead of training from scratch
    device: str = "cpu"
    bf16: bool = False  # bf16 autocast: a win on CUDA; measured 15x slower than fp32 on this project's CPU


def render_pool(cfg: ToyTrainConfig) -> dict[str, torch.Tensor]:
    """Render the training pool as uint8 images with their labels, on cfg.device."""
    generator = torch.Generator().manual_seed(cfg.seed)
    parts = []
    chunk = cfg.render_chunk
    for start in tqdm(range(0, cfg.pool_size, chunk), desc="render pool", unit="chunk"):
        batch = sample_world(min(chunk, cfg.pool_size - start), generator, device=cfg.device)
        parts.append(((batch.images * 255).round().to(torch.uint8), batch.shapes, batch.colours, batch.views))
    images, shapes, colours, views = (torch.cat(p) for p in zip(*parts, strict=True))
    return {"images": images, "shapes": shapes, "colours": colours, "views": views}


def _autocast(cfg: ToyTrainConfig):
    device_type = "cuda" if cfg.device.startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.bf16)


def train_vae(cfg: ToyTrainConfig, pool: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, float]:
    vae = toy.build_vae().to(cfg.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=cfg.vae_steps, pct_start=0.05)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    bar = tqdm(range(cfg.vae_steps), desc="vae")
    loss = torch.tensor(0.0)
    for _ in bar:
        idx = torch.randint(len(pool["images"]), (cfg.vae_batch_size,), generator=gen).to(cfg.device)
        x = pool["images"][idx].float() / 127.5 - 1
        with _autocast(cfg):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
        recon = recon.float()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return vae.eval(), loss.item()


@torch.no_grad()
def encode_pool(vae, pool: dict[str, torch.Tensor], chunk: int = 512) -> torch.Tensor:
    """Latent means of every pool image, unscaled: [N, 4, 16, 16] float32."""
    out = []
    for start in range(0, len(pool["images"]), chunk):
        x = pool["images"][start : start + chunk].float() / 127.5 - 1
        out.append(vae.encode(x).latent_dist.mean.float())
    return torch.cat(out)


def caption_token_table(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of every caption variant of every label triple, and the variants' probabilities.

    Returns ids [shapes, colours, views, variants, MAX_TOKENS] and probabilities [variants], so a training
    step draws its captions with tensor ops on the device instead of tokenizing in Python.
    """
    table, probs = [], None
    for s, c, v in itertools.product(range(len(SHAPES)), range(len(COLOUR_NAMES)), range(len(VIEWS))):
        texts, weights = zip(*caption_variants(s, c, v), strict=True)
        table.append(
            tokenizer(
                list(texts), padding="max_length", max_length=toy.MAX_TOKENS, truncation=True, return_tensors="pt"
            ).input_ids
        )
        probs = torch.tensor(weights)
    ids = torch.stack(table).view(len(SHAPES), len(COLOUR_NAMES), len(VIEWS), len(probs), toy.MAX_TOKENS)
    return ids, probs


def build_text_model(cfg: ToyTrainConfig):
    """Tokenizer, text encoder and UNet: fresh, or loaded from cfg.init_from to be fine-tuned."""
    if cfg.init_from is None:
        tokenizer = toy.build_tokenizer()
        text_encoder = toy.build_text_encoder(len(tokenizer))
        return tokenizer, text_encoder, toy.build_unet(text_encoder.config.hidden_size)
    base = resolve_model(cfg.init_from)[0]
    return (
        AutoTokenizer.from_pretrained(base, subfolder="tokenizer"),
        CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
        UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
    )


def train_unet(cfg: ToyTrainConfig, latents: torch.Tensor, pool: dict[str, torch.Tensor], started: float, save):
    """Joint UNet + text encoder training on scaled latents with fresh captions each step.

    `save(unet, text_encoder, tokenizer, scheduler, stats)` is called with the EMA weights every
    cfg.save_every_minutes and at the end.
    """
    device = cfg.device
    tokenizer, text_encoder, unet = build_text_model(cfg)
    text_encoder.to(device).train()
    unet.to(device).train()
    scheduler = toy.build_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = EMAModel(params, decay=cfg.ema_decay, foreach=True)
    ema.to(device)
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    token_table, variant_probs = (t.to(device) for t in caption_token_table(tokenizer))
    latents = latents.to(device)
    shapes, colours, views = (pool[k].to(device) for k in ("shapes", "colours", "views"))
    bar = tqdm(range(cfg.unet_steps), desc="unet")
    loss_avg, steps_done, last_save = torch.zeros((), device=device), 0, 0.0
    stats: dict = {}
    for step in bar:
        idx = torch.randint(len(latents), (cfg.unet_batch_size,), generator=gen, device=device)
        x0 = latents[idx]
        variant = torch.multinomial(variant_probs, len(idx), replacement=True, generator=gen)
        ids = token_table[shapes[idx], colours[idx], views[idx], variant]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        noise = noise + cfg.offset_noise * torch.randn(*x0.shape[:2], 1, 1, generator=gen, device=device)
        x_t = scheduler.add_noise(x0, noise, t)
        with _autocast(cfg):
            cond = text_encoder(ids).last_hidden_state
            eps = unet(x_t, t, cond).sample
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        weight = snr.clamp(max=cfg.min_snr_gamma) / snr
        loss = (weight * F.mse_loss(eps.float(), noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        loss_avg = loss.detach() if step == 0 else 0.99 * loss_avg + 0.01 * loss.detach()
        steps_done = step + 1
        if step % 50 == 0:  # reading the loss syncs the device: not every step
            bar.set_postfix(loss=f"{float(loss_avg):.4f}", refresh=False)
        minutes = (time.time() - started) / 60
        stopping = minutes > cfg.max_minutes
        if stopping or steps_done == cfg.unet_steps or minutes - last_save >= cfg.save_every_minutes:
            last_save = minutes
            stats = {"unet_steps_done": steps_done, "unet_loss_ema": float(loss_avg)}
            ema.store(params)
            ema.copy_to(params)
            save(unet.eval(), text_encoder.eval(), tokenizer, scheduler, stats)
            if not stopping and steps_done < cfg.unet_steps:
                ema.restore(params)
                unet.train()
                text_encoder.train()
        if stopping:
            tqdm.write(f"stopped the UNet phase at step {steps_done}: past max_minutes={cfg.max_minutes}")
            break
    return stats


def write_prior(out: Path, parts: dict, report: dict) -> None:
    """Write the prior folder atomically: into out.tmp, then swapped in for out."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("vae", "unet", "text_encoder", "tokenizer", "scheduler"):
        parts[name].save_pretrained(tmp / name)
    toy.write_model_index(tmp)
    save_judge(parts["judge"], tmp / "judge")
    (tmp / "training.json").write_text(json.dumps(report, indent=2))
    replace_folder(tmp, out)


def train_toy_prior(out: Path, cfg: ToyTrainConfig) -> dict:
    """Train (or fine-tune) everything; the prior folder is rewritten atomically at each save."""
    started = time.time()
    torch.manual_seed(cfg.seed)
    pool = render_pool(cfg)
    if cfg.init_from is None:
        vae, vae_loss = train_vae(cfg, pool)
        raw = encode_pool(vae, pool)
        vae.register_to_config(scaling_factor=float(1.0 / raw.std()))
        judge = train_judge(pool, cfg.judge_steps, cfg.judge_batch_size, cfg.seed + 3, cfg.device)
        provenance = {}
    else:
        base = Path(resolve_model(cfg.init_from)[0])
        vae, vae_loss = AutoencoderKL.from_pretrained(base / "vae").to(cfg.device).eval(), None
        raw = encode_pool(vae, pool)
        judge = load_judge(base / "judge", cfg.device)
        base_report = base / "training.json"  # kept, so a fine-tuned prior says what it was tuned from
        provenance = {"base_training": json.loads(base_report.read_text())} if base_report.exists() else {}
    scaling_factor = float(vae.config.scaling_factor)
    report = {"config": asdict(cfg), "vae_loss": vae_loss, "scaling_factor": scaling_factor, "torch": torch.__version__}
    report.update(provenance)

    def save(unet, text_encoder, tokenizer, scheduler, stats: dict) -> None:
        report.update(stats, minutes=(time.time() - started) / 60)
        parts = {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer}
        write_prior(out, {**parts, "scheduler": scheduler, "judge": judge}, report)
        tqdm.write(f"saved the prior to {out} at UNet step {stats['unet_steps_done']}")

    train_unet(cfg, raw * scaling_factor, pool, started, save)
    tqdm.write(f"trained in {(time.time() - started) / 60:.1f} min")
    return report
