"""CLIP as the judge of runs with any prior: CLIP score, CLIP R-precision and the diversity of the particles.

    judge = load_clip_judge("openai/clip-vit-base-patch32")       # a local folder or the Hugging Face cache
    judge.metrics("a pineapple", {0: views_0, 1: views_1}, DISTRACTORS)

The model is a transformers ``CLIPModel`` with its ``CLIPProcessor`` (tokenizer and image preprocessing), loaded
with ``local_files_only``: evaluation never downloads, and a missing model is one line naming it.

The protocol, per run (each particle's views are its renders from the fixed evaluation orbit):
- ``clip_score``: per particle, max(100 x mean over its views of cos(view, prompt), 0); the run's is the mean over
  particles (the prompt without view suffixes);
- ``clip_r_precision``: DreamFusion's CLIP R-precision: each view is a query that ranks the prompt against the
  distractor prompts by cosine; the fraction of views whose top caption is the prompt (R@1). DreamFusion drew its
  153 captions from object-centric COCO; pdray ships its own set of object captions (``DISTRACTORS``, or
  ``eval.distractors``), so chance is 1 / (distractors + 1), recorded as ``clip_r_precision_chance``;
- ``clip_diversity``: mean pairwise cosine distance between the particles' embeddings (each the normalised mean
  of its views' embeddings); ``clip_vendi``: the Vendi score of the same embeddings, the effective number of
  distinct particles (1 to the number of particles);
- ``clip_views_right`` (NeRF particles): the 3D-consistency read: for each view from a front, side or back camera,
  whether its closest text among "PROMPT, front view" / "PROMPT, side view" / "PROMPT, back view" is the camera's;
  the fraction right per particle, averaged over particles (a particle alike from every side scores about 1/3).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from pdray.evaluation.diversity import clip_score, mean_pairwise_cosine_distance, normalise, r_precision, vendi_score
from pdray.imaging import to_uint8
from pdray.prompts import view_prompt

VIEW_WORDS = ("front", "side", "back")
"""The views CLIP's view read tells apart (the prompts' suffixes, DreamFusion's)."""

DISTRACTORS = (
    "a wooden chair",
    "a red sports car",
    "a teapot",
    "a pineapple",
    "a hamburger",
    "a dog",
    "a cat",
    "a bicycle",
    "an airplane",
    "a sailboat",
    "a banana",
    "an apple",
    "a stack of books",
    "a lamp",
    "a guitar",
    "a pair of sneakers",
    "a cupcake",
    "a vase of flowers",
    "a laptop",
    "a teddy bear",
    "a rubber duck",
    "a motorcycle",
    "a pumpkin",
    "a castle",
    "a tree",
    "a skull",
    "a robot",
    "a backpack",
    "an umbrella",
    "a clock",
    "a bowl of fruit",
    "a frog",
    "an owl",
    "a treasure chest",
    "a fire hydrant",
    "a birthday cake",
    "a strawberry",
    "a crown",
    "a lighthouse",
    "a mushroom",
)
"""Object-centric captions that compete with the prompt in R-precision (any equal to the prompt is left out)."""


class ClipNotFoundError(FileNotFoundError):
    """The CLIP model is neither a local folder nor in the local Hugging Face cache."""


class ClipJudge:
    """A CLIP model and its processor; embeds images in [0, 1] and prompts into one unit-norm space."""

    def __init__(self, model: str, device: str | torch.device | None = None):
        from transformers import CLIPModel, CLIPProcessor

        self.name = model
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        source = str(Path(model).expanduser()) if Path(model).expanduser().exists() else model
        try:
            self.processor = CLIPProcessor.from_pretrained(source, local_files_only=True)
            self.model = CLIPModel.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ClipNotFoundError(
                f"CLIP model {model!r} is neither a local folder nor in the Hugging Face cache "
                f"(evaluation never downloads): `hf download {model}` once, or set eval.clip_model to a folder"
            ) from err
        self.model.to(self.device).requires_grad_(False).eval()

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """images [N, 3, H, W] in [0, 1] -> unit-norm embeddings [N, D], preprocessed as the model was trained."""
        out = []
        for chunk in images.split(batch_size):
            pixels = self.processor(images=list(to_uint8(chunk)), return_tensors="pt")["pixel_values"]
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device)).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return normalise(torch.cat(out))

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> unit-norm embeddings [len(prompts), D]."""
        tokens = self.processor(text=prompts, return_tensors="pt", padding=True, truncation=True)
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        pooled = self.model.text_model(**tokens).pooler_output
        return normalise(self.model.text_projection(pooled).float().cpu())

    @staticmethod
    def view_read(embeddings: torch.Tensor, view_texts: torch.Tensor, targets: list[str | None]) -> float | None:
        """The fraction of views (unit-norm image embeddings [V, D]) with a target view whose closest of
        ``view_texts`` (the embeddings of "PROMPT, front view" / "side view" / "back view", in VIEW_WORDS order) is
        the target's; None when no view has a target."""
        keep = [i for i, target in enumerate(targets) if target in VIEW_WORDS]
        if not keep:
            return None
        nearest = (embeddings[keep].double() @ view_texts.double().T).argmax(dim=-1).tolist()
        return sum(VIEW_WORDS[n] == targets[i] for n, i in zip(nearest, keep, strict=True)) / len(keep)

    def metrics(
        self,
        prompt: str,
        views: dict[int, torch.Tensor],
        distractors: list[str] | tuple[str, ...] = DISTRACTORS,
        view_targets: list[str | None] | None = None,
    ) -> tuple[dict[str, Any], dict[int, float]]:
        """The run's CLIP metrics (see the module docstring) and each particle's CLIP score.

        views: particle id -> its views [V, 3, H, W] in [0, 1]; view_targets: the view each of the V cameras shows
        (``pdray.evaluation.world_eval.view_targets``), for ``clip_views_right``."""
        others = [d for d in dict.fromkeys(distractors) if d.strip().lower() != prompt.strip().lower()]
        texts = self.embed_texts([prompt, *others])
        per_view = {pid: self.embed_images(images) for pid, images in views.items()}
        per_particle = {pid: clip_score(e, texts[0]) for pid, e in per_view.items()}
        particles = normalise(torch.stack([e.mean(0) for e in per_view.values()]))
        run = {
            "clip_score": sum(per_particle.values()) / len(per_particle),
            "clip_r_precision": r_precision(torch.cat(list(per_view.values())), texts),
            "clip_r_precision_chance": 1 / len(texts),
            "clip_diversity": mean_pairwise_cosine_distance(particles),
            "clip_vendi": vendi_score(particles),
        }
        if view_targets is not None:
            view_texts = self.embed_texts([view_prompt(prompt, v) for v in VIEW_WORDS])
            reads = {pid: self.view_read(e, view_texts, view_targets) for pid, e in per_view.items()}
            if all(r is not None for r in reads.values()):
                run["clip_views_right"] = sum(reads.values()) / len(reads)
                run["clip_views_right_per_particle"] = reads
        return run, per_particle


@functools.lru_cache(maxsize=2)
def load_clip_judge(model: str) -> ClipJudge:
    """One ClipJudge per model per process: checkpoints judge again and again without reloading."""
    return ClipJudge(model)
