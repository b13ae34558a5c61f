"""Which metrics the tables show, in which order: a leaf that the run page, ``pdray eval``, the study table and
the study report all read, so none of them imports another to learn its columns."""

from __future__ import annotations

TABLE_METRICS = (
    "clip_score",
    "clip_r_precision",
    "clip_vendi",
    "clip_diversity",
    "clip_views_right",
    "judge_agreement",
    "judge_confidence",
    "views_right",
    "views_right_world",
    "shape_right",
    "shape_right_world",
    "world_kid",
    "colour_consistency",
    "colour_entropy_fraction",
    "diversity",
    "distinct_hues",
    "saturation",
    "brightness",
    "haze",
)
"""The metrics ``pdray eval`` prints and report.html shows, in this order (those a run has)."""

STUDY_METRICS = (
    "clip_score",
    "clip_r_precision",
    "clip_vendi",
    "clip_diversity",
    "judge_agreement",
    "views_right",
    "shape_right",
    "world_kid",
    "colour_consistency",
    "diversity",
    "colour_entropy_fraction",
    "distinct_hues",
    "saturation",
    "haze",
    "wall_time_s",
    "steps_per_s",
)
"""The study table's metric columns, read from each run's summary.json (or eval.json for ``pdray eval``): the CLIP
judge's (with ``eval.clip_model``), the toy judge's (toy prior), image statistics and times."""
