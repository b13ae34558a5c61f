from pdray.cli.main import app
from typer.testing import CliRunner

runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("doctor", "sample", "run", "resume", "export", "submit", "study", "prior"):
        assert command in result.output


def test_doctor_reports_backends():
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "hash grid   torch" in result.output and "rasteriser  torch" in result.output
    assert "toy prior" in result.output


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


def test_commands_not_yet_built_say_so():
    for command in ("submit", "study", "export", "resume"):
        result = runner.invoke(app, [command])
        assert result.exit_code == 2 and "not yet available" in result.output
