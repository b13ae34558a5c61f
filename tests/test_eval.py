"""Judging runs: the diversity / fidelity functions, a tiny CLIP built in code, `pdray eval` on a real run folder and
a study folder, the W&B particle table, and report.html opened in a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from pdray.cli.main import app
from typer.testing import CliRunner

from pdray.evaluation.diversity import clip_score, mean_pairwise_cosine_distance, normalise, r_precision, vendi_score
from pdray.imaging import load_gif, save_gif

runner = CliRunner()


def test_identical_particles_have_vendi_1_and_no_diversity():
    same = normalise(torch.randn(1, 16)).repeat(5, 1)
    assert vendi_score(same) == pytest.approx(1.0)
    assert mean_pairwise_cosine_distance(same) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", [2, 3, 7])
def test_k_orthogonal_embeddings_have_vendi_k(k):
    basis = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0][:k]  # k orthonormal rows
    assert vendi_score(basis) == pytest.approx(k)
    assert mean_pairwise_cosine_distance(basis) == pytest.approx(1.0)
    # two groups of alike particles count as two
    assert vendi_score(torch.cat([basis[:1].repeat(3, 1), basis[1:2].repeat(3, 1)])) == pytest.approx(2.0)


def test_a_render_near_its_prompt_ranks_above_the_distractors():
    texts = normalise(torch.eye(6, 8, dtype=torch.float64) + 0.01)  # the prompt (row 0) and 5 distractors
    noise = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    near = normalise(texts[0] + 0.1 * noise)
    assert r_precision(near, texts) == 1.0
    assert r_precision(texts[3:5], texts) == 0.0  # renders that are distractors
    assert r_precision(torch.cat([near[:1], texts[3:4]]), texts) == 0.5
    assert clip_score(texts[:1].repeat(3, 1), texts[0]) == pytest.approx(100.0)
    assert clip_score(-texts[:1], texts[0]) == 0.0  # floored at 0, as torchmetrics does


def test_the_tiny_clip_loads_offline_and_judges_identical_particles_as_one(tiny_clip):
    from pdray.evaluation.clip_judge import ClipJudge

    judge = ClipJudge(str(tiny_clip), device="cpu")
    views = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    run, per_particle = judge.metrics("a cube", {0: views, 1: views.clone(), 2: views.clone()}, ["a dog", "a cat"])
    assert run["clip_vendi"] == pytest.approx(1.0, abs=1e-6)
    assert run["clip_diversity"] == pytest.approx(0.0, abs=1e-6)
    assert run["clip_r_precision_chance"] == pytest.approx(1 / 3)
    assert 0.0 <= run["clip_r_precision"] <= 1.0 and 0.0 <= run["clip_score"] <= 100.0
    assert per_particle[0] == pytest.approx(per_particle[2])
    other = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    run, _ = judge.metrics("a cube", {0: views, 1: other}, ["a dog"])
    assert run["clip_vendi"] > 1.0 and run["clip_diversity"] > 0.0
    embeddings = judge.embed_images(views)
    assert embeddings.shape == (3, 8) and torch.allclose(embeddings.norm(dim=-1), torch.ones(3, dtype=torch.float64))


def test_a_missing_clip_is_one_clear_line(tmp_path):
    from pdray.evaluation.clip_judge import ClipJudge, ClipNotFoundError

    with pytest.raises(ClipNotFoundError, match="'missing-org/missing-clip' is neither a local folder nor in"):
        ClipJudge("missing-org/missing-clip")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """The README's first command, shrunk: the toy prior, "a cube", 3 particles, 2 steps, NeRF stage only."""
    out = tmp_path_factory.mktemp("eval") / "a-cube"
    args = ["run", "--particles", "3", "--prompt", "a cube", "--steps", "2", "--executor", "local"]
    args += ["--stages", "nerf", "--wandb", "off", "--set", "eval_views=4", "--set", "nerf.n_samples=16"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_every_run_writes_its_evaluation_and_page(toy_run):
    evaluation = json.loads((toy_run / "eval.json").read_text())
    assert evaluation["step"] == 2 and evaluation["particles"] == 3 and set(evaluation["judges"]) == {"toy", "pixels"}
    nerf = evaluation["stages"]["nerf"]
    assert nerf["judge_of"]["judge_agreement"] == "toy" and nerf["judge_of"]["saturation"] == "pixels"
    assert [p["particle"] for p in nerf["particles"]] == [0, 1, 2] and "judged_colour" in nerf["particles"][0]
    assert {"shape_right", "shape_right_world", "world_kid"} <= set(nerf["metrics"])
    assert "views_right" not in nerf["metrics"]  # a cube looks the same from every side: no view read
    summary = json.loads((toy_run / "summary.json").read_text())
    assert summary["judge_agreement"] == nerf["metrics"]["judge_agreement"]
    page = (toy_run / "report.html").read_text()
    assert "particles/02/turntable.gif" in page and "finished" in page and "http" not in page


def test_pdray_eval_prints_clip_score_r_precision_and_vendi(toy_run, tiny_clip, tmp_path):
    run = tmp_path / "copied-elsewhere"
    shutil.copytree(toy_run, run)  # a run made earlier, elsewhere: only its files
    result = runner.invoke(app, ["eval", str(run), "--clip-model", str(tiny_clip)])
    assert result.exit_code == 0, result.output
    for name in ("clip_score", "clip_r_precision", "clip_vendi", "clip_diversity", "judge_agreement"):
        assert name in result.output
    assert "R-precision by chance" in result.output
    evaluation = json.loads((run / "eval.json").read_text())
    nerf = evaluation["stages"]["nerf"]
    assert evaluation["judges"]["clip"] == f"CLIP {tiny_clip}"
    assert nerf["judge_of"]["clip_vendi"] == "clip" and nerf["judge_of"]["judge_agreement"] == "toy"
    assert 1.0 <= nerf["metrics"]["clip_vendi"] <= 3.0 + 1e-9
    assert all(0.0 <= p["clip_score"] <= 100.0 for p in nerf["particles"])
    assert "clip_vendi" in (run / "report.html").read_text()

    bad = runner.invoke(app, ["eval", str(run), "--clip-model", "missing-org/missing-clip"])
    assert bad.exit_code == 2 and "'missing-org/missing-clip' is neither" in bad.output
    assert "Traceback" not in bad.output
    empty = runner.invoke(app, ["eval", str(tmp_path)])
    assert empty.exit_code == 2 and "not a run folder" in empty.output


def test_a_finished_run_is_judged_without_a_missing_clip_and_says_so(toy_run, tmp_path):
    from pdray.evaluation.evaluate import evaluate_folder, run_config

    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    report = evaluate_folder(run, run_config(run, ["eval.clip_model=missing-org/missing-clip"]))
    assert report["judges"]["clip"].startswith("unavailable: CLIP model 'missing-org/missing-clip'")
    assert "judge_agreement" in report["stages"]["nerf"]["metrics"]
    assert not any(k.startswith("clip_") for k in report["stages"]["nerf"]["metrics"])


def real_clip() -> str | None:
    """A real CLIP on this machine: $PDRAY_CLIP_MODEL, or openai/clip-vit-base-patch32 in the Hugging Face cache."""
    if os.environ.get("PDRAY_CLIP_MODEL"):
        return os.environ["PDRAY_CLIP_MODEL"]
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache("openai/clip-vit-base-patch32", "config.json")
    return "openai/clip-vit-base-patch32" if isinstance(hit, str) else None


@pytest.mark.skipif(
    real_clip() is None, reason="no real CLIP here (set PDRAY_CLIP_MODEL, or cache openai/clip-vit-base-patch32)"
)
def test_pdray_eval_with_a_real_clip(toy_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    result = runner.invoke(app, ["eval", str(run), "--clip-model", real_clip()])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "eval.json").read_text())["stages"]["nerf"]["metrics"]
    assert 5.0 < metrics["clip_score"] < 50.0 and 1.0 <= metrics["clip_vendi"] <= 3.0 + 1e-9


def make_study(run: Path, folder: Path) -> Path:
    """A study folder of two cells, each a copy of a real run folder, with the study.json `pdray study` writes."""
    cells = []
    for seed in (0, 1):
        name = f"guidance=vsd,seed={seed}"
        shutil.copytree(run, folder / "runs" / name)
        cells.append({"cell": name, "guidance": "vsd", "seed": str(seed), "status": "done", "wall_time_s": 1.0})
    meta = {"study": folder.name, "prompt": "a cube", "config": "default", "sets": [], "vary": {"guidance": ["vsd"]}}
    (folder / "study.json").write_text(json.dumps({**meta, "seeds": 2, "cells": cells}))
    return folder


def test_pdray_eval_on_a_study_gives_every_cell_the_same_columns(toy_run, tiny_clip, tmp_path):
    study = make_study(toy_run, tmp_path / "study")
    result = runner.invoke(app, ["eval", str(study), "--clip-model", str(tiny_clip)])
    assert result.exit_code == 0, result.output
    assert "clip_vendi" in result.output and "judge_agreement" in result.output
    rows = json.loads((study / "eval.json").read_text())["cells"]
    assert [r["cell"] for r in rows] == ["guidance=vsd,seed=0", "guidance=vsd,seed=1"]
    assert rows[0]["clip_score"] == pytest.approx(rows[1]["clip_score"]) and rows[0]["wall_time_s"] == 1.0
    page = (study / "report.html").read_text()
    assert 'href="runs/guidance%3Dvsd%2Cseed%3D0/report.html"' in page
    assert (study / "runs" / "guidance=vsd,seed=1" / "eval.json").is_file()


def test_the_wandb_table_has_one_row_per_particle(toy_run, tiny_clip, tmp_path):
    from pdray.evaluation.evaluate import evaluate_folder, run_config
    from pdray.evaluation.tracking import Tracker

    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    config = run_config(run, [f"eval.clip_model={tiny_clip}", "wandb=offline"])
    evaluation = evaluate_folder(run, config)
    tracker = Tracker(run, config)
    tracker.log_evaluation(2, evaluation)
    tracker.finish()
    tables = list(run.glob("wandb/offline-run-*/files/media/table/eval/particles_*.table.json"))
    assert len(tables) == 1, list(run.glob("wandb/**/*"))
    table = json.loads(tables[0].read_text())
    assert table["columns"][:2] == ["particle", "hue"] and {"clip_score", "views"} <= set(table["columns"])
    assert len(table["data"]) == 3 and [row[0] for row in table["data"]] == [0, 1, 2]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(chromium() is None, reason="no Chromium installed (apt-get install chromium)")
def test_report_pages_load_in_headless_chromium_and_show_every_particle(toy_run, tiny_clip, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
    study = make_study(toy_run, tmp_path / "study")
    assert runner.invoke(app, ["eval", str(study), "--clip-model", str(tiny_clip)]).exit_code == 0
    pages = {study / "runs" / "guidance=vsd,seed=0" / "report.html": 3 * 2, study / "report.html": 2 * 3}
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            for path, particle_images in pages.items():
                page = browser.new_page()
                problems: list[str] = []
                page.on("console", lambda m, problems=problems: m.type == "error" and problems.append(m.text))
                page.on("pageerror", lambda e, problems=problems: problems.append(str(e)))
                page.on("requestfailed", lambda r, problems=problems: problems.append(f"failed: {r.url}"))
                page.goto(path.as_uri(), wait_until="load")
                images = page.evaluate(
                    "[...document.querySelectorAll('.particle img')].map(i => "
                    "({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0, "
                    "height: i.getBoundingClientRect().height}))"
                )
                assert problems == [], (path, problems)
                assert len(images) == particle_images, images  # views (and turntables on a run's page)
                assert all(i["ok"] for i in images), images
                assert min(i["height"] for i in images) >= (192 if path.parent != study else 96)
                page.close()
        finally:
            browser.close()


def test_a_checkpoint_refreshes_the_page_and_logs_the_evaluation(tiny_model, tiny_clip, tmp_path):
    from pdray.config import load_config, save_config
    from pdray.evaluation.evaluate import evaluate_checkpoint
    from pdray.evaluation.tracking import Tracker
    from pdray.priors.diffusion import load_prior
    from pdray.vsd.particle import ParticleGroup

    sets = [f"prior.model={tiny_model}", "particles=2", "steps=10", "eval_views=2", "nerf.resolution=16"]
    config = load_config("default", [*sets, "nerf.n_samples=8", "wandb=offline", f"eval.clip_model={tiny_clip}"])
    save_config(config, tmp_path / "config.yaml")
    group = ParticleGroup(config, [0, 1], load_prior(config.prior))
    tracker = Tracker(tmp_path, config)
    report = evaluate_checkpoint(config, group, tmp_path, 5, tracker)
    tracker.finish()
    assert report["step"] == 5 and json.loads((tmp_path / "eval.json").read_text()) == report
    assert {"clip_score", "clip_vendi"} <= set(report["stages"]["nerf"]["metrics"])
    assert (tmp_path / "particles/01/views.png").is_file() and not (tmp_path / "particles/01/turntable.gif").exists()
    page = (tmp_path / "report.html").read_text()
    assert "judged at step 5 of 10; in progress" in page and 'http-equiv="refresh"' in page
    assert len(list(tmp_path.glob("wandb/offline-run-*/files/media/table/eval/particles_*.table.json"))) == 1


def test_a_house_alike_from_every_side_reads_wrong_views_beside_the_worlds_ceiling(tiny_clip, tmp_path):
    """eval.json's 3D read on a run folder whose particle 0 is the world's house from the orbit and particle 1 its
    front view from every side; CLIP (tiny, random) gives its own view read of the same views."""
    from pdray.config import load_config, save_config
    from pdray.evaluation.evaluate import eval_cameras, evaluate_folder
    from pdray.evaluation.world_eval import world_renders
    from pdray.imaging import save_png

    config = load_config("default", ["prompt=a house", "particles=2", "eval_views=8", f"eval.clip_model={tiny_clip}"])
    save_config(config, tmp_path / "config.yaml")
    house = world_renders("a house", eval_cameras(config, 8), 32)[:8]
    for pid, views in enumerate([house, house[:1].expand(8, -1, -1, -1)]):
        save_png(torch.cat(list(views), dim=2), tmp_path / "particles" / f"{pid:02d}" / "views.png")
    nerf = evaluate_folder(tmp_path, config, step=0)["stages"]["nerf"]
    metrics = nerf["metrics"]
    assert metrics["views_right_per_particle"] == {0: 1.0, 1: 0.25} and metrics["views_right"] == 0.625
    assert metrics["views_right_world"] == 1.0 and metrics["shape_right"] == 1.0
    assert nerf["judge_of"]["views_right"] == "toy" and nerf["judge_of"]["clip_views_right"] == "clip"
    assert 0.0 <= metrics["clip_views_right"] <= 1.0
    assert [row["views_right"] for row in nerf["particles"]] == [1.0, 0.25]
    assert "views_right" in (tmp_path / "report.html").read_text()


def test_a_turntable_with_still_frames_reads_back_every_frame(tmp_path: Path) -> None:
    """Pillow stores a run of identical GIF frames as one longer frame; a still (e.g. a symmetric) mesh turntable
    must still read back as one view per camera, or particles get different view counts."""
    frames = torch.rand(6, 3, 8, 8)
    frames[1:4] = frames[1]  # frames 1, 2 and 3 are the same image
    save_gif(frames, tmp_path / "t.gif")
    loaded = torch.from_numpy(load_gif(tmp_path / "t.gif")).permute(0, 3, 1, 2).float() / 255
    assert loaded.shape == (6, 3, 8, 8)
    assert torch.equal(loaded[1], loaded[3]) and not torch.equal(loaded[0], loaded[1])
    assert (loaded - frames).abs().max() < 0.1  # the GIF's palette quantises
