import pytest
import yaml

from pdray.config import ConfigError, RunConfig, load_config, parse_override, preset_names, save_config


def test_defaults_are_the_papers():
    cfg = RunConfig()
    assert cfg.cfg == 7.5 and cfg.lora.rank == 4 and cfg.lora.lr == 1e-4 and cfg.lora.camera_dropout == 0.1
    assert cfg.t_range.start == (0.02, 0.98) and cfg.t_range.end == (0.02, 0.5)
    assert cfg.guidance == "vsd" and cfg.prior.model == "toyworld"


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
        ("t_range.start=[0.9, 0.1]", "t_range: Value error, start must be [low, high]"),
        ("nerf.field.grid.bogus=1", "nerf.field.grid.bogus: unknown key; allowed here: kind, backend, n_levels"),
        ("lora.camera_dropout=1.5", "lora.camera_dropout: Input should be less than or equal to 1"),
        ("novalue", "override 'novalue' must look like key.sub=value"),
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
