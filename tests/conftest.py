"""Shared fixtures: offline Hugging Face, a tiny Stable-Diffusion-format pipeline built in code, parity records."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # 1 beside another busy process


def tiny_vocab() -> dict[str, int]:
    """A character-level BPE vocabulary (no merges) for tiny CLIP tokenizers."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase + ",.!":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return vocab


def build_tiny_clip(folder: Path) -> Path:
    """A randomly initialised CLIP (text and vision towers, 32 px images) with its processor, saved with
    save_pretrained so it loads through exactly the offline path a real CLIP does."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    vocab = tiny_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32, unk_token="<|endoftext|>")
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=text
        | dict(vocab_size=len(vocab), max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=text | dict(image_size=32, patch_size=8),
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def build_tiny_pipeline(folder: Path, prediction_type: str = "epsilon") -> Path:
    """A randomly initialised SD-format pipeline (VAE, UNet, CLIP text encoder + BPE tokenizer, scheduler),
    saved with save_pretrained so it loads through exactly the path a real model does."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pdray.priors.toyworld.model import write_model_index

    torch.manual_seed(0)
    vocab = tiny_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=12, unk_token="<|endoftext|>")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=12,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.5,
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
    )
    for name, part in [
        ("tokenizer", tokenizer),
        ("text_encoder", text_encoder),
        ("vae", vae),
        ("unet", unet),
        ("scheduler", scheduler),
    ]:
        part.save_pretrained(folder / name)
    write_model_index(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-eps"), "epsilon")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_v_model(tmp_path_factory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-v"), "v_prediction")


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A real local Ray cluster of 2 CPUs on loopback, one per test module, with token auth off and a short temp dir."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
    )
    yield
    ray.shutdown()


@pytest.fixture
def record_parity(request):
    """``record(**numbers)``: a parity test's measured differences, printed and, when ``PDRAY_PARITY_OUT`` is set,
    appended as one JSON line to ``$PDRAY_PARITY_OUT/parity.jsonl`` (so a GPU run yields numbers for a note)."""

    def record(**numbers: float) -> None:
        line = json.dumps(
            {"test": request.node.nodeid, **{k: float(torch.as_tensor(v).detach()) for k, v in numbers.items()}}
        )
        print(line)
        folder = os.environ.get("PDRAY_PARITY_OUT")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            with open(Path(folder) / "parity.jsonl", "a") as file:
                file.write(line + "\n")

    return record
