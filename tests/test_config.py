from pathlib import Path

import pytest
import yaml

from pdray.config import ConfigError, RunConfig, load_config, parse_override, preset_names, save_config


def test_defaults_are_the_papers():
    cfg, paper = RunConfig(), load_config("prolificdreamer")
    assert cfg.cfg == 7.5 and cfg.lora.rank == 4 and cfg.lora.camera_dropout == 0.1
    assert cfg.t_range.start == (0.02, 0.98) and cfg.t_range.end == (0.02, 0.5)
    assert cfg.guidance == "vsd" and cfg.prior.model == "toyworld"
    # A toy run's 600 steps need a faster LoRA than the paper's 25000; the paper's preset keeps its 1e-4.
    assert cfg.lora.lr == 3e-3 and paper.lora.lr == 1e-4 and paper.steps == 25000


def test_the_default_preset_is_the_config_classes_defaults_one_source():
    text = (Path(__file__).parents[1] / "configs" / "default.yaml").read_text()
    assert yaml.safe_load(text) == {}, "defaults live in pdray/config.py only"
    assert load_config("default").model_dump() == RunConfig().model_dump()
    assert RunConfig().nerf.background == "white" and load_config("prolificdreamer").nerf.background == "learned"


def test_every_number_of_the_config_is_bounded_or_finite():
    """Every float knob refuses inf/nan, wherever it sits (nested sections and the field's dataclasses too)."""

    def floats(model, prefix=""):
        for name, value in vars(model).items():
            key = f"{prefix}{name}"
            if isinstance(value, float):
                yield key
            elif hasattr(value, "__dict__") and not isinstance(value, type):
                yield from floats(value, f"{key}.")

    keys = list(floats(RunConfig()))
    assert len(keys) > 20
    for key in keys:
        with pytest.raises(ConfigError, match=f"^{key}: "):
            load_config("default", [f"{key}=.inf"])


def test_every_preset_loads():
    names = preset_names()
    assert {"default", "sds", "image2d", "prolificdreamer"} <= set(names)
    for name in names:
        load_config(name)
    assert load_config("sds").cfg == 100 and load_config("sds").guidance == "sds"
    assert load_config("prolificdreamer").t_range.at_step == 5000


def test_overrides_apply_in_order_and_parse_values():
    cfg = load_config(
        "default", ["lora.rank=8", "camera.fov=[30, 60]", "cfg=3", "cfg=5", "prior.view_dependent_prompting=false"]
    )
    assert cfg.lora.rank == 8 and cfg.camera.fov == (30.0, 60.0) and cfg.cfg == 5.0
    assert cfg.prior.view_dependent_prompting is False
    assert parse_override("a.b.c=x y") == {"a": {"b": {"c": "x y"}}}


def test_cli_options_win_over_overrides():
    cfg = load_config("default", ["particles=3"], extra={"particles": 7, "prompt": None})
    assert cfg.particles == 7 and cfg.prompt == "a cube"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.rnk=8", "lora.rnk: unknown key; allowed here: rank, alpha"),
        ("lora.rank=zero", "lora.rank: Input should be a valid integer"),
        ("lora.rank=0", "lora.rank: Input should be greater than or equal to 1 (got 0)"),
        ("guidance=vds", "guidance: Input should be 'vsd' or 'sds'"),
        ("t_range.start=[0.9, 0.1]", "t_range: start must be [low, high]"),
        ("nerf.field.grid.bogus=1", "nerf.field.grid.bogus: unknown key; allowed here: kind, backend, n_levels"),
        ("lora.camera_dropout=1.5", "lora.camera_dropout: Input should be less than or equal to 1"),
        ("novalue", "override 'novalue' must look like key.sub=value"),
        ("particles=0", "particles: Input should be greater than or equal to 1 (got 0)"),
        ("cfg=.inf", "cfg: Input should be a finite number"),
        ("lora.lr=.nan", "lora.lr: Input should be a finite number"),
        ("nerf.lr_grid=0", "nerf.lr_grid: Input should be greater than 0"),
        ("nerf.resolution=0", "nerf.resolution: Input should be greater than or equal to 8"),
        ("nerf.field.hidden_dim=-3", "nerf.field.hidden_dim: Input should be greater than or equal to 1"),
        ("nerf.field.grid.n_levels=0", "nerf.field.grid.n_levels: Input should be greater than or equal to 1"),
        ("nerf.field.blob_radius=.inf", "nerf.field.blob_radius: Input should be a finite number"),
        ("mesh.threshold=-1", 'mesh.threshold: a density above 0 or "silhouette" (got -1)'),
        ("mesh.threshold=silhuette", "mesh.threshold: a density above 0 or \"silhouette\" (got 'silhuette')"),
        ("camera.fov=[50, 10]", "camera.fov: must be [low, high] with low <= high"),
        ("camera.elevation=[0, 100]", "camera.elevation.1: Input should be less than or equal to 90"),
        ("prompt=", "prompt: is empty"),
        ("prompt=   ", "prompt: is empty"),
        ("stages=[mesh, nerf]", "stages: must be [nerf] or [nerf, mesh], in that order"),
        ("stages=[nerf, texture]", "stages.1: Input should be 'nerf' or 'mesh'"),
        ("particle=image", "stages: the mesh stage needs NeRF particles; image particles take stages=[nerf]"),
    ],
)
def test_validation_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("default", [override])
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown config preset 'nope'; presets: default"):
        load_config("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("prolificdreamer", ["lora.rank=16", "camera.views_per_step=2"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    text = path.read_text()
    assert "!!python" not in text  # plain YAML, loadable with safe_load
    assert yaml.safe_load(text)["lora"]["rank"] == 16
    again = load_config(str(path))
    assert again == cfg
    save_config(again, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == text


def test_a_partial_override_of_a_nested_section_keeps_the_run_defaults_of_its_other_keys():
    default = load_config("default")
    cfg = load_config("default", ["nerf.field.blob_radius=0.4", "t_range.start=[0.02, 0.9]"])
    assert cfg.nerf.field.blob_radius == 0.4 and cfg.nerf.field.grid == default.nerf.field.grid
    assert cfg.nerf.field.hidden_dim == default.nerf.field.hidden_dim
    assert cfg.t_range.at_step == default.t_range.at_step == 200 and cfg.t_range.start == (0.02, 0.9)
    assert load_config("prolificdreamer").nerf.field.grid.kind == "hashgrid"


def test_the_estimator_is_said_plainly_and_one_gaussian_particle_is_sds():
    gaussian_one = load_config("default", ["particles=1", "particle_score=gaussian"])
    assert gaussian_one.estimator.startswith("sds: a Gaussian fitted to one particle") and not gaussian_one.trains_lora
    assert load_config("default", ["particles=4"]).estimator.startswith("vsd with a Gaussian")
    assert load_config("default", ["particles=1", "particle_score=lora"]).estimator.startswith("vsd with the camera")


def test_gaussian_lora_fits_the_gaussian_and_trains_the_lora_and_needs_a_coarse_grid():
    both = load_config("default", ["particles=4", "particle_score=gaussian_lora", "gaussian_resolution=2"])
    assert (both.particle_score_used, both.fits_all_particles, both.trains_lora) == ("gaussian_lora", True, True)
    assert "2x2 grid and the camera-conditioned LoRA" in both.estimator
    with pytest.raises(ConfigError, match="gaussian_lora needs gaussian_resolution set"):
        load_config("default", ["particle_score=gaussian_lora", "gaussian_resolution=null"])
    with pytest.raises(ConfigError, match=r"gaussian_lora needs camera\.shared"):
        load_config("default", ["particle_score=gaussian_lora", "camera.shared=false"])


def test_auto_fits_a_gaussian_to_many_particles_and_trains_the_lora_for_one():
    many, one = load_config("default", ["particles=2"]), load_config("default", ["particles=1"])
    assert many.particle_score == one.particle_score == "auto"
    assert (many.particle_score_used, many.fits_all_particles, many.trains_lora) == ("gaussian", True, False)
    assert (one.particle_score_used, one.fits_all_particles, one.trains_lora) == ("lora", False, True)
    assert one.estimator.startswith("vsd with the camera")
    assert not load_config("default", ["particles=1", "guidance=sds"]).trains_lora
    assert load_config("sds").estimator.startswith("sds: the sampled noise")


def test_the_toy_default_carves_views_and_the_2d_and_paper_presets_keep_theirs():
    default, image2d, paper = load_config("default"), load_config("image2d"), load_config("prolificdreamer")
    assert (default.camera.views_per_step, default.gaussian_resolution, default.gaussian_repulsion) == (4, 1, 0.5)
    assert default.mesh.views_per_step == 1
    assert (image2d.camera.views_per_step, image2d.gaussian_resolution, image2d.gaussian_repulsion) == (1, None, 0.5)
    assert (image2d.steps, image2d.t_range.at_step) == (400, 100)  # the anneal switches within the run
    assert paper.camera.views_per_step == 1 and paper.particle_score == "lora"
