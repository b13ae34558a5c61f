"""What a run records: metrics.jsonl, summary.json and report.html on disk, and one W&B run (offline by default).

Only the driver logs, so W&B steps stay monotonic; the step is the VSD step (``vsd_step`` metric).
The W&B API key is read by wandb itself from the environment and never written or logged by pdray.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pdray.config import RunConfig
from pdray.evaluation.report import write_run_report
from pdray.evaluation.study_report import particle_sheet
from pdray.files import write_json
from pdray.imaging import to_uint8


@dataclass(frozen=True)
class WandbLabels:
    """How a run is filed in W&B beyond its own config: a group (a study's name) and extra config (its grid values)."""

    group: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


class Tracker:
    def __init__(self, run_dir: Path, config: RunConfig, resume: bool = False, labels: WandbLabels | None = None):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.wandb = None
        if config.wandb != "off":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            labels = labels or WandbLabels()
            self.wandb = wandb.init(
                project="pdray",
                dir=str(run_dir),
                mode=config.wandb,
                name=run_dir.name,
                group=labels.group,
                config=config.model_dump(mode="json") | labels.config,
                resume="allow" if resume else None,
                id=_wandb_id(run_dir),
                reinit="finish_previous",
            )
            self.wandb.define_metric("vsd_step")
            self.wandb.define_metric("*", step_metric="vsd_step")

    def log(self, step: int, metrics: dict[str, float], to_wandb: bool = True) -> None:
        record = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None and to_wandb:
            self._wandb_log({"vsd_step": step, **metrics})

    def log_particles(self, step: int, images: dict[int, torch.Tensor]) -> None:
        """Per-particle render grids: one image per particle and a table with one row per particle."""
        if self.wandb is None:
            return
        import wandb

        table = wandb.Table(columns=["particle", "views"])
        for pid, views in images.items():
            table.add_data(pid, wandb.Image(to_uint8(torch.cat(list(views), dim=2))))
        self._wandb_log({"vsd_step": step, "particles": table})

    def log_evaluation(self, step: int, evaluation: dict[str, Any]) -> None:
        """eval.json's content (``pdray.evaluation.evaluate.evaluate_folder``) into W&B: each stage's scalar metrics as
        ``eval/<stage>/<metric>``, and a table with one row per particle (views, CLIP score, hue, judged colour)."""
        if self.wandb is None:
            return
        import wandb

        scalars = {
            f"eval/{stage}/{k}": v
            for stage, result in evaluation["stages"].items()
            for k, v in result["metrics"].items()
            if isinstance(v, (int, float))
        }
        rows = evaluation["stages"]["nerf"]["particles"]
        columns = list(dict.fromkeys(k for row in rows for k in row))
        table = wandb.Table(columns=[*columns, "views"])
        for row in rows:
            views = self.run_dir / "particles" / f"{row['particle']:02d}" / "views.png"
            image = wandb.Image(str(views)) if views.is_file() else None
            table.add_data(*(row.get(c) for c in columns), image)
        self._wandb_log({"vsd_step": step, **scalars, "eval/particles": table})

    def summary(self, data: dict[str, Any]) -> None:
        """Write summary.json, log the run's last evaluation (eval.json, when there is one) to W&B and refresh
        report.html, which shows both."""
        write_json(self.run_dir / "summary.json", data)
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in data.items() if isinstance(v, (int, float, str))})
            evaluation = self.run_dir / "eval.json"
            if evaluation.is_file():
                self.log_evaluation(int(data.get("steps_done", 0)), json.loads(evaluation.read_text()))
        write_run_report(self.run_dir)

    def _wandb_log(self, data: dict[str, Any]) -> None:
        """wandb.log; if W&B's service is gone (a job stop signals the whole process group), W&B is dropped for the
        rest of the run and the files on disk stay the record."""
        try:
            self.wandb.log(data)
        except ConnectionError:
            print("W&B's service has stopped: logging to metrics.jsonl only from here", flush=True)
            self.wandb = None

    def finish(self) -> None:
        """Close the W&B run. Stopping a Ray job signals its whole process tree, W&B's service too; when that service
        is gone the files on disk (metrics.jsonl, the checkpoint) are the record, so say so instead of failing."""
        if self.wandb is None:
            return
        try:
            self.wandb.finish()
        except ConnectionError:
            print("W&B's service had stopped: the W&B run lacks its last records (metrics.jsonl has them)", flush=True)


def flush_wandb() -> None:
    """Put every W&B record of this process on disk by stopping W&B's service process (the next run restarts it):
    ``finish()`` can return before an offline run's file is complete, which matters when the folder is then copied."""
    import wandb

    wandb.teardown()


def _wandb_id(run_dir: Path) -> str:
    """A stable W&B id per run folder, so a resumed run continues the same W&B run."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over all pairs of rows of features [N, D]; 0 for fewer than two."""
    if features.shape[0] < 2:
        return 0.0
    d = torch.cdist(features.float(), features.float())
    n = features.shape[0]
    return float(d.sum() / (n * (n - 1)))


def run_summary(config: RunConfig, executor: str, wall: float, steps_run: int, totals: dict[str, float]) -> dict:
    """The fields every summary.json starts with; ``totals`` are summed "time/..." stats of this session."""
    steps_run = max(1, steps_run)
    return {
        "prompt": config.prompt,
        "particles": config.particles,
        "guidance": config.guidance,
        "particle_score": config.particle_score_used if config.guidance == "vsd" else None,
        "estimator": config.estimator,
        "cfg": config.cfg,
        "executor": executor,
        "steps_done": config.steps,
        "wall_time_s": wall,
        "steps_per_s": steps_run / wall if wall > 0 else 0.0,
        "time_per_step_s": {k[len("time/") :]: v / steps_run for k, v in totals.items()},
    }


def log_study(study_dir: Path, name: str, mode: str, meta: dict[str, Any], rows: list[dict], figures: list[Path]):
    """The study's own W&B run (group = the study): its table, with each run's particle sheet as an image column,
    and its figures. Each cell's run is already in the same group with its grid values in its config."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        project="pdray",
        dir=str(study_dir),
        mode=mode,
        name=f"{name}-study",
        group=name,
        job_type="study",
        config=meta,
        reinit="finish_previous",
    )
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = wandb.Table(columns=[*columns, "particle_sheet"])
    for row in rows:
        sheet = particle_sheet(study_dir / "runs" / row["cell"])
        table.add_data(*(row.get(c) for c in columns), wandb.Image(sheet) if sheet is not None else None)
    run.log({"study": table, **{f"figures/{p.stem}": wandb.Image(str(p)) for p in figures}})
    run.finish()
