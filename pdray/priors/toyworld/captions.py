"""Captions of the toy world, in the words a user would type, and their parsing back into labels."""

from __future__ import annotations

import random
from dataclasses import dataclass

from pdray.priors.toyworld.world import ASYMMETRIC_SHAPES, COLOUR_NAMES, SHAPES, VIEWS
from pdray.prompts import VIEW_SUFFIXES

VOCABULARY = ("a", ",", "view", *SHAPES, *COLOUR_NAMES, "front", "side", "back", "overhead")


@dataclass(frozen=True)
class CaptionStyle:
    """How training captions are drawn from an image's labels."""

    colour_open: float = 0.3  # "a cube": colour left open, so the prompt is multimodal
    view_suffix: float = 0.5  # ", side view" appended as distillation does
    empty: float = 0.1  # the unconditional caption, for classifier-free guidance


def caption_variants(shape: int, colour: int, view: int, style: CaptionStyle = CaptionStyle()):
    """Every caption of an object with the given label indices, with its probability under `style`.

    The five variants are: empty, "a cube", "a cube, side view", "a red cube", "a red cube, side view".
    """
    shape_name, colour_name, suffix = SHAPES[shape], COLOUR_NAMES[colour], VIEW_SUFFIXES[VIEWS[view]]
    said = 1 - style.empty
    return [
        ("", style.empty),
        (f"a {shape_name}", said * style.colour_open * (1 - style.view_suffix)),
        (f"a {shape_name}{suffix}", said * style.colour_open * style.view_suffix),
        (f"a {colour_name} {shape_name}", said * (1 - style.colour_open) * (1 - style.view_suffix)),
        (f"a {colour_name} {shape_name}{suffix}", said * (1 - style.colour_open) * style.view_suffix),
    ]


def caption(shape: int, colour: int, view: int, rng: random.Random, style: CaptionStyle = CaptionStyle()) -> str:
    """One random caption of an object with the given label indices."""
    texts, weights = zip(*caption_variants(shape, colour, view, style), strict=True)
    return rng.choices(texts, weights)[0]


@dataclass(frozen=True)
class PromptLabels:
    """What a prompt asks for; None where it leaves a label open or names nothing the world knows."""

    shape: str | None
    colour: str | None
    view: str | None

    @property
    def view_matters(self) -> bool:
        return self.view is not None and self.shape in ASYMMETRIC_SHAPES


def parse_prompt(prompt: str) -> PromptLabels:
    """Read shape, colour and view words out of a prompt such as "a red mug, side view"."""
    words = prompt.lower().replace(",", " ").split()
    shape = next((w for w in words if w in SHAPES), None)
    colour = next((w for w in words if w in COLOUR_NAMES), None)
    view = next(
        (w for w, nxt in zip(words, [*words[1:], ""], strict=True) if w in VIEW_SUFFIXES and nxt == "view"), None
    )
    return PromptLabels(shape, colour, view)
