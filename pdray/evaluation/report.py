"""The pages to look at: RUN_DIR/report.html and STUDY_DIR/report.html, static and self-contained.

    write_run_report(run_dir)                           # from the folder's files alone
    write_study_report(study_dir, meta, rows, figures)  # the study's table, figures and each run's particles

A run page shows each particle's views and turntables scaled up (nearest-neighbour, so pixels stay pixels), the
metrics of eval.json with the judge behind each, timings, the config and links to the meshes. Images are the
files beside the page, linked by relative path (with their modification time as a query, so a refreshed page
shows new renders): the folder can be copied or served anywhere; nothing is fetched from the network. A page of a
run still in progress reloads itself every ``REFRESH_S`` seconds, so it can be left open to watch.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from pdray.evaluation.tables import STUDY_METRICS, TABLE_METRICS
from pdray.files import write_text

REPORT = "report.html"
REFRESH_S = 30
MESH_FILES = ("model.glb", "model.obj", "model.mtl", "texture.png")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #eee; } td.l, th.l { text-align: left; }
img.px { image-rendering: pixelated; background: #fff; border: 1px solid #ddd; }
.particles { display: flex; flex-wrap: wrap; gap: 1em; }
.particle { background: #fff; border: 1px solid #ddd; padding: 0.6em; border-radius: 4px; }
.particle { max-width: 100%; overflow-x: auto; }
.particle h3 { margin: 0 0 0.4em 0; font-size: 1em; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border: 1px solid #999; vertical-align: middle; }
pre { background: #fff; border: 1px solid #ddd; padding: 0.6em; font-size: 0.8em; overflow-x: auto; }
.muted { color: #777; }
"""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value + 0.0:.4g}"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def _src(page_dir: Path, path: Path) -> str:
    """A relative link to ``path`` from a page in ``page_dir``, its mtime as a cache-busting query."""
    return f"{quote(path.relative_to(page_dir).as_posix())}?v={path.stat().st_mtime_ns}"


def _img(page_dir: Path, path: Path, height: int, alt: str) -> str:
    return f'<img class="px" src="{_src(page_dir, path)}" style="height:{height}px" alt="{html.escape(alt)}">'


def _page(title: str, body: list[str], refresh: bool) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_S}">' if refresh else ""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{meta}'
        f'<link rel="icon" href="data:,"><title>{html.escape(title)}</title><style>{STYLE}</style></head>\n'
        "<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _write(path: Path, text: str) -> Path:
    write_text(path, text)
    return path


def _table(columns: list[str], rows: list[list[str]], left: int = 1) -> str:
    """An HTML table; cells are given as HTML; the first ``left`` columns align left."""
    head = "".join(f'<th class="{"l" if i < left else ""}">{html.escape(c)}</th>' for i, c in enumerate(columns))
    body = [
        "<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(row)) + "</tr>"
        for row in rows
    ]
    return f"<table><tr>{head}</tr>" + "".join(body) + "</table>"


def _hue(value: Any) -> str:
    if value is None:
        return "grey"
    return f'<span class="swatch" style="background:hsl({int(value)},85%,50%)"></span> {int(value)}°'


def metrics_section(evaluation: dict[str, Any]) -> list[str]:
    """eval.json's metrics, a column per stage, with the judge behind each number."""

    stages = evaluation["stages"]
    rows = []
    for name in TABLE_METRICS:
        present = [s for s in stages if name in stages[s]["metrics"]]
        if present:
            values = [html.escape(_fmt(stages[s]["metrics"].get(name))) for s in stages]
            rows.append([html.escape(name), *values, html.escape(stages[present[0]]["judge_of"][name])])
    chance = stages["nerf"]["metrics"].get("clip_r_precision_chance")
    judges = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in evaluation["judges"].items())
    return [
        "<h2>Metrics</h2>",
        _table(["metric", *[f"{s} stage" for s in stages], "judge"], rows),
        f'<p class="muted">R-precision by chance: {chance:.3f}.</p>' if chance is not None else "",
        f"<ul>{judges}</ul>",
    ]


def particle_cards(
    run_dir: Path, page_dir: Path, evaluation: dict[str, Any], height: int = 192, turntables: bool = True
) -> list[str]:
    """One card per particle folder: its views, turntables (if asked), per-particle scores and mesh files."""
    rows = {str(r["particle"]): r for r in evaluation.get("stages", {}).get("nerf", {}).get("particles", [])}
    cards = []
    for folder in sorted((run_dir / "particles").glob("[0-9]*")):
        parts = [f"<h3>particle {html.escape(folder.name)}</h3>"]
        if (folder / "views.png").is_file():
            parts.append(f"<div>{_img(page_dir, folder / 'views.png', height, f'views {folder.name}')}</div>")
        gifs = [(folder / "turntable.gif", "NeRF turntable"), (folder / "mesh/turntable.gif", "mesh turntable")]
        shown = [
            f"<figure style='display:inline-block;margin:0.3em'>{_img(page_dir, p, 256, f'{label} {folder.name}')}"
            f"<figcaption class='muted'>{label}</figcaption></figure>"
            for p, label in gifs
            if turntables and p.is_file()
        ]
        parts.append("<div>" + "".join(shown) + "</div>")
        row = rows.get(str(int(folder.name)))
        if row:
            scores = [("hue", _hue(row.get("hue")))]
            scores += [(k, html.escape(_fmt(v))) for k, v in row.items() if k not in ("particle", "hue")]
            parts.append("<div>" + " &middot; ".join(f"{html.escape(k)} {v}" for k, v in scores) + "</div>")
        links = [
            f'<a href="{_src(page_dir, folder / "mesh" / name)}">{name}</a>'
            for name in MESH_FILES
            if (folder / "mesh" / name).is_file()
        ]
        if links:
            parts.append("<div>mesh: " + " ".join(links) + "</div>")
        cards.append('<div class="particle">' + "\n".join(parts) + "</div>")
    return ['<div class="particles">', *cards, "</div>"]


def timings_section(run_dir: Path) -> list[str]:
    """Wall time, steps per second and time per step (summary.json), or the last logged step (metrics.jsonl)."""
    summary = _read_json(run_dir / "summary.json")
    rows = [
        [k, html.escape(_fmt(summary.get(k)))]
        for k in ("executor", "wall_time_s", "steps_per_s", "startup_s")
        if k in summary
    ]
    rows += [[f"time per step: {k} (s)", html.escape(_fmt(v))] for k, v in summary.get("time_per_step_s", {}).items()]
    mesh = summary.get("mesh", {})
    if "wall_time_s" in mesh:
        rows.append(["mesh stage wall_time_s", html.escape(_fmt(mesh["wall_time_s"]))])
    for pid, error in mesh.get("failed", {}).items():
        rows.append([f"mesh of particle {pid}", f"FAILED: {html.escape(str(error))}"])
    log = run_dir / "metrics.jsonl"
    if log.is_file() and log.stat().st_size:
        last = json.loads(log.read_text().strip().splitlines()[-1])
        rows.append(["last logged step", html.escape(_fmt(last.get("step")))])
        if "time/step" in last:
            rows.append(["its time/step (s)", html.escape(_fmt(last["time/step"]))])
    return ["<h2>Timings</h2>", _table(["", "value"], rows) if rows else '<p class="muted">none recorded yet</p>']


def write_run_report(run_dir: Path) -> Path:
    """RUN_DIR/report.html from the folder's files (config.yaml, summary.json, eval.json, metrics.jsonl, particle
    images, meshes); returns its path."""
    config_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    config = yaml.safe_load(config_text) or {}
    summary = _read_json(run_dir / "summary.json")
    evaluation = _read_json(run_dir / "eval.json")
    steps = config.get("steps")
    step = evaluation.get("step", summary.get("steps_done"))
    finished = "steps_done" in summary and steps is not None and summary["steps_done"] >= steps
    status = "finished" if finished else f"in progress (this page reloads every {REFRESH_S} s)"
    prompt = str(config.get("prompt", ""))
    body = [
        f"<h1>{html.escape(prompt)} <span class='muted'>({html.escape(run_dir.name)})</span></h1>",
        f"<p>{html.escape(str(config.get('guidance', '')))} with {config.get('particles', '?')} particles, "
        f"CFG {config.get('cfg', '?')}, prior {html.escape(str(config.get('prior', {}).get('model', '?')))}; "
        f"judged at step {html.escape(_fmt(step))} of {steps}; {status}.</p>",
        *(metrics_section(evaluation) if evaluation.get("stages") else ['<p class="muted">not judged yet</p>']),
        "<h2>Particles</h2>",
        *particle_cards(run_dir, run_dir, evaluation),
        *timings_section(run_dir),
        "<h2>Config</h2>",
        f"<details><summary>config.yaml</summary><pre>{html.escape(config_text)}</pre></details>",
    ]
    return _write(run_dir / REPORT, _page(f"pdray: {prompt}", body, refresh=not finished))


def write_study_report(
    study_dir: Path, meta: dict[str, Any], rows: list[dict[str, Any]], figures: list[Path], varied: list[str]
) -> Path:
    """STUDY_DIR/report.html: the table (each cell linking to its run's page; metric columns that no row has are
    left out), the figures, and every run's particles."""

    metrics = [m for m in STUDY_METRICS if any(row.get(m) is not None for row in rows)]
    columns = ["cell", *dict.fromkeys([*varied, "guidance", "cfg", "particles", "seed"]), *metrics, "status"]
    table_rows = []
    for row in rows:
        run = study_dir / "runs" / row["cell"]
        name = html.escape(row["cell"])
        link = f'<a href="{quote((run / REPORT).relative_to(study_dir).as_posix())}">{name}</a>'
        cells = [html.escape(_fmt(row.get(c))) for c in columns[1:]]
        table_rows.append([link if (run / REPORT).is_file() else name, *cells])
    body = [
        f"<h1>Study {html.escape(str(meta.get('study', study_dir.name)))}</h1>",
        f"<p>Prompt {html.escape(repr(meta.get('prompt')))}, config {html.escape(str(meta.get('config')))}, "
        f"{len(rows)} runs. Metric columns come from each run's judges (see a run's page for which judge gave which "
        "number: clip_* from CLIP, judge_*, colour_* and diversity from the toy judge with the toy prior).</p>",
        _table(columns, table_rows),
        "<h2>Figures</h2>",
        *[f"<div>{_img(study_dir, p, 360, p.stem)}</div>" for p in figures if p.is_file()],
        "<h2>Particles</h2>",
    ]
    for row in rows:
        run = study_dir / "runs" / row["cell"]
        if (run / "particles").is_dir():
            cards = particle_cards(run, study_dir, _read_json(run / "eval.json"), height=96, turntables=False)
            body += [f"<h3>{html.escape(row['cell'])}</h3>", *cards]
    return _write(study_dir / REPORT, _page(f"pdray study {meta.get('study', '')}", body, refresh=False))
