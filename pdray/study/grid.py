"""A diversity study: a grid of ordinary pdray runs (every combination of the varied knobs x seeds) and its table.

    cells = expand_grid(parse_vary(["guidance=vsd,sds", "cfg=7.5,100"]), seeds=2)   # 8 cells
    run_study(spec, STUDY_DIR)  ->  STUDY_DIR/runs/<cell>/ (run folders), study.csv, study.json, figures/, report.md

Each cell is one Ray task that runs the local executor in its own process (``pdray.cluster.study_tasks``), so
as many cells run at once as the cluster has ``cpus_per_cell`` (and ``gpus_per_cell``) for. A failed cell is
retried once and then recorded as failed; it never stops the others. ``resume`` skips cells whose run folder
holds a complete summary.json. The table is rewritten (atomically) after every cell, so it is always current.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdray.cluster.study_tasks import run_cells, study_scratch
from pdray.config import ConfigError, RunConfig, config_to_yaml, load_config
from pdray.evaluation.evaluate import evaluate_folder, run_config
from pdray.evaluation.report import write_study_report
from pdray.evaluation.study_report import write_figures, write_report
from pdray.evaluation.tables import STUDY_METRICS
from pdray.evaluation.tracking import log_study
from pdray.files import write_bytes, write_text

FIXED_BY_STUDY = ("executor", "wandb", "ray")
"""Knobs a study sets itself: every cell runs the local executor inside its Ray task, W&B mode is --wandb."""


@dataclass(frozen=True)
class Axis:
    """One varied knob: its dotted key and its values as typed (each read as YAML, like --set)."""

    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its folder name, grid values as typed (seed included) and the overrides they make."""

    name: str
    values: dict[str, str]

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.values.items()]


@dataclass
class StudySpec:
    """What `pdray study` was asked: the base config, the grid and how to run it."""

    axes: list[Axis]
    seeds: int = 1
    config: str = "default"
    sets: list[str] = field(default_factory=list)
    prompt: str | None = None
    wandb: str = "offline"
    address: str | None = None
    cpus_per_cell: float = 1.0
    gpus_per_cell: float | None = None
    """GPUs per cell; default: 1 on a cluster with GPUs, else 0."""
    retries: int = 1


def split_values(raw: str) -> list[str]:
    """ "7.5,100" -> ["7.5", "100"]; commas inside brackets stay ("[0.02,0.98],[0.02,0.5]" -> two values)."""
    values, depth, current = [], 0, ""
    for ch in raw:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    values.append(current.strip())
    return values


def parse_vary(items: list[str]) -> list[Axis]:
    """["guidance=vsd,sds", "lora.rank=4,8"] -> axes, in the order given; one-line ConfigError on bad syntax."""
    axes: list[Axis] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        values = split_values(raw) if sep else []
        if not key or not values or any(v == "" for v in values):
            raise ConfigError(f"--vary {item!r} must look like key=value1,value2")
        if key.split(".")[0] in FIXED_BY_STUDY:
            raise ConfigError(f"--vary {key}: a study sets {', '.join(FIXED_BY_STUDY)} itself and cannot vary them")
        if key in (a.key for a in axes):
            raise ConfigError(f"--vary {key}: given twice")
        if len(set(values)) != len(values):
            raise ConfigError(f"--vary {key}: repeated value in {raw!r}")
        axes.append(Axis(key, tuple(values)))
    return axes


def cell_name(values: dict[str, str]) -> str:
    """A readable, filesystem-safe folder name: "guidance=vsd,cfg=7.5,particles=4,seed=0"."""
    name = ",".join(f"{k}={v}" for k, v in values.items())
    slug = re.sub(r"[^A-Za-z0-9._=,+-]+", "-", name).strip("-.")
    if len(slug) > 120 or slug != name:  # cut or changed: a short hash keeps distinct cells distinct
        import hashlib

        slug = f"{slug[:110]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return slug


def expand_grid(axes: list[Axis], seeds: int, base_seed: int = 0) -> list[Cell]:
    """Every combination of the axes' values, seeds innermost (seed = base_seed + 0 .. seeds - 1)."""
    if "seed" in (a.key for a in axes):
        if seeds != 1:
            raise ConfigError("--vary seed and --seeds both set the seeds; use one")
        axes_with_seed = axes
    else:
        axes_with_seed = [*axes, Axis("seed", tuple(str(base_seed + i) for i in range(seeds)))]
    keys = [a.key for a in axes_with_seed]
    cells = []
    for combo in itertools.product(*(a.values for a in axes_with_seed)):
        values = dict(zip(keys, combo, strict=True))
        cells.append(Cell(cell_name(values), values))
    return cells


def study_cells(spec: StudySpec) -> list[tuple[Cell, RunConfig]]:
    """The grid with each cell's validated config; any bad key or value fails here, before anything runs."""
    if spec.seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {spec.seeds}")
    if spec.prompt is not None and "prompt" in (a.key for a in spec.axes):
        raise ConfigError("--prompt and --vary prompt both set the prompt; use one")
    extra: dict[str, Any] = {"prompt": spec.prompt, "wandb": spec.wandb, "executor": "local"}
    if spec.address:
        extra["ray"] = {"address": spec.address}
    base = load_config(spec.config, spec.sets, extra)
    out = []
    for cell in expand_grid(spec.axes, spec.seeds, base.seed):
        try:
            config = load_config(spec.config, [*spec.sets, *cell.overrides], extra)
        except ConfigError as err:
            raise ConfigError(f"cell {cell.name}: {err}") from None
        out.append((cell, config))
    return out


def is_finished(run_dir: Path, config: RunConfig) -> bool:
    """A cell is finished when its summary.json is complete (all steps done, the evaluation recorded) and its
    config.yaml is this cell's config (a study resumed with other settings reruns the cells they change)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        saved = (run_dir / "config.yaml").read_text()
    except (OSError, ValueError):
        return False
    complete = summary.get("steps_done", -1) >= config.steps and "saturation" in summary
    return complete and saved == config_to_yaml(config)


def study_row(cell: Cell, summary: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    """One table row: the cell, its grid values (as typed), the run's resolved guidance / cfg / particles and the
    metrics of its summary.json (missing ones left empty), plus ``extra`` (status, attempts, error ...)."""
    summary = summary or {}
    row: dict[str, Any] = {"cell": cell.name, **cell.values}
    for key in ("guidance", "cfg", "particles"):
        row[key] = summary.get(key, row.get(key))
    row |= {k: summary.get(k) for k in STUDY_METRICS}
    row["judged_colours"] = " ".join(summary.get("judged_colours", []))
    return row | extra


def write_table(study_dir: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """study.json (meta + rows) and study.csv (rows), each written atomically."""
    write_text(study_dir / "study.json", json.dumps({**meta, "cells": rows}, indent=2))
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(study_dir / "study.csv", buffer.getvalue())


def write_run_files(run_dir: Path, files: dict[str, bytes]) -> None:
    """A cell's run folder from the files its task returned; summary.json last, so it marks a complete folder."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    for rel in sorted(files, key=lambda r: r == "summary.json"):
        write_bytes(run_dir / rel, files[rel])


def run_study(spec: StudySpec, study_dir: Path, resume: bool = False) -> list[dict[str, Any]]:
    """Run the grid on Ray and write the table, figures, report and the study's W&B run; returns the rows."""
    from tqdm.auto import tqdm

    cells = study_cells(spec)
    runs = study_dir / "runs"
    if not resume and runs.exists() and any(runs.iterdir()):
        raise ConfigError(f"{study_dir} already holds a study; continue it with --resume or choose another --out")
    name = study_dir.resolve().name
    meta = {
        "study": name,
        "prompt": cells[0][1].prompt,
        "config": spec.config,
        "sets": spec.sets,
        "vary": {a.key: list(a.values) for a in spec.axes},
        "seeds": spec.seeds,
    }
    rows: dict[str, dict[str, Any]] = {}
    todo = []
    before = {}  # a finished cell keeps its row (attempts, cell wall time) from the study it finished in
    if resume and (study_dir / "study.json").exists():
        before = {row["cell"]: row for row in json.loads((study_dir / "study.json").read_text())["cells"]}
    for cell, config in cells:
        if resume and is_finished(runs / cell.name, config):
            summary = json.loads((runs / cell.name / "summary.json").read_text())
            old = before.get(cell.name, {})
            rows[cell.name] = study_row(
                cell,
                summary,
                status="done",
                attempts=old.get("attempts", 0),
                cell_wall_s=old.get("cell_wall_s"),
                error="",
            )
        else:
            todo.append((cell, config))
    todo.sort(key=lambda item: item[1].seed)  # the first seed of every grid point first: a partial study spans the grid
    order = [cell.name for cell, _ in cells]

    def table() -> list[dict[str, Any]]:
        return [rows[n] for n in order if n in rows]

    if rows:
        print(f"resume: {len(rows)} of {len(cells)} cells already finished, skipped", flush=True)
    started = time.perf_counter()
    with (
        study_scratch() as scratch,
        tqdm(total=len(cells), initial=len(rows), desc=f"study {name}", unit="run") as bar,
    ):
        for outcome in run_cells(todo, spec, study_name=name, scratch=scratch):
            if outcome.error is None:
                write_run_files(runs / outcome.cell.name, outcome.files)
                status = "done"
            else:
                tqdm.write(f"cell {outcome.cell.name} FAILED after {outcome.attempts} attempts: {outcome.error}")
                status = "failed"
            rows[outcome.cell.name] = study_row(
                outcome.cell,
                outcome.summary,
                status=status,
                attempts=outcome.attempts,
                cell_wall_s=outcome.wall_s,
                error=outcome.error or "",
            )
            write_table(study_dir, meta, table())
            bar.update(1)
    meta["wall_time_s"] = time.perf_counter() - started  # of this invocation (a resumed study: its second part)
    write_table(study_dir, meta, table())
    figures = write_figures(study_dir, table(), [a.key for a in spec.axes])
    write_report(study_dir, meta, table(), figures)
    write_study_report(study_dir, meta, table(), figures, [a.key for a in spec.axes])
    if spec.wandb != "off":
        log_study(study_dir, name, spec.wandb, meta, table(), figures)
    return table()


def evaluate_study(study_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Judge every finished cell of a study from its run folder (``evaluate_folder``: its eval.json and report.html),
    then write STUDY_DIR/eval.json (the study's rows with the fresh metrics), the figures and report.html.

    ``overrides`` apply to every run's saved config (``eval.clip_model=...``). Returns STUDY_DIR/eval.json's content."""

    try:
        meta = json.loads((study_dir / "study.json").read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{study_dir} is not a study folder (no readable study.json)") from None
    rows = []
    for row in meta.pop("cells"):
        run_dir = study_dir / "runs" / row["cell"]
        if row.get("status") == "done" and (run_dir / "config.yaml").is_file():
            metrics = evaluate_folder(run_dir, run_config(run_dir, overrides), strict=True)["stages"]["nerf"]["metrics"]
            row = row | {k: metrics.get(k) for k in STUDY_METRICS if k in metrics or k.startswith("clip_")}
            row["judged_colours"] = " ".join(metrics.get("judged_colours", []))
        rows.append(row)
    report = {**meta, "cells": rows}
    write_text(study_dir / "eval.json", json.dumps(report, indent=2))
    varied = list(meta.get("vary", {}))
    figures = write_figures(study_dir, rows, varied)
    write_study_report(study_dir, meta, rows, figures, varied)
    return report
