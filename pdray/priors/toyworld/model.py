"""The toy prior's components, in exactly the Stable Diffusion format (diffusers + transformers).

AutoencoderKL (32x32 RGB <-> 4x16x16 latents); UNet2DConditionModel (epsilon prediction, no self-attention at
the top resolution, a pooled text embedding in the time embedding); a small CLIP text encoder with a word-level
tokenizer over the world's vocabulary (unknown words become one unknown token each); Stable Diffusion's DDPM
scheduler configuration.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from pdray.priors.toyworld.captions import VOCABULARY

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
MAX_TOKENS = 16
RESOLUTION = 32
LATENT_CHANNELS = 4


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: lower-cased words and punctuation, each in the vocabulary or the unknown token."""
    vocab = {BOS: 0, EOS: 1, UNK: 2}
    for word in VOCABULARY:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=EOS, model_max_length=MAX_TOKENS
    )


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        sample_size=RESOLUTION,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_add_attention=False,
    )


def build_unet(cross_attention_dim: int = 64) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        # The top resolution attends to the text only (no self-attention there: slow on CPU).
        only_cross_attention=(True, False, False),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
        # A pooled text embedding added to the time embedding reaches every block, so a global attribute such
        # as the colour binds strongly (the first toy prior, with text only in low-resolution cross-attention,
        # drew the named colour in 40% of samples).
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def build_scheduler() -> DDPMScheduler:
    """Stable Diffusion's noise schedule (scaled linear betas), epsilon prediction."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def write_model_index(folder: Path) -> None:
    """model_index.json, so StableDiffusionPipeline.from_pretrained(folder) also works."""
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
