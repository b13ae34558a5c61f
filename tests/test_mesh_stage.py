"""The mesh stage: regularisers, surface renders, one particle's fine-tune from a tiny NeRF, pdray export, presets."""

from __future__ import annotations

import doctest
import json

import pytest
import torch
import trimesh
from pdray.cli.main import app
from typer.testing import CliRunner

from pdray.config import ConfigError, load_config
from pdray.geometry.mesh import laplacian_smoothness, normal_consistency
from pdray.render import surface
from pdray.rng import Stage

runner = CliRunner()

TINY_MESH = [
    "mesh.tet_resolution=8",
    "mesh.geometry_steps=2",
    "mesh.texture_steps=2",
    "mesh.render_resolution=16",
    "mesh.texture_resolution=32",
]


def tiny_config(model, *overrides):
    return load_config(
        "default",
        [
            f"prior.model={model}",
            "particles=2",
            "steps=2",
            "executor=local",
            "wandb=off",
            "nerf.resolution=16",
            "nerf.n_samples=8",
            "eval_views=2",
            *TINY_MESH,
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory):
    """A finished two-particle NeRF run on the tiny prior (two steps: the NeRFs are still the initial blob)."""
    from pdray.run.local_executor import run_local

    config = tiny_config(tiny_model)
    run_dir = tmp_path_factory.mktemp("run")
    run_local(config, run_dir)
    return config, run_dir


def test_surface_docstring_example_runs() -> None:
    assert doctest.testmod(surface).failed == 0


def test_regularisers_vanish_on_flat_and_smooth_meshes() -> None:
    n = 4  # a flat n x n sheet, two triangles per cell
    axis = torch.linspace(0.0, 1.0, n + 1)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    sheet = torch.cat([grid, torch.zeros(len(grid), 1)], dim=-1)
    corner = torch.tensor([i * (n + 1) + j for i in range(n) for j in range(n)])
    cells = torch.stack([corner, corner + n + 1, corner + n + 2, corner + 1], dim=-1)
    faces = torch.cat([cells[:, [0, 1, 2]], cells[:, [0, 2, 3]]])
    assert normal_consistency(sheet, faces) < 1e-6
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    box_verts = torch.tensor(box.vertices, dtype=torch.float32, requires_grad=True)
    box_faces = torch.tensor(box.faces, dtype=torch.long)
    consistency = normal_consistency(box_verts, box_faces)
    assert 0.2 < float(consistency.detach()) < 1.0  # 12 of the 18 edges are creases at 90 degrees: 1 - cos = 1
    sphere = trimesh.creation.icosphere(subdivisions=3)
    fine = laplacian_smoothness(torch.tensor(sphere.vertices, dtype=torch.float32), torch.tensor(sphere.faces))
    laplacian = laplacian_smoothness(box_verts, box_faces)
    assert fine < laplacian
    (consistency + laplacian).backward()
    assert box_verts.grad is not None and box_verts.grad.isfinite().all()


def test_normal_map_sees_the_facing_side() -> None:
    from pdray.render.cameras import orbit_cameras

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    verts, faces = torch.tensor(sphere.vertices, dtype=torch.float32), torch.tensor(sphere.faces, dtype=torch.long)
    image = surface.render_normals(verts, faces, orbit_cameras(1, elevation=0.0), 16, background=0.0)
    centre = image[0, :, 7:9, 7:9].mean(dim=(1, 2))  # the camera at azimuth 0 sees normal (1, 0, 0) -> (1, .5, .5)
    torch.testing.assert_close(centre, torch.tensor([1.0, 0.5, 0.5]), atol=0.02, rtol=0)
    assert image[0, :, 0, 0].abs().max() == 0  # background


def test_stages_are_validated(tiny_model) -> None:
    assert load_config("default").stages == ["nerf", "mesh"]
    assert load_config("image2d").stages == ["nerf"]
    with pytest.raises(ConfigError, match=r"stages: must be \[nerf\] or \[nerf, mesh\]"):
        load_config("default", ["stages=[mesh]"])
    with pytest.raises(ConfigError, match="the mesh stage needs NeRF particles"):
        load_config("image2d", ["stages=[nerf, mesh]"])


def test_paper_presets_load() -> None:
    geometry, texture = load_config("prolificdreamer-geometry"), load_config("prolificdreamer-texture")
    assert geometry.stages == texture.stages == ["nerf", "mesh"]
    for cfg in (geometry, texture):
        m = cfg.mesh
        assert (m.tet_resolution, m.threshold, m.geometry_steps, m.geometry_cfg, m.geometry_lr) == (
            128,
            25.0,
            15000,
            100.0,
            5e-3,
        )
        assert (m.normal_consistency_weight, m.laplacian_weight, m.t_range.at_step) == (1e4, 1e4, 5000)
        assert not m.fit_grid  # the paper's grid spans the bounding cube
        assert cfg.prior.model == "stabilityai/stable-diffusion-2-1-base" and cfg.nerf.resolution_at(5000) == 512
    assert geometry.mesh.texture_steps == 0
    assert (texture.mesh.texture_steps, texture.mesh.texture_cfg, texture.lora.base) == (
        30000,
        7.5,
        "stabilityai/stable-diffusion-2-1",
    )


def test_fine_tune_moves_geometry_and_texture_from_the_nerf(tiny_run) -> None:
    from pdray.geometry.surface_level import CANDIDATES
    from pdray.priors.diffusion import load_prior
    from pdray.run.mesh_stage import MeshStage, MeshStageError
    from pdray.vsd.checkpoint import load_particle_tensors
    from pdray.vsd.particle import build_particle

    config, run_dir = tiny_run
    prior = load_prior(config.prior)
    particle = build_particle(config, prior, 1)
    particle.load_state_tensors(load_particle_tensors(run_dir, 1)[1])
    stage = MeshStage(config, particle, 1, prior)
    points = torch.rand(64, 3) - 0.5
    torch.testing.assert_close(stage.albedo(points), particle.field(points)[1])  # the texture starts as the albedo
    assert config.mesh.threshold == "silhouette" and stage.threshold in CANDIDATES and stage.silhouette_iou > 0.5
    inside = stage.dmtet.signed_distance() < 0
    torch.testing.assert_close(inside, particle.field.density(stage.dmtet.vertices()) > stage.threshold)

    sdf = stage.dmtet.sdf.detach().clone()
    stats = stage.geometry_step(0, stage.score_estimator("sds", config.mesh.geometry_cfg, Stage.GEOMETRY))
    assert stats["regularisation"] > 0 and stats["nonfinite_dropped"] == 0
    assert not torch.equal(stage.dmtet.sdf.detach(), sdf)
    stage.fix_geometry()
    stats = stage.texture_step(0, stage.score_estimator("vsd", config.mesh.texture_cfg, Stage.TEXTURE))
    assert stats["lora_loss"] > 0
    assert not torch.allclose(stage.albedo(points), particle.field(points)[1])

    empty = config.model_copy(update={"mesh": config.mesh.model_copy(update={"threshold": 1e6})})
    with pytest.raises(MeshStageError, match=r"no surface at mesh\.threshold=1e\+06"):
        MeshStage(empty, particle, 1, prior)


def test_texture_stage_holds_the_texture_to_the_nerfs_renders(tiny_run) -> None:
    """The texture starts as the NeRF's albedo on the mesh's surface, which is not what the NeRF's renders show (they
    blend the albedo along each ray); the default anchor brings the mesh's renders to the NeRF's, VSD alone (the old
    texture stage, which repainted the toy runs' colours) does not."""
    from pdray.evaluation.evaluate import eval_cameras
    from pdray.priors.diffusion import load_prior
    from pdray.run.mesh_stage import MeshStage
    from pdray.vsd.checkpoint import load_particle_tensors
    from pdray.vsd.particle import build_particle

    base, run_dir = tiny_run
    assert (
        base.mesh.texture_anchor_weight > 0 and load_config("prolificdreamer-texture").mesh.texture_anchor_weight == 0
    )

    def distance_after(steps: int, anchor_weight: float) -> float:
        """Mean absolute rgb difference of the mesh's renders to the NeRF's inside both silhouettes."""
        config = base.model_copy(update={"mesh": base.mesh.model_copy(update={"texture_anchor_weight": anchor_weight})})
        prior = load_prior(config.prior)
        particle = build_particle(config, prior, 1)
        particle.load_state_tensors(load_particle_tensors(run_dir, 1)[1])
        stage = MeshStage(config, particle, 1, prior)
        stage.fix_geometry()
        score = stage.score_estimator("vsd", config.mesh.texture_cfg, Stage.TEXTURE)
        for step in range(steps):
            stage.texture_step(step, score)
        cams, size = eval_cameras(config, 4), config.mesh.render_resolution
        with torch.no_grad():
            nerf = particle.render(cams, torch.Generator().manual_seed(0), size)
            mesh = stage.render(cams).permute(0, 2, 3, 1)
            black = surface.render_color(
                stage.mesh_verts, stage.mesh_faces, cams, size, torch.zeros_like, torch.ones_like
            )
        inside = (black[:, 0] < 0.01) & (nerf.opacity[..., 0] > 0.5)
        return float((mesh - nerf.rgb)[inside].abs().mean())

    start = distance_after(0, 0.0)
    assert distance_after(30, base.mesh.texture_anchor_weight) < 0.75 * start
    assert distance_after(30, 0.0) > 0.9 * start


def test_pdray_run_with_the_mesh_stage_then_export_one_particle(tiny_model, tmp_path) -> None:
    out = tmp_path / "run"
    args = ["run", "--particles", "1", "--steps", "2", "--executor", "local", "--wandb", "off", "--out", str(out)]
    args += ["--stages", "nerf,mesh", "--set", f"prior.model={tiny_model}", "--set", "nerf.resolution=16"]
    for item in TINY_MESH:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "particle 0:" in result.output and "watertight True" in result.output
    folder = out / "particles" / "00" / "mesh"
    assert sorted(p.name for p in folder.iterdir()) == [
        "model.glb",
        "model.mtl",
        "model.obj",
        "texture.png",
        "turntable.gif",
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 2 and list(summary["mesh"]["particles"]) == ["0"]
    assert summary["mesh"]["failed"] == {} and summary["mesh"]["config"]["texture_steps"] == 2
    evaluation = json.loads((out / "eval.json").read_text())  # judged again with the mesh's turntable
    assert list(evaluation["stages"]) == ["nerf", "mesh"] and len(evaluation["stages"]["mesh"]["particles"]) == 1
    assert 'href="particles/00/mesh/model.glb?v=' in (out / "report.html").read_text()

    result = runner.invoke(app, ["export", str(out), "--particle", "0", "--set", "mesh.texture_resolution=16"])
    assert result.exit_code == 0, result.output
    mesh = trimesh.load(folder / "model.glb", force="mesh")
    assert mesh.visual.uv is not None and mesh.visual.material.baseColorTexture.size == (16, 16)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 2 and summary["mesh"]["particles"]["0"]["texture_size"] == 16

    result = runner.invoke(app, ["export", str(out), "--particle", "3"])
    assert result.exit_code == 2 and "the run has particles 0 to 0" in result.output


def test_export_refuses_a_folder_without_a_run(tmp_path) -> None:
    result = runner.invoke(app, ["export", str(tmp_path)])
    assert result.exit_code == 2 and "not a run folder" in result.output
