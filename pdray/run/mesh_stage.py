"""The mesh stage of one particle: ProlificDreamer's second and third stages, then export. Reads top to bottom:

    NeRF density > mesh.threshold  ->  DMTet SDF                 (MeshStage.__init__)
              ("silhouette": the level whose surface has the NeRF's silhouette, per particle)
    geometry: SDS on rasterised normal maps (CFG 100) + normal consistency + Laplacian   (geometry_step)
    texture:  VSD with a fresh CameraLoRA on the fixed mesh; the texture field starts as a copy of the NeRF's
              density/albedo field, of which only the albedo is used, and is held to the NeRF's renders
              from the same cameras (mesh.texture_anchor_weight)           (texture_step)
    export:   xatlas UVs, baked texture, GLB, OBJ + MTL + PNG and turntable.gif into particles/NN/mesh/

``run_mesh_stage`` does all of it for one particle's NeRF weights, in one process, writing into a folder; the Ray
layer (``pdray.cluster.mesh_tasks``) runs one per particle in parallel and ``run_mesh_local`` one after another.
Both record ``summary.json["mesh"]``: a result per particle, and the error of each one that failed.
"""

from __future__ import annotations

import copy
import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pdray.config import RunConfig
from pdray.evaluation.evaluate import eval_cameras, evaluate_folder, score_views
from pdray.files import write_bytes, write_json
from pdray.geometry.dmtet import DMTet, occupied_radius
from pdray.geometry.mesh import export_mesh, laplacian_smoothness, normal_consistency
from pdray.geometry.surface_level import silhouette_threshold
from pdray.imaging import save_gif
from pdray.priors.diffusion import DiffusionPrior, load_prior
from pdray.render.cameras import CameraRanges, Cameras, orbit_cameras, sample_cameras
from pdray.render.surface import render_color, render_normals
from pdray.rng import Purpose, Stage, stream
from pdray.types import RenderOut
from pdray.vsd.checkpoint import load_particle_tensors
from pdray.vsd.distill import drop_nonfinite, surrogate_loss
from pdray.vsd.particle import NeRFParticle, build_particle, white_background
from pdray.vsd.score import ScoreEstimator

TURNTABLE_FRAMES = 24


class MeshStageError(RuntimeError):
    """The mesh stage cannot go on for this particle (no surface at the threshold, geometry collapsed)."""


def mesh_folder(run_dir: Path, particle_id: int) -> Path:
    return run_dir / "particles" / f"{particle_id:02d}" / "mesh"


class MeshStage:
    """One particle's DMTet geometry and texture field, their optimisers and the score estimators driving them."""

    def __init__(self, config: RunConfig, particle: NeRFParticle, particle_id: int, prior: DiffusionPrior):
        self.config, self.mesh, self.prior, self.particle_id = config, config.mesh, prior, particle_id
        device = prior.device
        field = particle.field
        radius = field.config.radius
        self.threshold, self.silhouette_iou = self.surface_level(particle)
        if self.mesh.fit_grid:
            radius = occupied_radius(field.density, radius, self.threshold)
        self.dmtet = DMTet(self.mesh.tet_resolution, radius).to(device)
        self.dmtet.init_sdf_from_density(field.density, self.threshold)
        if not (self.dmtet.signed_distance() < 0).any():
            with torch.no_grad():
                peak = float(field.density(self.dmtet.vertices()).max())
            raise MeshStageError(
                f"particle {particle_id}: no surface at mesh.threshold={self.threshold:g} "
                f"(the NeRF's density peaks at {peak:.3g} on the grid); lower the threshold"
            )
        self.geometry_optimizer = torch.optim.Adam(
            self.dmtet.parameters(), lr=self.mesh.geometry_lr, betas=(0.9, 0.99), eps=1e-15
        )
        self.normal_background = 1.0 if config.nerf.background == "white" else 0.0  # threestudio: black

        self.nerf = particle  # its renders anchor the texture's colours (mesh.texture_anchor_weight)
        self.texture = copy.deepcopy(field)  # starts as the NeRF's albedo; its density head goes unused
        groups = [
            {"params": self.texture.encoding.parameters(), "lr": config.nerf.lr_grid},
            {"params": self.texture.mlp.parameters(), "lr": config.nerf.lr_net},
        ]
        self.background = white_background
        if particle.background is not None:
            self.background = copy.deepcopy(particle.background)
            groups.append({"params": self.background.parameters(), "lr": config.nerf.lr_net})
        self.texture_optimizer = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15)
        c = config.camera
        self.ranges = CameraRanges(c.elevation, c.azimuth, c.distance, c.fov)
        self.mesh_verts: torch.Tensor | None = None  # the fixed geometry of the texture stage
        self.mesh_faces: torch.Tensor | None = None

    def surface_level(self, particle: NeRFParticle) -> tuple[float, float | None]:
        """The density level to mesh and, for "silhouette", the IoU of its surface's silhouettes with the NeRF's
        opacity > 0.5 from two orbits (the camera range's lowest and highest elevation, 8 azimuths each), at
        mesh.render_resolution."""
        if self.mesh.threshold != "silhouette":
            return float(self.mesh.threshold), None
        c = self.config.camera
        low, high = (orbit_cameras(8, elevation, sum(c.distance) / 2, sum(c.fov) / 2) for elevation in c.elevation)
        high.azimuth = (high.azimuth + 22.5 + 180.0) % 360.0 - 180.0  # between the low orbit's azimuths
        cams = Cameras.cat([low, high]).to(self.prior.device)
        generator = stream(self.config.seed, Stage.GEOMETRY, Purpose.RENDER, self.particle_id, 0)  # the stage's only
        resolution = self.mesh.render_resolution
        with torch.no_grad():  # a view at a time: 16 at once at the paper's 512 pixels may not fit a GPU
            views = [particle.render(cams.index([i]), generator, resolution) for i in range(len(cams))]
        target = torch.cat([view.opacity for view in views])[..., 0] > 0.5
        field = particle.field
        level, scores = silhouette_threshold(
            field.density, target, cams, self.mesh.tet_resolution, field.config.radius, self.mesh.fit_grid
        )
        if scores[level] == 0.0:
            raise MeshStageError(
                f"particle {self.particle_id}: no surface at any mesh.threshold the silhouette search tries "
                f"({min(scores):g} to {max(scores):g}); set a lower mesh.threshold"
            )
        return level, scores[level]

    def score_estimator(self, guidance: str, cfg: float, stage: Stage) -> ScoreEstimator:
        """SDS or VSD with this stage's guidance scale, timestep range and streams; VSD brings a fresh CameraLoRA."""
        update = {
            "guidance": guidance,
            "particle_score": "lora",  # one particle per task: a Gaussian fit to one latent is SDS
            "cfg": cfg,
            "t_range": self.mesh.t_range,
        }
        return ScoreEstimator(self.config.model_copy(update=update), self.prior, stage)

    def cameras(self, step: int, stage: Stage) -> Cameras:
        generator = stream(self.config.seed, stage, Purpose.CAMERA, self.particle_id, step)
        return sample_cameras(self.mesh.views_per_step, self.ranges, generator)

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        """The texture field's colour ``[N, 3]`` at surface points ``[N, 3]``."""
        return self.texture(points)[1]

    def _step(self, z: torch.Tensor, cams: Cameras, score: ScoreEstimator, step: int, regularisation, optimizer):
        """Score the latents, fit the LoRA on them (VSD), then backpropagate the gradient plus a regulariser."""
        render = RenderOut(z.detach().float().cpu(), cams.c2w(), cams.view_labels(), [self.particle_id] * len(cams))
        (grad,), stats = score.grads(step, render)
        stats |= score.lora_update(step, render)
        grad, stats["nonfinite_dropped"] = drop_nonfinite(grad.to(z.device, z.dtype))
        loss = surrogate_loss(z, grad) / z.shape[0] + regularisation
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return stats | {"regularisation": float(regularisation.detach())}

    def geometry_step(self, step: int, score: ScoreEstimator) -> dict[str, float]:
        cams = self.cameras(step, Stage.GEOMETRY)
        verts, faces = self.dmtet()
        if len(faces) == 0:
            raise MeshStageError(f"particle {self.particle_id}: the surface vanished at geometry step {step}")
        normals = render_normals(verts, faces, cams, self.mesh.render_resolution, self.normal_background)
        regularisation = self.mesh.normal_consistency_weight * normal_consistency(verts, faces)
        regularisation = regularisation + self.mesh.laplacian_weight * laplacian_smoothness(verts, faces)
        z = self.prior.encode(normals)
        return self._step(z, cams, score, step, regularisation, self.geometry_optimizer)

    def fix_geometry(self) -> None:
        """Extract the mesh once: the texture stage and the export use it as it is."""
        with torch.no_grad():
            verts, faces = self.dmtet()
        self.mesh_verts, self.mesh_faces = verts.detach(), faces

    def render(self, cams: Cameras) -> torch.Tensor:
        """The textured fixed mesh from ``cams``: ``[B, 3, H, W]`` in [0, 1]."""
        return render_color(
            self.mesh_verts, self.mesh_faces, cams, self.mesh.render_resolution, self.albedo, self.background
        )

    def anchor(self, images: torch.Tensor, cams: Cameras, step: int) -> torch.Tensor:
        """mesh.texture_anchor_weight x the squared distance of the mesh's renders ``[B, 3, H, W]`` to the NeRF's from
        the same cameras, per pixel, weighted by the NeRF's opacity (its background says nothing of the surface)."""
        generator = stream(self.config.seed, Stage.TEXTURE, Purpose.RENDER, self.particle_id, step)
        with torch.no_grad():
            nerf = self.nerf.render(cams, generator, self.mesh.render_resolution)
        target, opacity = nerf.rgb.permute(0, 3, 1, 2), nerf.opacity.permute(0, 3, 1, 2)
        return self.mesh.texture_anchor_weight * (opacity * (images - target) ** 2).mean()

    def texture_step(self, step: int, score: ScoreEstimator) -> dict[str, float]:
        cams = self.cameras(step, Stage.TEXTURE)
        images = self.render(cams)
        z = self.prior.encode(images)
        anchor = self.anchor(images, cams, step) if self.mesh.texture_anchor_weight else torch.zeros(())
        return self._step(z, cams, score, step, anchor.to(z.device), self.texture_optimizer)


def run_mesh_stage(
    config: RunConfig, nerf_tensors: dict[str, torch.Tensor], particle_id: int, folder: Path, progress: bool = False
) -> dict[str, Any]:
    """The mesh stage of one particle from its NeRF weights (``load_particle_tensors``): fine-tune, write the
    meshes and turntable into ``folder``, return stats (JSON-ready)."""
    started = time.perf_counter()
    prior = load_prior(config.prior)
    particle = build_particle(config, prior, particle_id)
    if not isinstance(particle, NeRFParticle):
        raise MeshStageError("the mesh stage needs NeRF particles (particle: nerf)")
    particle.load_state_tensors(nerf_tensors)
    stage = MeshStage(config, particle, particle_id, prior)
    times = {"load": time.perf_counter() - started}
    last: dict[str, dict[str, float]] = {}
    bar_args = {"disable": not progress, "leave": False, "unit": "step"}

    began = time.perf_counter()
    if config.mesh.geometry_steps:
        score = stage.score_estimator("sds", config.mesh.geometry_cfg, Stage.GEOMETRY)
        for step in tqdm(range(config.mesh.geometry_steps), desc=f"geometry {particle_id}", **bar_args):
            last["geometry"] = stage.geometry_step(step, score)
    stage.fix_geometry()
    times["geometry"] = time.perf_counter() - began

    began = time.perf_counter()
    if config.mesh.texture_steps:
        score = stage.score_estimator("vsd", config.mesh.texture_cfg, Stage.TEXTURE)
        for step in tqdm(range(config.mesh.texture_steps), desc=f"texture {particle_id}", **bar_args):
            last["texture"] = stage.texture_step(step, score)
    times["texture"] = time.perf_counter() - began

    began = time.perf_counter()
    stats = export_mesh(stage.mesh_verts, stage.mesh_faces, stage.albedo, folder, config.mesh.texture_resolution)
    with torch.no_grad():
        frames = stage.render(eval_cameras(config, TURNTABLE_FRAMES)).cpu()
    save_gif(frames, folder / "turntable.gif")
    times["export"] = time.perf_counter() - began
    judged = score_views(config, {particle_id: frames})
    return {
        "particle": particle_id,
        "threshold": stage.threshold,
        **({} if stage.silhouette_iou is None else {"silhouette_iou": stage.silhouette_iou}),
        "triangles": stats.triangles,
        "vertices": stats.vertices,
        "watertight": stats.watertight,
        "texture_size": stats.texture_size,
        "wall_time_s": time.perf_counter() - started,
        "time_s": times,
        "last_step": last,
        **({"judge_agreement": judged["judge_agreement"]} if "judge_agreement" in judged else {}),
    }


def run_mesh_local(config: RunConfig, run_dir: Path, particle_ids: list[int]) -> dict[str, Any]:
    """The mesh stage of each particle in this process, one after another; a failure is recorded and the next
    particle goes on. Returns (and records in summary.json) ``{"particles": ..., "failed": ..., ...}``."""
    started = time.perf_counter()
    results, failed = {}, {}

    def record() -> dict[str, Any]:
        return record_mesh_summary(
            run_dir, mesh_summary(config, "local", results, failed, time.perf_counter() - started)
        )

    for pid in tqdm(particle_ids, desc="mesh", unit="particle"):
        try:
            _, tensors = load_particle_tensors(run_dir, pid)
            folder = mesh_folder(run_dir, pid)
            results[pid] = run_mesh_stage(config, tensors, pid, folder, progress=True) | {"folder": str(folder)}
        except Exception as err:  # one broken particle must not cost the others
            failed[pid] = f"{err.__class__.__name__}: {err}"
            tqdm.write(f"mesh stage of particle {pid} failed:\n{traceback.format_exc()}")
        record()  # after each particle, so a stop keeps every mesh finished (``meshed_particles``)
    return record()


def meshed_particles(run_dir: Path) -> set[int]:
    """The particles whose mesh stage finished (recorded in summary.json, files in place): a resume skips them."""
    path = run_dir / "summary.json"
    if not path.exists():
        return set()
    recorded = json.loads(path.read_text()).get("mesh", {}).get("particles", {})
    return {int(pid) for pid in recorded if (mesh_folder(run_dir, int(pid)) / "model.glb").exists()}


def mesh_summary(
    config: RunConfig, executor: str, results: dict[int, dict], failed: dict[int, str], wall: float
) -> dict[str, Any]:
    """``summary.json["mesh"]``: the mesh config used, one result per particle, and each failure's error."""
    return {
        "executor": executor,
        "wall_time_s": wall,
        "config": config.mesh.model_dump(mode="json"),
        "particles": _by_particle(results),
        "failed": _by_particle(failed),
    }


def _by_particle(items: dict) -> dict[str, Any]:
    """Keys as strings (JSON), in particle order."""
    return {str(k): v for k, v in sorted(items.items(), key=lambda kv: int(kv[0]))}


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    """Write each named file into ``folder`` atomically (write beside it, then rename)."""
    for name, data in files.items():
        write_bytes(folder / name, data)


def record_mesh_summary(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Set ``summary.json["mesh"]`` (merged per particle with an earlier export), written atomically, and judge the
    run folder again (eval.json and report.html gain the meshes' turntables and files)."""
    path = run_dir / "summary.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    previous = data.get("mesh", {})
    particles = {k: v for k, v in previous.get("particles", {}).items() if k not in summary["failed"]}
    failed = {k: v for k, v in previous.get("failed", {}).items() if k not in summary["particles"]}
    data["mesh"] = summary | {
        "particles": _by_particle(particles | summary["particles"]),
        "failed": _by_particle(failed | summary["failed"]),
    }
    write_json(path, data)
    if any((run_dir / "particles").glob("*/views.png")):
        evaluate_folder(run_dir)  # eval.json and report.html show the meshes finished so far
    return data["mesh"]
