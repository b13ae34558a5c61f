"""The typed run configuration: presets (YAML) + dotted overrides -> one validated RunConfig.

Every knob has one name, used alike in YAML, on the command line (``--set lora.rank=8``) and in logs.
Errors name the key and what is allowed, in one line. Configs are dumped as plain YAML and read back
with ``yaml.safe_load``; a saved config reloads unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from pdray.files import write_text
from pdray.geometry.hashgrid import GridConfig
from pdray.geometry.nerf import FieldConfig

PRESETS_PACKAGE = "pdray.configs"

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Unit = Annotated[float, Field(gt=0.0, lt=1.0)]
Positive = Annotated[float, Field(gt=0.0)]


class ConfigError(ValueError):
    """A config problem, stated in one line that names the key."""


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True, allow_inf_nan=False
    )


class PriorConfig(Section):
    model: str = "toyworld"
    """The pretrained diffusion model: "toyworld" (shipped), a hub id or a local Stable-Diffusion-format folder."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """UNet / VAE precision: auto is float16 on CUDA and float32 on the CPU."""
    view_dependent_prompting: bool = True
    """Append ", front view" / ", side view" / ", back view" / ", overhead view" by camera azimuth (DreamFusion)."""
    view_guidance: Annotated[float, Field(ge=0)] = 7.5
    """Extra guidance along the view suffix: adds ``view_guidance x (eps(prompt, view) - eps(prompt))``, less its
    per-channel mean, to the guided prediction (one more UNet pass per latent), so the camera's view binds harder than
    the prior binds it alone (toy houses: views right 0.75 -> 0.94; README "Particles that are 3D"); 0: off (paper)."""


class TRange(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)

    start: tuple[Unit, Unit] = (0.02, 0.98)
    """Range of t / T sampled before ``at_step``."""
    end: tuple[Unit, Unit] = (0.02, 0.50)
    """Range of t / T sampled from ``at_step`` on (ProlificDreamer anneals the upper bound to 0.5)."""
    at_step: Annotated[int, Field(ge=0)] = 5000
    """The step at which the range switches."""

    @model_validator(mode="after")
    def _ordered(self) -> TRange:
        for name in ("start", "end"):
            lo, hi = getattr(self, name)
            if lo >= hi:
                raise ValueError(f"{name} must be [low, high] with low < high, got [{lo}, {hi}]")
        return self


class LoraConfig(Section):
    rank: Annotated[int, Field(ge=1)] = 4
    """LoRA rank on the UNet attention projections (to_q, to_k, to_v, to_out.0)."""
    alpha: Annotated[float, Field(gt=0)] = 4.0
    """LoRA scaling numerator (the update is scaled by alpha / rank)."""
    lr: Annotated[float, Field(gt=0)] = 3e-3
    """AdamW learning rate of the LoRA and the camera embedding (paper: 1e-4 over 25000 steps; a toy run's 600 steps
    need 3e-3, README "Particles that are 3D")."""
    camera_condition: bool = True
    """Condition the LoRA on the camera (flattened 4x4 camera-to-world matrix through a class embedding)."""
    camera_dropout: Probability = 0.1
    """Probability of dropping the camera condition in a LoRA training step."""
    base: str = "same"
    """"same": the LoRA sits on the prior's UNet; else a model id/folder for a separate base (paper: SD 2.1 v-pred)."""
    cfg: Annotated[float, Field(ge=1.0)] = 1.0
    """Classifier-free guidance of the LoRA's prediction; 1.0 runs no extra unconditional pass."""
    steps_per_update: Annotated[int, Field(ge=1)] = 1
    """LoRA optimisation steps per particle step, each on all of the step's latents (paper: 1)."""


class CameraConfig(Section):
    elevation: tuple[Annotated[float, Field(ge=-90, le=90)], Annotated[float, Field(ge=-90, le=90)]] = (-10.0, 45.0)
    """Elevation range, degrees."""
    azimuth: tuple[Annotated[float, Field(ge=-360, le=360)], Annotated[float, Field(ge=-360, le=360)]] = (
        -180.0,
        180.0,
    )
    """Azimuth range, degrees (0 looks at the object's front)."""
    distance: tuple[Positive, Positive] = (1.3, 1.7)
    """Camera distance range, world units (objects live in a sphere of radius 1)."""
    fov: tuple[Annotated[float, Field(gt=0, lt=180)], Annotated[float, Field(gt=0, lt=180)]] = (40.0, 50.0)
    """Vertical field of view range, degrees."""
    views_per_step: Annotated[int, Field(ge=1)] = 4
    """Cameras rendered per particle per step of the NeRF stage: 4 carve front, side and back apart (paper: 1)."""
    shared: bool = True
    """Every particle sees the same cameras at a step, so their renders form one sample of q(x | c) per camera."""

    @field_validator("elevation", "azimuth", "distance", "fov")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] > value[1]:
            raise ValueError(f"must be [low, high] with low <= high, got [{value[0]}, {value[1]}]")
        return value


class ResolutionSchedule(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    start: Annotated[int, Field(ge=8)] = 64
    """Render resolution (pixels) before ``at_step``."""
    end: Annotated[int, Field(ge=8)] = 512
    """Render resolution from ``at_step`` on."""
    at_step: Annotated[int, Field(ge=0)] = 5000
    """The step at which the resolution switches (threestudio's ProlificDreamer: 64 px, then 512 from step 5000)."""


class OccupancyConfig(Section):
    enabled: bool = False
    """March rays through an occupancy grid with early termination (Instant-NGP, nerfacc) instead of sampling every
    ray ``n_samples`` times: the step is the cube's diagonal over ``n_samples``; empty cells and samples behind an
    opaque surface are skipped (``pdray.render.occupancy``). What fits the paper's 512 px renders on a GPU."""
    resolution: Annotated[int, Field(ge=2)] = 32
    """Cells per side of the grid over [-radius, radius]^3 (threestudio: 32)."""
    update_every: Annotated[int, Field(ge=1)] = 16
    """Steps between refreshes of the grid from the field (nerfacc: 16)."""
    warmup_steps: Annotated[int, Field(ge=0)] = 256
    """Steps during which every refresh visits every cell; later ones visit a random quarter of the cells and as many
    occupied ones (nerfacc: 256)."""
    threshold: Annotated[float, Field(gt=0)] = 0.01
    """A cell is occupied where density x step size exceeds this (or the grid's mean, if lower) (nerfacc: 0.01)."""
    decay: Probability = 0.95
    """Per refresh, a cell keeps max(decay x its value, the new one) (nerfacc: 0.95)."""
    early_stop: Annotated[float, Field(ge=0, lt=1)] = 1e-4
    """Samples behind transmittance below this are dropped (early ray termination; nerfacc: 1e-4)."""
    alpha_threshold: Annotated[float, Field(ge=0, lt=1)] = 0.01
    """Samples with opacity below this are dropped (threestudio: 0.01)."""
    backend: Literal["auto", "torch", "nerfacc"] = "auto"
    """Ray marcher: auto takes nerfacc's CUDA traversal where a real try of it works, else PyTorch."""


def _resolution_kind(value: Any) -> str:
    """Which form ``nerf.resolution`` takes: a mapping is a schedule, anything else a number of pixels."""
    return "schedule" if isinstance(value, dict | ResolutionSchedule) else "pixels"


UNION_TAGS = {"pixels", "schedule"}
"""Tags of tagged unions, which pydantic puts in an error's location; dropped from the key an error names."""


class NerfConfig(Section):
    # The defaults below are sized for the toy world on a 2-core CPU and were measured on "a cube" x8 (README,
    # "VSD that delivers"): the world's objects are 0.3-0.42 across, so the initial blob is too; sparsity and
    # opacity-entropy regularisers at weight 30 clear the fog around them; a fast dense grid at lr 3e-2 carves the
    # shape within 400 steps. The `prolificdreamer` preset sets the paper's values.
    field: FieldConfig = FieldConfig(
        grid=GridConfig(kind="dense", backend="auto", n_levels=3, base_resolution=16, per_level_scale=2.0),
        hidden_dim=32,
        blob_radius=0.4,
    )
    """The density / albedo field (grid encoding + MLP)."""
    resolution: Annotated[
        Annotated[Annotated[int, Field(ge=8)], Tag("pixels")] | Annotated[ResolutionSchedule, Tag("schedule")],
        Discriminator(_resolution_kind),
    ] = 32
    """Render resolution (pixels) during distillation, or a schedule {start, end, at_step}; renders are resized
    (bilinear) to the prior's own resolution before the VAE encodes them, as threestudio does."""
    n_samples: Annotated[int, Field(ge=4)] = 32
    """Stratified samples per ray (with ``occupancy.enabled``: the most a ray can take, the marching step being the
    cube's diagonal over it)."""
    occupancy: OccupancyConfig = OccupancyConfig()
    """Empty-space skipping and early ray termination (off in the toy default, on in the paper preset)."""
    recompute_chunk: Annotated[int, Field(ge=1)] | None = None
    """Samples per chunk whose field activations are recomputed in the backward pass instead of kept (gradient
    checkpointing): the NeRF's memory falls to a few floats per sample for about a third more field time; none
    keeps them all."""
    shading: Literal["albedo", "lambertian", "textureless"] = "albedo"
    """Shading of renders during distillation."""
    background: Literal["learned", "white"] = "white"
    """The background behind the object: an MLP on the view direction, or plain white (the toy world's)."""
    random_background_prob: Probability = 0.0
    """Probability of a random solid background colour per render."""
    lr_grid: Annotated[float, Field(gt=0)] = 3e-2
    """Adam learning rate of the grid encoding (paper: 1e-2)."""
    lr_net: Annotated[float, Field(gt=0)] = 1e-3
    """Adam learning rate of the MLPs (paper: 1e-3)."""
    sparsity_weight: Annotated[float, Field(ge=0)] = 30.0
    """Weight of the opacity sparsity regulariser."""
    opacity_entropy_weight: Annotated[float, Field(ge=0)] = 30.0
    """Weight of the opacity binary-entropy regulariser."""
    orientation_weight: Annotated[float, Field(ge=0)] = 0.0
    """Weight of DreamFusion's orientation regulariser (needs normals)."""

    def resolution_at(self, step: int) -> int:
        """The render resolution at ``step``."""
        schedule = self.resolution
        if isinstance(schedule, int):
            return schedule
        return schedule.start if step < schedule.at_step else schedule.end


class ImageParticleConfig(Section):
    space: Literal["latent", "rgb"] = "latent"
    """What the 2D particle is: a latent (decoded for viewing) or an RGB image (encoded each step)."""
    lr: Annotated[float, Field(gt=0)] = 1e-2
    """Adam learning rate of the image particle."""


class RayConfig(Section):
    address: str | None = None
    """Ray cluster to join ("auto", "ray://host:10001", host:port); none starts a local cluster."""
    actors: Annotated[int, Field(ge=1)] | None = None
    """Particle actors; default from placement (one per GPU, or per spare CPU on CPU-only clusters)."""
    gpus_per_actor: Annotated[float, Field(gt=0)] | None = None
    """GPUs per particle actor (fractions allowed); default from placement."""
    max_restarts: Annotated[int, Field(ge=-1)] = 3
    """Restarts allowed per actor before the run fails (-1: unlimited)."""
    score_replicas: Annotated[int, Field(ge=1)] = 1
    """ScoreActor replicas: each scores a shard of the particle actors; they average LoRA gradients to keep one LoRA."""
    borrow_idle_cpus: bool = True
    """On a one-node CPU-only cluster, the ScoreActor's gradients run on the CPUs of the particle actors waiting for
    them (a third faster on 2 CPUs). Off: every actor computes on its own CPUs alone, so runs on different placements
    (replica counts) agree to float rounding: thread counts change the rounding."""


class MeshConfig(Section):
    tet_resolution: Annotated[int, Field(ge=2)] = 32
    """Cells per side of the DMTet grid (paper: 128)."""
    fit_grid: bool = True
    """The DMTet grid spans the smallest origin-centred cube holding the NeRF's surface (plus a margin), not the
    field's whole bounding cube: the same cells, finer on the object (the paper's grid spans the bounding cube)."""
    threshold: float | Literal["silhouette"] = "silhouette"
    """NeRF density at which the surface is extracted: inside where density > threshold (paper: 25). "silhouette":
    per particle, the level whose marched surface has the NeRF's own silhouette (``pdray.geometry.surface_level``);
    no one number fits every toy NeRF (README "The mesh stage")."""

    @field_validator("threshold", mode="before")
    @classmethod
    def _level(cls, value: Any) -> Any:
        if value == "silhouette":
            return value
        try:
            level = float(value)
        except (TypeError, ValueError):
            level = math.nan
        if not level > 0 or math.isinf(level) or isinstance(value, bool):
            raise ValueError(f'a density above 0 or "silhouette" (got {value!r})')
        return level

    geometry_steps: Annotated[int, Field(ge=0)] = 50
    """Geometry fine-tune steps: SDS on rendered normal maps (paper: 15000; on the toy NeRFs 50 score as 100)."""
    texture_steps: Annotated[int, Field(ge=0)] = 50
    """Texture fine-tune steps: VSD on the fixed geometry with a fresh CameraLoRA (paper: 30000; on the toy NeRFs 50
    score as 100)."""
    geometry_cfg: Annotated[float, Field(ge=1.0)] = 100.0
    """Classifier-free guidance of the geometry stage's SDS (paper: 100)."""
    texture_cfg: Annotated[float, Field(ge=1.0)] = 7.5
    """Classifier-free guidance of the texture stage's VSD (paper: 7.5)."""
    views_per_step: Annotated[int, Field(ge=1)] = 1
    """Cameras rendered per step of both mesh stages (paper: 1)."""
    texture_anchor_weight: Annotated[float, Field(ge=0)] = 1e6
    """Weight of the texture renders' squared distance to the NeRF's, so a short VSD keeps its colours (paper: 0)."""
    geometry_lr: Annotated[float, Field(gt=0)] = 5e-3
    """Adam learning rate of the SDF and the deformation (paper: 5e-3); the texture uses nerf.lr_grid / lr_net."""
    t_range: TRange = TRange(at_step=5000)
    """The annealed timestep range of both mesh stages (paper: 0.98 -> 0.5 at step 5000)."""
    render_resolution: Annotated[int, Field(ge=8)] = 32
    """Rasterised render resolution (pixels) during fine-tuning and for the mesh turntable (paper: 512)."""
    normal_consistency_weight: Annotated[float, Field(ge=0)] = 1e4
    """Weight of the normal-consistency regulariser: 1 - cos between adjacent face normals (paper: 1e4)."""
    laplacian_weight: Annotated[float, Field(ge=0)] = 1e4
    """Weight of the uniform Laplacian smoothness regulariser (paper: 1e4)."""
    texture_resolution: Annotated[int, Field(ge=16)] = 256
    """Side of the baked texture image, texels (threestudio's export: 1024)."""
    cpus_per_task: Annotated[float, Field(gt=0)] | None = None
    """CPUs per mesh task on CPU-only Ray clusters; default: the cluster's CPUs shared over the particles."""
    max_retries: Annotated[int, Field(ge=0)] = 2
    """Ray re-runs of a mesh task whose worker process died (an exception in the stage is not retried)."""


class EvalConfig(Section):
    clip_model: str | None = None
    """CLIP that judges fidelity and diversity for any prior: a local folder or a hub id already in the Hugging Face
    cache (never downloaded); none: the toy judge (toy prior) and image statistics only."""
    distractors: list[str] | None = None
    """R-precision's distractor prompts; none: pdray's built-in set of object captions
    (``pdray.evaluation.clip_judge``)."""


class RunConfig(Section):
    prompt: str = "a cube"
    """The text prompt (not empty)."""
    negative_prompt: str = ""
    """The negative prompt (the unconditional branch of classifier-free guidance)."""
    particles: Annotated[int, Field(ge=1, le=4096)] = 4
    """Number of particles (3D assets) optimised together."""
    guidance: Literal["vsd", "sds"] = "vsd"
    """Variational score distillation (ProlificDreamer) or score distillation sampling (DreamFusion)."""
    cfg: Annotated[float, Field(ge=1.0)] = 7.5
    """Classifier-free guidance scale of the pretrained prediction (paper: 7.5 for VSD, 100 for SDS)."""
    particle_score: Literal["auto", "gaussian", "lora", "gaussian_lora"] = "auto"
    """VSD's score of the particles' own renders: "gaussian", a Gaussian fitted to their latents at each shared
    camera (closed form, nothing trained); "lora", the paper's camera-conditioned LoRA fitted alongside; "auto", the
    Gaussian for two or more particles and the LoRA for one (a Gaussian fitted to one latent is SDS);
    "gaussian_lora", each where the other is blind: the Gaussian on its ``gaussian_resolution`` grid (colour and
    layout, which a LoRA collapses to one) and the LoRA, trained as for "lora", on the detail finer than that grid,
    where the Gaussian has only SDS's score of the particle itself."""
    gaussian_repulsion: Annotated[float, Field(ge=0.0)] = 0.5
    """Scale of the Gaussian particle score's push away from the particles' mean (1: the fit's own; 0: SDS; 0.5 kept
    the toy world's tones where 1 made them neon, README "Particles that are 3D")."""
    gaussian_resolution: Annotated[int, Field(ge=1)] | None = 1
    """Side of the latent grid the Gaussian particle score sees: it fits and pushes the latents' block means on that
    grid (colour and layout), finer detail gets SDS's score of the particle itself; none: every latent pixel."""
    seed: Annotated[int, Field(ge=0)] = 0
    """Seed of every random stream (each particle derives its own)."""
    steps: Annotated[int, Field(ge=1)] = 600
    """Optimisation steps of the NeRF (or 2D) stage (the toy NeRFs' views need 600 at 4 views per step; 400 are
    too few, 800 measured no better: README "Particles that are 3D")."""
    particle: Literal["nerf", "image"] = "nerf"
    """3D NeRF particles, or 2D image particles (the paper's 2D experiments)."""
    stages: list[Literal["nerf", "mesh"]] = ["nerf", "mesh"]
    """Stages to run, in order: ["nerf", "mesh"] or ["nerf"] alone (image particles: ["nerf"], their one stage)."""
    executor: Literal["local", "ray"] = "ray"
    """Where the work runs: Ray actors (a local Ray cluster unless ray.address is set), or one local process."""
    t_range: TRange = TRange(at_step=200)
    """The annealed timestep range."""
    prior: PriorConfig = PriorConfig()
    """The pretrained diffusion prior."""
    ray: RayConfig = RayConfig()
    """The Ray executor: cluster address, actors, GPUs."""
    lora: LoraConfig = LoraConfig()
    """The camera-conditioned LoRA (VSD only)."""
    camera: CameraConfig = CameraConfig()
    """Camera sampling during distillation."""
    nerf: NerfConfig = NerfConfig()
    """NeRF particles."""
    image: ImageParticleConfig = ImageParticleConfig()
    """2D image particles."""
    mesh: MeshConfig = MeshConfig()
    """The mesh stage: DMTet geometry (SDS on normals), texture (VSD), export."""
    score_batch_size: Annotated[int, Field(ge=1)] = 32
    """Most latents per UNet call in the score estimator and the LoRA's training step: a memory knob only (the
    LoRA's loss is accumulated over the chunks into one update, so results do not depend on it)."""
    log_every: Annotated[int, Field(ge=1)] = 10
    """Steps between metric lines (and progress updates)."""
    checkpoint_every: Annotated[int, Field(ge=1)] = 100
    """Steps between checkpoints (checkpoints/SERIAL-step-STEP/: a shard per particle actor, then a manifest)."""
    eval_views: Annotated[int, Field(ge=1)] = 8
    """Fixed evaluation cameras (an orbit) for views.png and judge scores."""
    eval: EvalConfig = EvalConfig()
    """How runs are judged: CLIP for any prior (``pdray eval``, summary.json, report.html)."""
    wandb: Literal["offline", "online", "off"] = "offline"
    """W&B mode; online reads WANDB_API_KEY from the environment."""

    @field_validator("prompt")
    @classmethod
    def _prompt_says_something(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("is empty; say what to make, e.g. --prompt 'a cube'")
        return value

    @field_validator("wandb", mode="before")
    @classmethod
    def _off_is_a_word(cls, value: Any) -> Any:
        return "off" if value is False else value

    @property
    def particle_score_used(self) -> Literal["gaussian", "lora"]:
        """The particle score this run uses: ``particle_score`` with "auto" resolved by the particle count."""
        if self.particle_score != "auto":
            return self.particle_score
        return "lora" if self.particles == 1 else "gaussian"

    @property
    def trains_lora(self) -> bool:
        """VSD with the CameraLoRA in the particles' score (all of it, or the detail under gaussian_lora): a LoRA is
        trained beside the particles."""
        return self.guidance == "vsd" and self.particle_score_used in ("lora", "gaussian_lora")

    @property
    def estimator(self) -> str:
        """What scores the particles' own renders, in words for summary.json and the run's first line."""
        if self.guidance == "sds":
            return "sds: the sampled noise (DreamFusion)"
        if self.particle_score_used == "lora":
            return "vsd with the camera-conditioned LoRA (ProlificDreamer)"
        if self.particle_score_used == "gaussian_lora":
            grid = self.gaussian_resolution
            return (
                f"vsd with a Gaussian fitted to the particles' latents per camera on a {grid}x{grid} grid and the "
                "camera-conditioned LoRA on the finer detail"
            )
        if self.particles == 1:
            return "sds: a Gaussian fitted to one particle has no spread, so this is SDS (particle_score=lora: VSD)"
        return "vsd with a Gaussian fitted to the particles' latents per camera: SDS plus a push from their mean"

    @property
    def fits_all_particles(self) -> bool:
        """VSD with the Gaussian particle score: scoring one particle needs every particle's latents (the fit), so
        a score replica is sent every render of a step and scores only those it serves."""
        return self.guidance == "vsd" and self.particle_score_used in ("gaussian", "gaussian_lora")

    @model_validator(mode="after")
    def _stages_in_order(self) -> RunConfig:
        if self.stages not in (["nerf"], ["nerf", "mesh"]):
            raise ValueError(f"stages: must be [nerf] or [nerf, mesh], in that order; got {self.stages}")
        if self.fits_all_particles and not self.camera.shared:
            raise ValueError(
                f"particle_score: {self.particle_score_used} needs camera.shared: true (one fit per shared camera)"
            )
        if self.particle_score == "gaussian_lora" and self.gaussian_resolution is None:
            raise ValueError(
                "particle_score: gaussian_lora needs gaussian_resolution set: the LoRA scores the detail finer than "
                "the Gaussian's grid, and with none the Gaussian takes every latent pixel"
            )
        if "mesh" in self.stages and self.particle != "nerf":
            raise ValueError("stages: the mesh stage needs NeRF particles; image particles take stages=[nerf]")
        replicas = self.ray.score_replicas
        if replicas > self.particles:
            raise ValueError(f"ray.score_replicas: {replicas} replicas need at least {replicas} particles")
        if self.ray.actors is not None and replicas > self.ray.actors:
            raise ValueError(f"ray.score_replicas: {replicas} replicas need at least {replicas} particle actors")
        return self


def preset_names() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")] for p in resources.files(PRESETS_PACKAGE).iterdir() if p.name.endswith(".yaml")
    )


def _read_yaml(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
        if not path.is_file():
            raise ConfigError(f"config file {name_or_path} does not exist")
        text = path.read_text()
    else:
        candidate = resources.files(PRESETS_PACKAGE) / f"{name_or_path}.yaml"
        if not candidate.is_file():
            raise ConfigError(f"unknown config preset {name_or_path!r}; presets: {', '.join(preset_names())}")
        text = candidate.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{name_or_path}: not valid YAML ({err.__class__.__name__})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{name_or_path}: a config must be a mapping of keys to values")
    base = data.pop("base", None)
    if base is not None:  # a preset may build on another: `base: default`
        data = _merge(_read_yaml(str(base)), data)
    return data


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


_YAML11_WORDS = {"on", "off", "yes", "no", "y", "n"}


def parse_override(item: str) -> dict[str, Any]:
    """ "lora.rank=8" -> {"lora": {"rank": 8}}; the value is read as YAML (numbers, lists, booleans)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    if raw.strip().lower() in _YAML11_WORDS:  # keep "off" a word, not YAML 1.1's False
        value: Any = raw.strip()
    else:
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
    out: dict[str, Any] = value
    for part in reversed(key.strip().split(".")):
        out = {part: out}
    return out


def _allowed_keys(model: Any, loc: tuple) -> list[str]:
    """The field names allowed at loc's parent (pydantic models and dataclasses), for error messages."""
    current = model
    for part in loc[:-1]:
        if hasattr(current, "model_fields"):
            field = current.model_fields.get(part)
            current = field.annotation if field is not None else None
        else:
            current = typing.get_type_hints(current).get(part) if dataclasses.is_dataclass(current) else None
    while current is not None and not hasattr(current, "model_fields") and typing.get_args(current):
        # a tagged union (nerf.resolution): the model among its members
        members = [a for a in typing.get_args(current) if hasattr(a, "model_fields") or typing.get_args(a)]
        current = next((m for m in members if hasattr(m, "model_fields")), members[0] if members else None)
    if hasattr(current, "model_fields"):
        return list(current.model_fields)
    return [f.name for f in dataclasses.fields(current)] if dataclasses.is_dataclass(current) else []


def _fill_from_defaults(default: Any, data: dict[str, Any]) -> dict[str, Any]:
    """Nested sections given in part keep their parent's default for every key not given.

    Without this, ``--set nerf.field.blob_radius=0.4`` would rebuild ``nerf.field`` from FieldConfig's class
    defaults (a 16-level hash grid) rather than the run's default field (a small dense grid), and
    ``--set t_range.start=...`` would reset ``t_range.at_step`` to TRange's class default."""
    out = dict(data)
    for key, value in data.items():
        section = getattr(default, key, None)
        if not isinstance(value, dict) or section is None:
            continue
        if isinstance(section, BaseModel):
            full = section.model_dump(mode="python")
        elif dataclasses.is_dataclass(section):
            full = dataclasses.asdict(section)
        else:
            continue
        out[key] = _merge(full, _fill_from_defaults(section, value))
    return out


def validate(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(_fill_from_defaults(RunConfig(), data))
    except ValidationError as err:
        first = err.errors()[0]
        loc = tuple(str(p) for p in first["loc"] if str(p) not in UNION_TAGS)
        key = ".".join(loc) or "config"
        if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            raise ConfigError(f"{key}: unknown key; allowed here: {', '.join(_allowed_keys(RunConfig, loc))}") from None
        if first["type"] == "value_error":  # pdray's own checks; a cross-field one names its key itself
            message = str(first["ctx"]["error"])
            raise ConfigError(f"{key}: {message}" if loc else message) from None
        got = first.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        raise ConfigError(f"{key}: {first['msg']}{shown}") from None


def load_config(
    preset: str = "default", overrides: list[str] | None = None, extra: dict[str, Any] | None = None
) -> RunConfig:
    """Preset (name or YAML path), then ``--set`` overrides in order, then explicit CLI options."""
    data = _read_yaml(preset)
    for item in overrides or []:
        data = _merge(data, parse_override(item))
    if extra:
        data = _merge(data, {k: v for k, v in extra.items() if v is not None})
    return validate(data)


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config as plain YAML, atomically (write, then rename)."""
    write_text(path, config_to_yaml(config))
