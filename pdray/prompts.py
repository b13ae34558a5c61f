"""Prompt processing: DreamFusion's view-dependent suffixes, shared by distillation and the toy world's captions."""

from __future__ import annotations

VIEW_SUFFIXES = {view: f", {view} view" for view in ("front", "side", "back", "overhead")}


def view_prompt(prompt: str, view_label: str | None) -> str:
    """ "a mug" + "side" -> "a mug, side view"; no label, no suffix."""
    return prompt + VIEW_SUFFIXES[view_label] if view_label else prompt
