"""Stable Diffusion 2.1-layout folders with random weights: the paper's two bases at full size or tiny, no download.

ProlificDreamer scores with SD 2.1-base (epsilon, 512 px) and fits its LoRA on SD 2.1 (v-prediction, 768 px). The
real path at that shape (two bases, SD's VAE, peft on a full UNet) is tested and measured with folders written here
in SD's layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) and loaded back through
``pdray.priors.diffusion.load_prior``, exactly as a downloaded SD 2.1 would be. The tokenizer is a small BPE over
lowercase letters (SD's real vocabulary cannot be downloaded here); every other shape is SD 2.1's own.

    python -m pdray.priors.random_sd OUT_DIR --size full --base lora   # SD 2.1 (v-prediction, 96 x 96 latents)
    python -m pdray.priors.random_sd OUT_DIR --size tiny --base prior  # SD 2.1-base's layout at tiny widths
"""

from __future__ import annotations

import argparse
import json
import shutil
import string
from pathlib import Path
from typing import Literal

import torch

Size = Literal["full", "tiny"]
Base = Literal["prior", "lora"]
BASES = {
    "prior": {"prediction_type": "epsilon", "sample_size": 64},  # stabilityai/stable-diffusion-2-1-base
    "lora": {"prediction_type": "v_prediction", "sample_size": 96},  # stabilityai/stable-diffusion-2-1
}
WORDS = ["a", "dslr", "photo", "of", "pineapple", "hamburger", "cube", "house", "mug", "chair", "front", "side"]
WORDS += ["back", "overhead", "view"]
"""Words the tokenizer keeps whole (every other word is spelt out letter by letter)."""


def sd21_configs(size: Size, base: Base = "prior") -> dict[str, dict]:
    """Constructor arguments of SD 2.1's UNet, VAE and text encoder (``tiny``: the same layout, tiny widths)."""
    unet = {
        "sample_size": BASES[base]["sample_size"],
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 1024,
        "attention_head_dim": (5, 10, 20, 20),
        "use_linear_projection": True,
        "upcast_attention": base == "lora",  # SD 2.1 (768) upcasts its attention; 2.1-base does not
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
        "sample_size": 8 * BASES[base]["sample_size"],
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
    if size == "tiny":
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
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, unk_token="<|endoftext|>")


def write_random_sd(
    folder: Path, size: Size = "tiny", base: Base = "prior", device: torch.device | str = "cpu", seed: int = 0
) -> Path:
    """Write an SD 2.1-layout pipeline with random weights (float16 on disk) into ``folder``; a folder that already
    holds one is reused. ``base``: "prior" is SD 2.1-base's shape (epsilon, 64 x 64 latents), "lora" SD 2.1's
    (v-prediction, 96 x 96 latents). ``device``: where the weights are initialised (a GPU takes seconds where a CPU
    takes a minute at full size)."""
    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = sd21_configs(size, base)
    tokenizer = build_tokenizer(WORDS)
    torch.manual_seed(seed)
    with torch.device(device):
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
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted write left
    for name, module in parts.items():
        module.to(torch.float16).save_pretrained(partial / name)
    tokenizer.save_pretrained(partial / "tokenizer")
    DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=BASES[base]["prediction_type"],
        clip_sample=False,
        steps_offset=1,
    ).save_pretrained(partial / "scheduler")
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
    (partial / "model_index.json").write_text(json.dumps(index, indent=2))
    partial.rename(folder)  # a folder with model_index.json is always whole
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the folder to write (reused if it already holds a pipeline)")
    parser.add_argument("--size", choices=("full", "tiny"), default="tiny")
    parser.add_argument("--base", choices=sorted(BASES), default="prior", help="prior: SD 2.1-base; lora: SD 2.1")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    print(write_random_sd(args.out, args.size, args.base, args.device))


if __name__ == "__main__":
    main()
