"""Studies: the metrics on synthetic images, the grid and its validation (fast); a grid of tiny runs on a real
local Ray cluster with resume, a killed cell and a failing cell (slow)."""

import json
import math
import os
import threading
import time

import psutil
import pytest
import torch
from pdray.cli.main import app
from typer.testing import CliRunner

from pdray.config import ConfigError, load_config, save_config
from pdray.evaluation.evaluate import score_views
from pdray.evaluation.metrics import foreground_mask, foreground_saturation, hsv_saturation
from pdray.evaluation.study_report import series
from pdray.study.grid import StudySpec, cell_name, expand_grid, is_finished, parse_vary, split_values, study_cells
from pdray.vsd.checkpoint import checkpoint_folder

runner = CliRunner()


def square(colour, background=(1.0, 1.0, 1.0), size=16) -> torch.Tensor:
    """[1, 3, size, size]: a square of ``colour`` filling the middle half, on ``background``."""
    image = torch.tensor(background).view(1, 3, 1, 1).repeat(1, 1, size, size)
    image[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = torch.tensor(colour).view(1, 3, 1, 1)
    return image


def test_hsv_saturation_of_known_colours():
    pixels = torch.tensor([[1, 0, 0], [1, 0.5, 0.5], [0.5, 0.5, 0.5], [0, 0, 0], [0.2, 0.1, 0.0]]).T.reshape(1, 3, 1, 5)
    assert hsv_saturation(pixels).flatten().tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0, 1.0])


def test_foreground_saturation_counts_the_object_not_the_background():
    assert foreground_saturation(square((1.0, 0.0, 0.0))) == pytest.approx(1.0)
    assert foreground_saturation(square((0.8, 0.4, 0.4))) == pytest.approx(0.5)
    assert foreground_saturation(square((0.3, 0.3, 0.3))) == pytest.approx(0.0)
    # a saturated (tinted) background is the background: a grey object on it reads as unsaturated
    assert foreground_saturation(square((0.3, 0.3, 0.3), background=(0.0, 0.0, 1.0))) == pytest.approx(0.0)
    assert foreground_saturation(torch.ones(2, 3, 8, 8)) == 0.0  # no foreground at all
    assert foreground_mask(square((1.0, 0.0, 0.0))).float().mean() == pytest.approx(0.25)
    both = torch.cat([square((1.0, 0.0, 0.0)), square((0.8, 0.4, 0.4))])
    assert foreground_saturation(both) == pytest.approx(0.75)


def test_run_summaries_get_saturation_and_known_diversity():
    config = load_config("image2d", ["prior.model=/not/the/toy/prior", "particles=3"])  # RGB diversity fallback
    same = {i: square((1.0, 0.0, 0.0), size=32) for i in range(3)}
    result = score_views(config, same)
    assert result["diversity"] == pytest.approx(0.0) and result["saturation"] == pytest.approx(1.0)
    # three images at pairwise RGB distance 1 (one pixel differs by 1 in one channel each): diversity 1
    views = {i: torch.zeros(1, 3, 32, 32) for i in range(3)}
    for i in range(3):
        views[i][0, i, 0, 0] = 1.0 / math.sqrt(2)
    assert score_views(config, views)["diversity"] == pytest.approx(1.0)


def test_the_paper_grid_has_24_readable_cells():
    axes = parse_vary(["guidance=vsd,sds", "cfg=7.5,100", "particles=1,4,8"])
    cells = expand_grid(axes, seeds=2)
    assert len(cells) == 24 and len({c.name for c in cells}) == 24
    assert cells[0].name == "guidance=vsd,cfg=7.5,particles=1,seed=0"
    assert cells[1].overrides == ["guidance=vsd", "cfg=7.5", "particles=1", "seed=1"]
    assert split_values("[0.02,0.98],[0.02,0.5]") == ["[0.02,0.98]", "[0.02,0.5]"]
    odd = cell_name({"prompt": "a red/blue cube?", "seed": "0"})
    assert "/" not in odd and " " not in odd and odd.startswith("prompt=a-red-blue-cube")


@pytest.mark.parametrize(
    ("vary", "message"),
    [
        (["lora.rnk=4,8"], "lora.rnk: unknown key"),
        (["guidance=vsd,vds"], "guidance: Input should be 'vsd' or 'sds'"),
        (["particles=1,0"], "particles: Input should be greater than or equal to 1"),
        (["cfg"], "must look like key=value1,value2"),
        (["cfg=7.5,7.5"], "repeated value"),
        (["executor=local,ray"], "cannot vary"),
    ],
)
def test_bad_grids_fail_up_front_in_one_line(vary, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        study_cells(StudySpec(axes=parse_vary(vary), config="image2d"))
    flags = [arg for v in vary for arg in ("--vary", v)]
    result = runner.invoke(app, ["study", "--config", "image2d", *flags, "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and message.split(":")[0] in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "s").exists()


def test_a_cell_is_finished_only_with_a_complete_summary_and_its_own_config(tmp_path):
    config = load_config("image2d", ["steps=10"])
    assert not is_finished(tmp_path, config)
    save_config(config, tmp_path / "config.yaml")
    (tmp_path / "summary.json").write_text("{")
    assert not is_finished(tmp_path, config)
    (tmp_path / "summary.json").write_text(json.dumps({"steps_done": 10}))
    assert not is_finished(tmp_path, config)
    (tmp_path / "summary.json").write_text(json.dumps({"steps_done": 10, "saturation": 0.3}))
    assert is_finished(tmp_path, config)
    assert not is_finished(tmp_path, load_config("image2d", ["steps=10", "cfg=100"]))


def test_series_average_over_seeds_with_min_max():
    rows = [{"status": "done", "guidance": "vsd", "particles": 4, "diversity": d} for d in (1.0, 3.0)] + [
        {"status": "failed", "guidance": "vsd", "particles": 8, "diversity": None}
    ]
    assert series(rows, "particles", "diversity", ["guidance"]) == {"guidance=vsd": [(4.0, 2.0, 1.0, 3.0)]}


# ---- on a real local Ray cluster (slow) ----


def tiny_study(model, out, *args):
    return runner.invoke(
        app,
        [
            "study",
            "--config",
            "image2d",
            "--prompt",
            "a cube",
            "--set",
            f"prior.model={model}",
            "--set",
            "steps=2",
            "--set",
            "log_every=1",
            *args,
            "--out",
            str(out),
        ],
    )


@pytest.mark.slow
def test_a_2x2_grid_of_tiny_runs_fills_the_study_and_resume_skips_finished_cells(local_ray, tiny_model, tmp_path):
    out = tmp_path / "grid"
    result = tiny_study(tiny_model, out, "--vary", "guidance=vsd,sds", "--vary", "particles=1,2")
    assert result.exit_code == 0, result.output
    table = json.loads((out / "study.json").read_text())
    assert [c["status"] for c in table["cells"]] == ["done"] * 4
    assert (out / "study.csv").read_text().count("\n") == 5
    for name in ("diversity_vs_particles", "fidelity_saturation_vs_cfg", "contact_sheet"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 0
        assert f"figures/{name}.png" in (out / "report.md").read_text()
    page = (out / "report.html").read_text()  # the study's page links each run's page
    assert 'href="runs/guidance%3Dsds%2Cparticles%3D2%2Cseed%3D0/report.html"' in page
    run = out / "runs" / "guidance=sds,particles=2,seed=0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["particles"] == 2 and 0.0 <= summary["saturation"] <= 1.0
    assert list((out / "wandb").glob("offline-run-*"))
    for records in out.glob("runs/*/wandb/offline-run-*/run-*.wandb"):  # complete, not just W&B's 7-byte header
        assert records.stat().st_size > 1000, records
    assert len(list(out.glob("runs/*/wandb/offline-run-*/run-*.wandb"))) == 4
    assert (run / "particles" / "01" / "views.png").exists() and (checkpoint_folder(run) / "manifest.json").exists()

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    again = tiny_study(tiny_model, out, "--vary", "guidance=vsd,sds", "--vary", "particles=1,2")
    assert again.exit_code == 2 and "already holds a study" in again.output
    (out / "runs" / "guidance=vsd,particles=2,seed=0" / "summary.json").unlink()  # an unfinished cell
    resumed = tiny_study(tiny_model, out, "--vary", "guidance=vsd,sds", "--vary", "particles=1,2", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "3 of 4 cells already finished" in resumed.output
    rerun = [p for p in out.glob("runs/*/summary.json") if p not in stamps or p.stat().st_mtime_ns != stamps[p]]
    assert [p.parent.name for p in rerun] == ["guidance=vsd,particles=2,seed=0"]
    attempts = {c["cell"]: c["attempts"] for c in json.loads((out / "study.json").read_text())["cells"]}
    assert attempts == dict.fromkeys(attempts, 1)  # the skipped cells keep their rows from the first invocation


def kill_first_cell_process(killed: list[int], stop: threading.Event) -> None:
    """Kill the first worker of this test's cluster (a descendant of this process) running a study cell."""
    while not stop.is_set() and not killed:
        for proc in psutil.Process().children(recursive=True):
            try:
                if "ray::study_cell" in " ".join(proc.cmdline()):
                    proc.kill()
                    killed.append(proc.pid)
                    return
            except psutil.Error:
                continue
        time.sleep(0.1)


@pytest.mark.slow
def test_a_killed_cell_is_retried_and_a_failing_cell_never_sinks_the_study(local_ray, tiny_model, tmp_path):
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=kill_first_cell_process, args=(killed, stop))
    killer.start()
    try:
        result = tiny_study(tiny_model, tmp_path / "kill", "--vary", "seed=0", "--cpus-per-cell", "2")
    finally:
        stop.set()
        killer.join()
    assert killed, "no study cell process was seen"
    assert result.exit_code == 0, result.output
    assert "failed (attempt 1)" in result.output
    (cell,) = json.loads((tmp_path / "kill" / "study.json").read_text())["cells"]
    assert cell["status"] == "done" and cell["attempts"] == 2

    result = tiny_study(tiny_model, tmp_path / "fail", "--vary", f"prior.model={tiny_model},{tmp_path / 'missing'}")
    assert result.exit_code == 1
    cells = json.loads((tmp_path / "fail" / "study.json").read_text())["cells"]
    assert [c["status"] for c in cells] == ["done", "failed"] and cells[1]["attempts"] == 2
    assert "missing" in cells[1]["error"] and "failed" in (tmp_path / "fail" / "report.md").read_text()
    assert (tmp_path / "fail" / "figures" / "contact_sheet.png").exists()


def test_a_studys_scratch_folder_is_removed_on_every_exit_and_stale_ones_are_swept(tmp_path):
    import socket
    import subprocess
    import sys

    from pdray.cluster.study_tasks import SCRATCH_PREFIX, study_scratch, sweep_stale_scratch

    with pytest.raises(KeyboardInterrupt), study_scratch(tmp_path) as scratch:
        (scratch / "cell-x").mkdir()
        raise KeyboardInterrupt  # Ctrl-C (and SIGTERM, which `pdray study` turns into it)
    assert not scratch.exists()
    # A driver killed with SIGKILL leaves its folder; the next study on this host removes it, not a live one's.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = tmp_path / f"{SCRATCH_PREFIX}{host}@{dead.stdout.strip()}-abcd"
    live = tmp_path / f"{SCRATCH_PREFIX}{host}@{os.getpid()}-abcd"
    other_host = tmp_path / f"{SCRATCH_PREFIX}elsewhere@{dead.stdout.strip()}-abcd"
    for folder in (stale, live, other_host):
        (folder / "cell-y").mkdir(parents=True)
    assert sweep_stale_scratch(tmp_path) == [stale]
    assert live.exists() and other_host.exists() and not stale.exists()
