"""benchmarks/gpu_step.py: the weak-scaling formulas, and a CPU smoke run of the tiny SD 2.1 layout without Ray."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_step.py"
COMPONENTS = {"render", "encode", "unet_cfg", "unet_lora", "lora_update", "backward"}
"""The parts of a VSD step the benchmark must time."""


def load_gpu_step():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_projection_follows_the_stated_model() -> None:
    gpu_step = load_gpu_step()
    seconds = {"render": 0.1, "encode": 0.02, "unet_cfg": 0.2, "unet_lora": 0.1, "lora_update": 0.3, "backward": 0.15}
    rows = [{"particles": 2, "seconds": seconds}, {"particles": 1, "error": "out of GPU memory"}]
    mib, kib = 2**20, 2**10
    out = gpu_step.project(rows, lora_bytes=10 * mib, latent_bytes=64 * kib, bandwidth=25e9, latency=1e-3, pcie=20e9)
    assert {(r["gpus"], r["replicas"]) for r in out} == {(g, r) for g in (8, 16, 64) for r in ("1", "G")}
    by_key = {(r["gpus"], r["replicas"]): r for r in out}
    one_gpu = sum(seconds.values())
    # R = G: the one-GPU step plus pdray's all-reduce: reduce-scatter + all-gather through the object store, the
    # share to the host and the sum back, three rounds of actor calls.
    expected = one_gpu + 2 * 7 / 8 * 10 * mib / 25e9 + 2 * 10 * mib / 20e9 + 3 * 1e-3
    assert by_key[8, "G"]["step_s"] == pytest.approx(expected)
    # R = 1: 128 latents at the per-latent score cost of p = 2, and their LoRA update overlapping the backward.
    total = 2 * 64
    expected = 0.1 + 0.02 + 2 * total * 64 * kib / 25e9 + (0.3 / 2) * total + max(0.15, 0.3 / 2 * total)
    assert by_key[64, "1"]["step_s"] == pytest.approx(expected)
    assert by_key[64, "1"]["particles"] == total
    assert by_key[64, "1"]["particles_per_s"] == pytest.approx(total / expected)
    assert by_key[64, "1"]["efficiency"] == pytest.approx(one_gpu / expected)
    assert by_key[64, "G"]["efficiency"] > by_key[8, "1"]["efficiency"]


def test_tiny_run_on_the_cpu_times_every_component_without_ray(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--tiny", "--resolution", "64", "--samples", "16", "--particles", "1,2"]
    command += ["--steps", "1", "--device", "cpu", "--prior-dir", str(tmp_path / "sd21"), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads((out / "gpu_step.json").read_text())
    assert report["checks"]["ray imported"] is False
    for base, prediction in (("prior", "epsilon"), ("lora", "v_prediction")):  # the paper's two bases
        folder = tmp_path / "sd21" / base
        assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
        assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == prediction
    assert [row["particles"] for row in report["components"]] == [1, 2]
    for row in report["components"]:
        assert set(row["seconds"]) == COMPONENTS
        assert all(seconds > 0 for seconds in row["seconds"].values()), row
        assert row["peak_memory_mb"] > 0 and row["nonfinite_grads"] == 0
        assert row["step_s"] >= 0.9 * sum(row["seconds"].values())  # the parts are pdray's step's own
    projection = report["projection"]["rows"]
    keys = {(r["particles_per_gpu"], r["gpus"], r["replicas"]) for r in projection}
    assert keys == {(p, g, r) for p in (1, 2) for g in (8, 16, 64) for r in ("1", "G")}
    assert all(r["step_s"] > 0 and r["particles"] == r["particles_per_gpu"] * r["gpus"] for r in projection)
    table = (out / "gpu_step.md").read_text()
    assert "| 2 | 64 | G | 128 |" in table and "| 1 | 8 | 1 | 8 |" in table
    assert report["projection"]["model"] in table and "R=1" in report["projection"]["model"]
