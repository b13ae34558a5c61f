"""The paper's preset at Stable Diffusion 2.1's layout: `pdray run --config prolificdreamer` on tiny random-weight
folders for both bases (SD 2.1-base, epsilon, scores; SD 2.1, v-prediction, carries the LoRA), NeRF and mesh stages,
local executor, as a GPU user runs it with the real models."""

from __future__ import annotations

import json

import pytest
import torch
from pdray.cli.main import app
from safetensors import safe_open
from typer.testing import CliRunner

from pdray.config import load_config
from pdray.priors.diffusion import load_prior
from pdray.priors.random_sd import write_random_sd
from pdray.vsd.particle import ParticleGroup
from pdray.vsd.score import ScoreEstimator

runner = CliRunner()


@pytest.fixture(scope="module")
def sd_folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sd21")
    return {base: str(write_random_sd(root / base, "tiny", base)) for base in ("prior", "lora")}


def small(folders: dict[str, str]) -> list[str]:
    """The preset on the tiny folders, with a small hash grid and mesh stage so that two steps take seconds."""
    sets = [f"prior.model={folders['prior']}", f"lora.base={folders['lora']}", "nerf.n_samples=64"]
    sets += ["nerf.resolution={start: 32, end: 48, at_step: 1}", "nerf.occupancy.update_every=1"]
    sets += ["nerf.field.grid.n_levels=4", "nerf.field.grid.log2_hashmap_size=12", "nerf.field.grid.base_resolution=8"]
    sets += ["nerf.recompute_chunk=4096", "eval_views=2", "checkpoint_every=1000"]
    sets += ["mesh.tet_resolution=16", "mesh.render_resolution=32", "mesh.texture_resolution=32"]
    return [*sets, "mesh.geometry_steps=1", "mesh.texture_steps=1"]


def test_the_preset_runs_both_stages_on_sd21_layout_folders(sd_folders, tmp_path) -> None:
    out = tmp_path / "run"
    args = ["run", "--config", "prolificdreamer", "--particles", "2", "--steps", "2", "--executor", "local"]
    args += ["--wandb", "off", "--stages", "nerf,mesh", "--out", str(out)]
    for item in small(sd_folders):
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 2 and summary["particle_score"] == "lora" and summary["estimator"].startswith("vsd")
    assert summary["memory"]["peak_rss_mb"] > 0
    assert summary["mesh"]["failed"] == {} and sorted(summary["mesh"]["particles"]) == ["0", "1"]
    for pid in ("00", "01"):
        assert (out / "particles" / pid / "mesh" / "model.glb").stat().st_size > 0
    checkpoint = next((out / "checkpoints").glob("*-step-0000002"))
    with safe_open(checkpoint / "particles-0000.safetensors", "pt") as shard:  # the grid resumes with its particle
        assert {"0000.occupancy.occupied", "0001.occupancy.density"} <= set(shard.keys())


def test_the_preset_scores_renders_at_the_priors_resolution_with_its_two_bases(sd_folders) -> None:
    config = load_config("prolificdreamer", [*small(sd_folders), "particles=1"])
    prior = load_prior(config.prior)
    assert prior.prediction_type == "epsilon" and prior.image_resolution == 512
    group = ParticleGroup(config, [0], prior)
    particle = group.particles[0]
    for step, resolution in ((0, 32), (1, 48)):  # the schedule switches at step 1
        out, _ = group.render(step)
        assert particle.render(group.cameras(0, step)).rgb.shape[1] == resolution
        assert out.latents.shape[-1] == 64  # every render encoded at 512 px: 64 x 64 latents
        group.apply(step, torch.zeros_like(out.latents))
    assert 0 < particle.occupancy.occupied_fraction < 1  # refreshed from the blob: the corners are empty
    assert ScoreEstimator(config, prior).lora.prediction_type == "v_prediction"
