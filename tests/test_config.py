"""Config: defaults < YAML (with bases) < overrides; unknown keys and bad values name the key."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from mlic_dist.config import Config, ConfigError, flatten, load_config, replace, save_config, to_dict
from mlic_dist.config.reference import describe

# configs/accelerate/ holds `accelerate launch` files, not training configs (test_accelerate_configs.py);
# configs/sweeps/ holds sweep files (a config plus grid:, ensembles:, sweep:): test_sweep.py loads them.
CONFIGS = sorted(p for p in Path(__file__).resolve().parents[1].joinpath("configs").rglob("*.yaml")
                 if p.parent.name not in ("accelerate", "sweeps"))


def test_defaults_are_the_papers_recipe():
    cfg = Config()
    assert (cfg.data.size, cfg.data.augment, cfg.data.batch_size_per_gpu) == (448, "M2", 16)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.head_lr) == ("sgd", 0.01, 0.1)
    assert (cfg.schedule.name, cfg.schedule.step_epochs, cfg.train.epochs) == ("step", 20, 40)


def test_yaml_bases_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("data: {size: 384, augment: M1}\noptim: {lr: 0.5}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ndata: {size: 512}\n")
    cfg = load_config(tmp_path / "child.yaml", ["optim.lr=0.02", "data.rrc_scale=[0.3,1.0]",
                                                 "tracking.uri=null", "train.early_stopping=5"])
    assert cfg.data.size == 512 and cfg.data.augment == "M1"
    assert cfg.optim.lr == 0.02 and cfg.data.rrc_scale == (0.3, 1.0)
    assert cfg.tracking.uri is None and cfg.train.early_stopping == 5
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


@pytest.mark.parametrize("override, words", [
    ("data.sise=3", ["data.sise", "valid keys", "size"]),
    ("nope=1", ["nope", "valid keys"]),
    ("data.augment=M9", ["data.augment", "M9", "M3"]),
    ("data.size=abc", ["data.size", "abc", "integer"]),
    ("train.mixed_precision=fp8", ["train.mixed_precision", "bf16"]),
    ("data.test_split=val", ["val_split", "test"]),
    ("data.size", ["key=value"]),
    ("train.log_every_steps=0", ["train.log_every_steps", "> 0"]),
    ("train.max_steps_per_epoch=-1", ["train.max_steps_per_epoch", ">= 0"]),
])
def test_bad_keys_and_values_name_the_key_value_and_choices(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_round_trip_flatten_and_replace(tmp_path):
    cfg = load_config(None, ["data.size=224", "model.backbone=advanced_cnn"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    flat = flatten(to_dict(cfg))
    assert flat["data.size"] == 224 and flat["model.backbone"] == "advanced_cnn"
    assert replace(cfg, ["data.size=512"]).data.size == 512
    keys = {row[0] for row in describe()}
    assert set(flat) == keys


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().data.size = 3  # type: ignore[misc]


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(p.parents[1])) for p in CONFIGS])
def test_every_config_file_loads(path):
    load_config(path)   # the sweep files load in tests/test_sweep.py


def test_readme_key_table_is_the_config():
    """Every key a user can type is in the README with its default and meaning (and no stale one)."""
    from pathlib import Path

    from mlic_dist.config.reference import key_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("<!-- config-keys")
    block = readme[readme.index("\n", start) + 1:readme.index("<!-- /config-keys -->")].strip()
    assert block == key_table(), "regenerate the README table with mlic_dist.config.reference.key_table()"
