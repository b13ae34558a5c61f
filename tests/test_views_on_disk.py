"""A run folder's views are judged one particle at a time: the same numbers as judging them all in memory, with
no particle's file read before it is asked for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdray.config import load_config
from pdray.evaluation import evaluate
from pdray.evaluation.evaluate import judge_views, load_views, score_views
from pdray.evaluation.world_eval import world_renders
from pdray.imaging import save_png
from pdray.render.cameras import orbit_cameras


def write_particles(run_dir: Path, views: list[torch.Tensor]) -> None:
    for pid, images in enumerate(views):
        folder = run_dir / "particles" / f"{pid:02d}"
        folder.mkdir(parents=True)
        save_png(torch.cat(list(images), dim=2), folder / "views.png")  # a row of square views, as actors write


@pytest.mark.parametrize("prompt", ["a mug", "a cube"])
def test_views_judged_from_disk_equal_views_judged_in_memory(tmp_path, monkeypatch, prompt):
    config = load_config("default", [f"prompt={prompt}", "eval_views=4"])
    renders = world_renders(prompt, orbit_cameras(4, elevation=15.0), 32, seed=1).split(4)
    write_particles(tmp_path, list(renders))
    on_disk = load_views(tmp_path)
    read = []
    monkeypatch.setattr(evaluate, "_frames", lambda path, frames=evaluate._frames: read.append(path) or frames(path))
    assert len(on_disk) == len(renders) and not read  # nothing read until asked
    in_memory = {pid: on_disk[pid] for pid in on_disk}
    assert len(read) == len(renders)
    streamed, whole = score_views(config, on_disk), score_views(config, in_memory)
    assert streamed.keys() == whole.keys() and "world_kid" in streamed
    assert ("views_right" in streamed) == (prompt == "a mug")  # a cube looks alike from every side
    for key, value in whole.items():
        assert streamed[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert judge_views(config, on_disk).particles == judge_views(config, in_memory).particles


def test_the_pixel_fallback_streams_too(tmp_path, monkeypatch):
    config = load_config("default", ["prompt=a cube", "prior.model=some/other-model"])
    renders = [torch.rand(2, 3, 16, 16) for _ in range(3)]
    write_particles(tmp_path, renders)
    streamed = score_views(config, load_views(tmp_path))
    whole = score_views(config, dict(enumerate(load_views(tmp_path).values())))
    assert streamed["diversity_measure"] == "mean pairwise RGB distance of 32x32 renders"
    assert streamed.pop("dominant_hue_per_particle") == whole.pop("dominant_hue_per_particle")
    assert streamed == pytest.approx(whole) and streamed["diversity"] > 0
    read = []
    monkeypatch.setattr(evaluate, "_frames", lambda path, frames=evaluate._frames: read.append(path) or frames(path))
    rows = judge_views(config, load_views(tmp_path)).particles
    assert len(read) == len(renders)  # one pass: the rows' hues come from it, not from a second read
    assert [row["hue"] is None or 0 <= row["hue"] < 360 for row in rows] == [True] * len(renders)
