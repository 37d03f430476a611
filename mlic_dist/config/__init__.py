"""The run configuration: typed frozen dataclasses (schema.py), built from defaults < YAML files <
dotted `key=value` overrides (load.py); the named choices values pick from (choices.py); the key
reference the README shows (reference.py).

    from mlic_dist.config import load_config
    cfg = load_config("configs/voc2007/wang.yaml", ["data.size=512", "train.epochs=2"])
"""
from .load import (apply_overrides, build, config_from_dict, flatten, load_config, read_yaml, replace,  # noqa: F401
                   save_config, to_dict)
from .schema import (BOOKKEEPING, BOOKKEEPING_PREFIXES, RESUME_FREE, RESUME_FREE_PREFIXES, RESUME_REPLAY,  # noqa: F401
                     Config, ConfigError, DataConfig, LossConfig, ModelConfig, OptimConfig, ScheduleConfig,
                     TrackingConfig, TrainConfig, DistillConfig, is_model_key)
