"""Exact resume, one run loop, random streams and the batch size as a memory knob, on the tiny random prior."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch
from pdray.cli.main import app
from typer.testing import CliRunner

from pdray.config import load_config
from pdray.priors.diffusion import DiffusionPrior
from pdray.rng import SHARED, Purpose, Stage, seed_of
from pdray.run.loop import RunStopped
from pdray.vsd.checkpoint import load_checkpoint
from pdray.vsd.particle import ParticleGroup
from pdray.vsd.score import ScoreEstimator

runner = CliRunner()


def tiny_config(model, *overrides):
    return load_config(
        "default",
        [
            f"prior.model={model}",
            "executor=local",
            "stages=[nerf]",
            "particles=3",
            "nerf.resolution=16",
            "nerf.n_samples=8",
            "eval_views=2",
            "wandb=off",
            "log_every=1",
            "checkpoint_every=1000",
            "camera.views_per_step=1",  # one latent per particle: these tests are about streams and batches
            *overrides,
        ],
    )


def assert_same_state(a: dict, b: dict, atol: float = 0.0) -> float:
    """Every tensor of two checkpoints equal within atol; returns the largest difference."""
    assert a.keys() == b.keys()
    worst = 0.0
    for part in a:
        assert a[part].keys() == b[part].keys(), part
        for key, value in a[part].items():
            diff = float((value.double() - b[part][key].double()).abs().max()) if value.numel() else 0.0
            assert diff <= atol, f"{part} {key} differs by {diff}"
            worst = max(worst, diff)
    return worst


BATCH_RTOL = 1e-3
"""Relative error (in norm) allowed between results that differ only in how latents are batched into UNet calls.

A batch of another size makes the CPU's matrix kernels block and sum in another order (it depends on the CPU: AVX2
and AVX-512 machines differ, and ATEN_CPU_CAPABILITY does not change the GEMM blocking). A float32 sum of K terms in
any order is within K * 2**-24 of the exact sum, relative to the sum of the terms' magnitudes: about 3e-5 for the
tiny UNet's longest reductions (K = 576, a 3x3 convolution over 64 channels), so at most a few 1e-4 through its ten
or so layers, and measured at 4e-6 to 6e-6. A wrong draw (another particle's noise or t) moves the result by O(1)."""


def assert_close_in_norm(actual: torch.Tensor, expected: torch.Tensor, rtol: float = BATCH_RTOL) -> None:
    """||actual - expected|| <= rtol * ||expected||: the batch-order tolerance, immune to single near-zero elements."""
    error = float((actual.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-30))
    assert error <= rtol, f"relative error {error:.3g} > {rtol:g}"


def signal_after(path, lines: int, signum=signal.SIGINT) -> threading.Thread:
    """Send signum to this process once ``path`` holds ``lines`` lines (a metrics.jsonl being written)."""

    def watch():
        deadline = time.time() + 300
        while time.time() < deadline:
            if path.exists() and len(path.read_text().splitlines()) >= lines:
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.002)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_streams_have_a_fixed_key_layout_so_purposes_never_share_a_draw():
    keys = {seed_of(0, stage, purpose, particle, step) for stage in Stage for purpose in Purpose
            for particle in (SHARED, 0, 1, 1472) for step in (0, 1, 1472)}  # fmt: skip
    assert len(keys) == len(Stage) * len(Purpose) * 4 * 3
    assert seed_of(0, Stage.NERF, Purpose.SCORE, 3, 7) == seed_of(0, Stage.NERF, Purpose.SCORE, 3, 7)
    assert seed_of(1, Stage.NERF, Purpose.SCORE, 3, 7) != seed_of(0, Stage.NERF, Purpose.SCORE, 3, 7)


@pytest.mark.parametrize("shared", [True, False])
def test_adding_a_particle_leaves_the_other_particles_streams_unchanged(tiny_model, shared):
    """SDS is per latent, so with per-particle streams particles 0 and 1 get the same gradient with or without 2:
    bit for bit when every UNet call holds one latent (equal batches), within BATCH_RTOL when it batches 2 or 3."""
    overrides = ["guidance=sds", f"camera.shared={str(shared).lower()}", "particle_score=lora"]
    results = {}
    for batch in (1, 32):
        config = tiny_config(tiny_model, *overrides, f"score_batch_size={batch}")
        prior = DiffusionPrior(tiny_model, device="cpu")
        score = ScoreEstimator(config, prior)
        for ids in ([0, 1], [0, 1, 2]):
            group = ParticleGroup(config.model_copy(update={"particles": len(ids)}), ids, prior)
            render, _ = group.render(5)
            (grad,), _ = score.grads(5, render)
            results[batch, len(ids)] = (render, grad)
    (small, g_small), (big, g_big) = results[1, 2], results[1, 3]
    torch.testing.assert_close(big.c2w[:2], small.c2w, rtol=0, atol=0)
    torch.testing.assert_close(big.latents[:2], small.latents, rtol=0, atol=0)
    torch.testing.assert_close(g_big[:2], g_small, rtol=0, atol=0)  # the same draws, the same UNet calls
    assert not torch.allclose(g_big[0], g_big[1])  # and each particle draws its own noise
    for n in (2, 3):
        assert_close_in_norm(results[32, n][1], results[1, n][1])
    assert_close_in_norm(results[32, 3][1][:2], results[32, 2][1])


@pytest.mark.parametrize("steps_per_update", [1, 2])
def test_score_batch_size_changes_memory_only_not_the_lora_update(tiny_model, steps_per_update):
    states, grads = [], []
    for batch in (1, 2, 3):
        config = tiny_config(
            tiny_model, "particle_score=lora", f"score_batch_size={batch}", f"lora.steps_per_update={steps_per_update}"
        )
        prior = DiffusionPrior(tiny_model, device="cpu")
        group, score = ParticleGroup(config, [0, 1, 2], prior), ScoreEstimator(config, prior)
        render, _ = group.render(0)
        grads.append(score.grads(0, render)[0][0])
        stats = score.lora_update(0, render)
        states.append(score.state_tensors())
        assert stats["lora_loss"] > 0
    # Adam's step g / (|g| + eps) is scale-free: a relative gradient error e moves a weight by at most lr * e / 4 per
    # step, and the moments by e relative; so every LoRA tensor stays within BATCH_RTOL of batch 1's, in norm.
    for other in states[1:]:
        for key, value in other.items():
            if value.numel() > 1:
                assert_close_in_norm(value, states[0][key])
    for other in grads[1:]:
        assert_close_in_norm(other, grads[0])
    adam_steps = [v for k, v in states[0].items() if k.endswith(".step")]
    assert adam_steps and all(float(s) == steps_per_update for s in adam_steps)


MARCHED = ["nerf.occupancy.enabled=true", "nerf.occupancy.update_every=2", "nerf.occupancy.warmup_steps=6"]
MARCHED += ["nerf.resolution={start: 16, end: 24, at_step: 8}", "nerf.recompute_chunk=256", "nerf.n_samples=32"]
"""The paper preset's renderer: the occupancy grid refreshed in both of its modes, the resolution switching mid-run."""


@pytest.mark.parametrize(
    ("particle_score", "renderer"),
    [("lora", []), ("gaussian", []), ("gaussian", MARCHED)],
    ids=["lora", "gaussian", "marched"],
)
def test_a_run_stopped_by_a_signal_resumes_to_exactly_the_uninterrupted_run(
    tiny_model, tmp_path, particle_score, renderer
):
    from pdray.run.local_executor import run_local

    config = tiny_config(tiny_model, f"particle_score={particle_score}", "steps=16", *renderer)
    run_local(config, tmp_path / "whole")
    _, expected = load_checkpoint(tmp_path / "whole")

    stopped = tmp_path / "stopped"
    watcher = signal_after(stopped / "metrics.jsonl", 4, signal.SIGTERM if particle_score == "lora" else signal.SIGINT)
    with pytest.raises(RunStopped) as err:
        run_local(config, stopped)
    watcher.join()
    info, _ = load_checkpoint(stopped)
    logged = [json.loads(line)["step"] for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert 4 <= err.value.step < config.steps and info["step"] == err.value.step == logged[-1]

    summary = run_local(config, stopped, resume=True)
    assert summary["steps_done"] == config.steps
    _, resumed = load_checkpoint(stopped)
    assert_same_state(resumed, expected, atol=1e-5)
    logged = [json.loads(line)["step"] for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, config.steps + 1))  # no step repeated, none skipped


def test_pdray_run_refuses_an_empty_prompt_everywhere(tmp_path):
    for command in (
        ["run", "--prompt", "", "--out", str(tmp_path / "a")],
        ["run", "--prompt", "   ", "--out", str(tmp_path / "b")],
        ["submit", "--prompt", " ", "--address", "http://127.0.0.1:1", "--out", "/shared/runs/x"],
        ["study", "--prompt", "", "--out", str(tmp_path / "c"), "--vary", "cfg=7.5,100"],
        ["sample", "--prompt", "", "--out", str(tmp_path / "d.png")],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "empty" in lines[0], (command, result.output)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_a_stop_during_the_mesh_stage_keeps_finished_meshes_and_resume_finishes(tiny_model, tmp_path):
    """Ctrl-C while particle 1 is meshed: particle 0's mesh is kept, `pdray resume` meshes particle 1 only."""
    out = tmp_path / "run"
    args = ["run", "--particles", "2", "--steps", "2", "--executor", "local", "--wandb", "off", "--out", str(out)]
    args += ["--stages", "nerf,mesh", "--set", f"prior.model={tiny_model}", "--set", "nerf.resolution=16"]
    for item in ("mesh.tet_resolution=8", "mesh.geometry_steps=400", "mesh.texture_steps=2",
                 "mesh.render_resolution=16", "mesh.texture_resolution=16"):  # fmt: skip
        args += ["--set", item]
    first = out / "particles" / "00" / "mesh" / "model.glb"

    def watch():
        deadline = time.time() + 300
        while time.time() < deadline and not first.exists():
            time.sleep(0.01)
        time.sleep(0.5)  # particle 1's geometry stage is under way
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    result = runner.invoke(app, [*args[:1], *args[1:]])
    thread.join()
    assert result.exit_code == 130, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["mesh"]["particles"]) == ["0"]
    kept = first.stat().st_mtime_ns

    result = runner.invoke(app, ["resume", str(out)])
    assert result.exit_code == 0, result.output
    assert "NeRF stage is complete" in result.output and "particles [0] are already meshed" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["mesh"]["particles"]) == ["0", "1"] and summary["mesh"]["failed"] == {}
    assert first.stat().st_mtime_ns == kept
