import torch
from pdray.cli.main import app
from typer.testing import CliRunner

from pdray import backends
from pdray.geometry import hashgrid
from pdray.render import raster
from pdray.render.occupancy import march_backend_name
from pdray.vsd.checkpoint import checkpoint_folder

runner = CliRunner()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("doctor", "sample", "run", "resume", "export", "submit", "jobs", "study", "eval", "prior"):
        assert command in result.output


def doctor_line(output: str, label: str) -> str:
    (line,) = [line for line in output.splitlines() if line.startswith(label)]
    return line


def test_doctor_reports_the_backends_pdray_selects_here():
    """What `auto` resolves to on this machine (torch on a CPU, tcnn / nvdiffrast where they import on CUDA)."""
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    for label, backend, reason in [
        ("hash grid", hashgrid.encoding_backend_name("auto"), hashgrid.tcnn_unavailable_reason()),
        ("rasteriser", raster.backend_name("auto"), raster.nvdiffrast_unavailable_reason()),
        ("ray marcher", march_backend_name("auto", DEVICE), backends.nerfacc_unavailable_reason()),
    ]:
        line = doctor_line(result.output, label)
        assert line.split()[len(label.split())] == backend, line
        assert (reason is None) == ("unused" not in line), line
        assert reason is None or reason in line
    assert "toy prior   present" in result.output


def test_doctor_names_the_cuda_backends_when_they_would_be_used(monkeypatch):
    monkeypatch.setattr(hashgrid, "tcnn_unavailable_reason", lambda: None)
    monkeypatch.setattr(raster, "nvdiffrast_unavailable_reason", lambda: None)
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert doctor_line(result.output, "hash grid").split() == ["hash", "grid", "tcnn"]
    assert doctor_line(result.output, "rasteriser").split() == ["rasteriser", "nvdiffrast"]


def test_sample_writes_a_grid(tiny_model, tmp_path):
    out = tmp_path / "grid.png"
    result = runner.invoke(
        app,
        [
            "sample",
            "--prompt",
            "a cube",
            "-n",
            "3",
            "--model",
            str(tiny_model),
            "--steps",
            "2",
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert Image.open(out).size == (3 * 16, 16)


def test_sample_with_a_missing_model_is_one_clear_line(tmp_path):
    result = runner.invoke(
        app, ["sample", "--prompt", "a cube", "--model", "missing-org/missing-model", "--out", str(tmp_path / "x.png")]
    )
    assert result.exit_code == 2
    assert "could not load diffusion model 'missing-org/missing-model'" in result.output
    assert "Traceback" not in result.output


def test_pdray_run_end_to_end_on_the_tiny_prior(tiny_model, tmp_path):
    out = tmp_path / "run"
    args = [
        "run",
        "--prompt",
        "a cube",
        "--particles",
        "2",
        "--steps",
        "3",
        "--executor",
        "local",
        "--stages",
        "nerf",
        "--wandb",
        "off",
        "--set",
        f"prior.model={tiny_model}",
        "--set",
        "nerf.resolution=16",
        "--set",
        "log_every=1",
        "--set",
        "eval_views=2",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "particles/00/views.png",
        "particles/01/turntable.gif",
        "eval.json",
        "report.html",
    ):
        assert (out / name).exists(), name
    assert (checkpoint_folder(out) / "manifest.json").is_file()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already holds a run" in again.output


def test_run_rejects_bad_input_in_one_line(tmp_path):
    result = runner.invoke(app, ["run", "--set", "lora.rank=-1", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "lora.rank: Input should be greater than or equal to 1" in result.output
    result = runner.invoke(app, ["run", "--guidance", "vds", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "guidance: Input should be 'vsd' or 'sds'" in result.output


def test_run_and_submit_options_reach_the_config():
    from pdray.cli.options import run_config

    config = run_config("default", ["lora.rank=8"], prompt="a red mug", stages="nerf", actors=2, address="auto")
    assert (config.prompt, config.stages, config.lora.rank) == ("a red mug", ["nerf"], 8)
    assert (config.ray.actors, config.ray.address) == (2, "auto")
    assert run_config("default", None).ray.actors is None
