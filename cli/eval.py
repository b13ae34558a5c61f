"""`pdray eval RUN_DIR|STUDY_DIR`: judge a run (or every run of a study) from its files. Registered in cli/main.py.

Bad input raises ConfigError, FileNotFoundError or ClipNotFoundError, which the registering wrapper prints as one
line with exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def eval_(
    folder: Annotated[Path, typer.Argument(help="A run folder (config.yaml) or a study folder (study.json).")],
    clip_model: Annotated[
        str | None, typer.Option(help="CLIP to judge with: a local folder or a hub id in the HF cache.")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override the saved config: --set eval.distractors=[...].")
    ] = None,
) -> None:
    """Judge a run from the views on disk (CLIP score, R-precision, Vendi; toy judge): eval.json, report.html."""
    from pdray.evaluation.evaluate import evaluate_folder, format_evaluation, run_config

    overrides = [*(set_ or []), *([f"eval.clip_model={clip_model}"] if clip_model else [])]
    if (folder / "study.json").is_file():
        from pdray.evaluation.study_report import markdown_table
        from pdray.study.grid import evaluate_study

        report = evaluate_study(folder, overrides)
        typer.echo(markdown_table(report["cells"], [*report.get("vary", {}), "seed"]))
        typer.echo(f"wrote {folder / 'eval.json'} and {folder / 'report.html'}")
        return
    report = evaluate_folder(folder, run_config(folder, overrides), strict=True)
    typer.echo(format_evaluation(report))
    typer.echo(f"wrote {folder / 'eval.json'} and {folder / 'report.html'}")
