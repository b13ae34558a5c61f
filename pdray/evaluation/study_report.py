"""A study's figures (matplotlib, Agg) and report.md, from its table rows and run folders.

    figures/diversity_vs_particles.png     diversity against particles, one line per other grid setting
    figures/fidelity_saturation_vs_cfg.png judge agreement and saturation against CFG, one line per other setting
    figures/contact_sheet.png              one row per cell, one image per particle (its first evaluation view)

Points are means over seeds; the bars span the seeds' min and max.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from pdray.evaluation.tables import STUDY_METRICS
from pdray.files import atomic_path, write_text

FIGURES = "figures"


def particle_sheet(run_dir: Path) -> np.ndarray | None:
    """uint8 [H, W * particles, 3]: the first evaluation view of every particle of a run side by side."""
    import imageio.v3 as iio

    views = sorted((run_dir / "particles").glob("*/views.png"))
    if not views:
        return None
    tiles = []
    for path in views:
        image = iio.imread(path)[..., :3]
        tiles.append(image[:, : image.shape[0]])  # views.png is a row of square views
    return np.concatenate(tiles, axis=1)


Points = list[tuple[float, float, float, float]]


def series(rows: list[dict[str, Any]], x: str, y: str, by: list[str]) -> dict[str, Points]:
    """Group done rows by the ``by`` keys; per group, per x value: (x, mean, min, max) of y over the other rows
    (the seeds). Rows without a y value are left out."""
    groups: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.get("status") != "done" or row.get(y) is None or row.get(x) is None:
            continue
        label = ", ".join(f"{k}={row[k]}" for k in by) or "all"
        groups[label][float(row[x])].append(float(row[y]))
    return {
        label: [(xv, float(np.mean(v)), min(v), max(v)) for xv, v in sorted(points.items())]
        for label, points in groups.items()
    }


def _plot(ax, data: dict[str, Points], x: str, y: str, log_x: bool = False) -> None:
    for label, points in data.items():
        xs, mean, low, high = (np.array(c) for c in zip(*points, strict=True))
        ax.errorbar(xs, mean, yerr=[mean - low, high - mean], marker="o", capsize=3, label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    if data:
        ax.legend(fontsize=7)


def write_figures(study_dir: Path, rows: list[dict[str, Any]], varied: list[str]) -> list[Path]:
    """Write the study's PNG figures into STUDY_DIR/figures/; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = study_dir / FIGURES
    folder.mkdir(parents=True, exist_ok=True)
    out = []

    others = [k for k in varied if k not in ("particles", "seed")]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    _plot(ax, series(rows, "particles", "diversity", others), "particles", "diversity (mean pairwise feature distance)")
    ax.set_title("diversity vs particles")
    out.append(_save(fig, folder / "diversity_vs_particles.png"))

    others = [k for k in varied if k not in ("cfg", "seed")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _plot(axes[0], series(rows, "cfg", "judge_agreement", others), "cfg", "fidelity (judge agreement)", log_x=True)
    _plot(axes[1], series(rows, "cfg", "saturation", others), "cfg", "foreground HSV saturation", log_x=True)
    axes[0].set_title("fidelity vs CFG")
    axes[1].set_title("saturation vs CFG")
    out.append(_save(fig, folder / "fidelity_saturation_vs_cfg.png"))

    sheet = contact_sheet(study_dir, rows, plt)
    if sheet is not None:
        out.append(sheet)
    return out


def contact_sheet(study_dir: Path, rows: list[dict[str, Any]], plt) -> Path | None:
    """One row per finished cell, labelled with its name, showing every particle."""
    sheets = [(row["cell"], particle_sheet(study_dir / "runs" / row["cell"])) for row in rows]
    sheets = [(name, s) for name, s in sheets if s is not None]
    if not sheets:
        return None
    width = max(s.shape[1] for _, s in sheets)
    fig, axes = plt.subplots(len(sheets), 1, figsize=(max(4.0, width / 32 * 0.9 + 3), 0.9 * len(sheets) + 0.3))
    for ax, (name, sheet) in zip(np.atleast_1d(axes), sheets, strict=True):
        padded = np.full((sheet.shape[0], width, 3), 255, dtype=np.uint8)
        padded[:, : sheet.shape[1]] = sheet
        ax.imshow(padded, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name.replace(",", "\n"), rotation=0, ha="right", va="center", fontsize=6)
    return _save(fig, study_dir / FIGURES / "contact_sheet.png")


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    fig.clf()
    plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value + 0.0:.3g}"  # + 0.0 turns -0.0 into 0.0
    return str(value)


REPORT_COLUMNS = ("guidance", "cfg", "particles", "seed", *STUDY_METRICS, "judged_colours", "status")


def markdown_table(rows: list[dict[str, Any]], varied: list[str]) -> str:
    """The table as markdown: the varied keys, then the metrics that some row has, and status."""
    columns = ["cell"] + [c for c in (*varied, *REPORT_COLUMNS) if c not in ("cell",)]
    columns = [
        c for c in dict.fromkeys(columns) if c not in STUDY_METRICS or any(row.get(c) is not None for row in rows)
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_report(study_dir: Path, meta: dict[str, Any], rows: list[dict[str, Any]], figures: list[Path]) -> Path:
    """STUDY_DIR/report.md: what was varied, the table and the figures (relative links)."""
    vary = " ".join(f"--vary {k}={','.join(v)}" for k, v in meta["vary"].items())
    failed = [r for r in rows if r.get("status") != "done"]
    parts = [
        f"# Study {meta['study']}",
        "",
        f"Prompt {meta['prompt']!r}, config `{meta['config']}`"
        + (f" with `{' '.join('--set ' + s for s in meta['sets'])}`" if meta["sets"] else "")
        + f", `{vary}`, {meta['seeds']} seed(s): {len(rows)} runs, {len(failed)} failed"
        + (f", {meta['wall_time_s'] / 60:.1f} min of wall time." if "wall_time_s" in meta else "."),
        "",
        "Fidelity is the toy judge's agreement with the prompt; diversity the mean pairwise distance of the judge's",
        "features of the particles (RGB without a judge); colour_entropy_fraction the entropy of the particles'",
        "judged colours over log 6; saturation the mean HSV saturation of foreground pixels. Times are the",
        "optimisation loop's wall time and steps per second. With `eval.clip_model`, clip_* are CLIP's: CLIP score,",
        "R-precision against distractor prompts, Vendi score and mean pairwise cosine distance of the particles'",
        "CLIP embeddings. views_right is the toy judge's view read right at the orbit's front / side / back cameras",
        "(mugs, chairs, houses; the world's own renders score 1.0), shape_right the views read as the prompt's shape,",
        "world_kid the kernel distance to the world's renders from the same cameras (lower is closer).",
        "Run folders: `runs/<cell>/`; `report.html` shows every particle.",
        "",
        markdown_table(rows, [*meta["vary"], "seed"]),
        "",
    ]
    for row in failed:
        parts.append(f"- `{row['cell']}` failed: {row.get('error', '')}")
    parts += [f"![{p.stem}]({p.relative_to(study_dir).as_posix()})\n" for p in figures]
    path = study_dir / "report.md"
    write_text(path, "\n".join(parts) + "\n")
    return path
