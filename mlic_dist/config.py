"""Typed, frozen configuration: dataclass defaults < YAML files < dotted `key=value` overrides.

    cfg = load_config("configs/voc2007/wang_resnet101.yaml", ["data.size=512", "train.epochs=2"])

A YAML file may name other files under `base:` (a path or a list, relative to the file); they are
merged first, in order. Unknown keys and bad values raise `ConfigError` naming the dotted key, the
value and the valid choices. Config keys are part of the interface: users type them as overrides,
sweeps grid over them, MLflow logs them (flattened with `flatten`).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin

import yaml

from .data.presets import NAMES as AUGMENT_PRESETS
from .errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration key or value is wrong; the message names the key, the value and the fix."""


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(choices)}")


def _check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value!r} must be {bound}")


@dataclass(frozen=True)
class DataConfig:
    shards: Optional[str] = None
    """A directory written by `python -m mlic_dist.shard` (holds manifest.json)."""
    size: int = 448
    """Square input side in pixels (the paper uses 384, 448, 512)."""
    augment: str = "M2"
    """M0 = squash resize only; M1 = squash + flip; M2 = random-resized-crop + flip; M3 = M2 + OR-mixup on every other epoch; RA = M2 + RandAugment; CO = M2 + Cutout (mlic_dist/data/presets.py)."""
    loader: str = "dali"
    """dali | torch: DALI pipeline (GPU `mixed` decode when there is a GPU) or the webdataset + torchvision loader."""
    batch_size_per_gpu: int = 16
    """Training samples per process and step (global batch = this x processes x grad accumulation)."""
    eval_batch_size_per_gpu: int = 0
    """Evaluation batch per process; 0 = 2 x batch_size_per_gpu."""
    normalize: str = "imagenet"
    """imagenet (mean/std of ImageNet, for pretrained backbones) | half (0.5/0.5, the AdvancedCNN recipe)."""
    difficult: str = "positive"
    """positive | ignore: how "ignore" (-1, VOC difficult) labels train. Metrics always ignore them."""
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    """Area range of the random-resized-crop (M2, M3)."""
    rrc_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    """Aspect-ratio range of the random-resized-crop (M2, M3)."""
    num_workers: int = 0
    """CPU threads (DALI) or DataLoader workers (torch) per process; 0 = the cores divided among local processes."""
    shuffle_buffer: int = 4096
    """Samples in the reader's shuffle buffer (shards are also shuffled when written)."""
    train_split: str = "train"
    """Split the model trains on."""
    val_split: str = "val"
    """Split used for model selection, early stopping and thresholds; never the test split."""
    test_split: str = "test"
    """Split scored once at the end with the best checkpoint ('' = none)."""
    randaugment_ops: int = 2
    """RA: RandAugment operations applied to each training image."""
    randaugment_magnitude: int = 9
    """RA: RandAugment magnitude, 0..30 (of 31 bins)."""
    cutout_p: float = 0.5
    """CO: probability that a training image gets a Cutout rectangle (filled with the normalisation mean)."""
    cutout_scale: tuple[float, float] = (0.02, 0.33)
    """CO: range of the Cutout rectangle's area, as a fraction of the image."""

    def __post_init__(self):
        _check_choice("data.augment", self.augment, AUGMENT_PRESETS)
        _check_choice("data.loader", self.loader, ("dali", "torch"))
        _check_choice("data.normalize", self.normalize, ("imagenet", "half"))
        _check_choice("data.difficult", self.difficult, ("positive", "ignore"))
        if self.size < 16:
            raise ConfigError(f"data.size={self.size!r} is too small; use a side of at least 16 px (the paper uses 384-512)")
        _check_positive("data.batch_size_per_gpu", self.batch_size_per_gpu)
        _check_positive("data.eval_batch_size_per_gpu", self.eval_batch_size_per_gpu, allow_zero=True)
        _check_positive("data.num_workers", self.num_workers, allow_zero=True)
        lo, hi = self.rrc_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"data.rrc_scale={list(self.rrc_scale)} must satisfy 0 < min <= max <= 1")
        if not 0 < self.rrc_ratio[0] <= self.rrc_ratio[1]:
            raise ConfigError(f"data.rrc_ratio={list(self.rrc_ratio)} must satisfy 0 < min <= max")
        _check_positive("data.randaugment_ops", self.randaugment_ops)
        if not 0 <= self.randaugment_magnitude <= 30:
            raise ConfigError(f"data.randaugment_magnitude={self.randaugment_magnitude!r} must be in 0..30 "
                              f"(31 magnitude bins; RandAugment's usual value is 9)")
        if not 0 <= self.cutout_p <= 1:
            raise ConfigError(f"data.cutout_p={self.cutout_p!r} must be in [0, 1]")
        lo, hi = self.cutout_scale
        if not 0 < lo <= hi < 1:
            raise ConfigError(f"data.cutout_scale={list(self.cutout_scale)} must satisfy 0 < min <= max < 1")
        if self.val_split == self.test_split:
            raise ConfigError(f"data.val_split={self.val_split!r} equals data.test_split: model selection must not see test")

    @property
    def eval_batch_size(self) -> int:
        return self.eval_batch_size_per_gpu or 2 * self.batch_size_per_gpu


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet101"
    """A name in the model registry (`mlic_dist.models.list_models()`)."""
    pretrained: str = "imagenet"
    """imagenet (torchvision weights from the local torch hub cache) | none | PATH to a state dict."""
    dropout: float = 0.0
    """Dropout before the new classification head (advanced_cnn always uses 0.5)."""
    channels_last: bool = True
    """Keep activations in NHWC memory format (faster convolutions with AMP)."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    sync_bn: bool = False
    """Synchronise BatchNorm statistics across processes (SyncBatchNorm; GPU DDP only, ignored with 1 process)."""

    def __post_init__(self):
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout={self.dropout!r} must be in [0, 1)")


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"
    """sgd (momentum) | adam."""
    lr: float = 0.01
    """Learning rate of the backbone (pretrained part)."""
    head_lr: float = 0.1
    """Learning rate of the new classification head."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.0
    """L2 weight decay (the paper's VOC recipe uses none)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 = off."""
    lr_scaling: str = "none"
    """none (lr and head_lr as given, whatever the global batch) | linear (x global batch / base_batch_size)."""
    base_batch_size: int = 16
    """Global batch that lr and head_lr are meant for (the paper: 16); used by lr_scaling=linear."""
    warmup_epochs: float = 0.0
    """Linear learning-rate warmup from ~0 over this many epochs (per optimizer step); 0 = off."""

    def __post_init__(self):
        _check_choice("optim.name", self.name, ("sgd", "adam"))
        _check_choice("optim.lr_scaling", self.lr_scaling, ("none", "linear"))
        _check_positive("optim.base_batch_size", self.base_batch_size)
        _check_positive("optim.warmup_epochs", self.warmup_epochs, allow_zero=True)
        _check_positive("optim.lr", self.lr)
        _check_positive("optim.head_lr", self.head_lr)
        _check_positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("optim.grad_clip", self.grad_clip, allow_zero=True)


@dataclass(frozen=True)
class LossConfig:
    name: str = "bce"
    """bce | asl (asymmetric loss, Ridnik et al. 2021) | focal (Lin et al. 2017); every loss is the mean over non-ignored (image, class) entries (mlic_dist/losses.py)."""
    gamma_neg: float = 4.0
    """asl: focusing exponent of the negatives (ASL's train.py and paper: 4)."""
    gamma_pos: float = 0.0
    """asl: focusing exponent of the positives (ASL's train.py and paper: 0)."""
    clip: float = 0.05
    """asl: probability margin m shifted off the negatives, p_m = max(p - m, 0) (ASL: 0.05); 0 = off."""
    gamma: float = 2.0
    """focal: focusing exponent."""
    alpha: float = 0.25
    """focal: weight of the positives (negatives get 1 - alpha); -1 = no weighting."""

    def __post_init__(self):
        from .losses import NAMES

        _check_choice("loss.name", self.name, NAMES)
        _check_positive("loss.gamma_neg", self.gamma_neg, allow_zero=True)
        _check_positive("loss.gamma_pos", self.gamma_pos, allow_zero=True)
        _check_positive("loss.gamma", self.gamma, allow_zero=True)
        if not 0 <= self.clip < 1:
            raise ConfigError(f"loss.clip={self.clip!r} must be in [0, 1) (ASL uses 0.05; 0 turns the shift off)")
        if not (0 <= self.alpha <= 1 or self.alpha == -1):
            raise ConfigError(f"loss.alpha={self.alpha!r} must be in [0, 1], or -1 for no weighting")


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "step"
    """step (x gamma every step_epochs) | plateau (ReduceLROnPlateau on validation loss) | none."""
    step_epochs: int = 20
    """step: epochs between decays (the paper: /10 after 20 epochs)."""
    gamma: float = 0.1
    """step: decay factor."""
    plateau_factor: float = 0.5
    """plateau: factor applied when the validation loss stalls."""
    plateau_patience: int = 2
    """plateau: epochs without improvement before a decay."""

    def __post_init__(self):
        _check_choice("schedule.name", self.name, ("step", "plateau", "none"))
        _check_positive("schedule.step_epochs", self.step_epochs)
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"schedule.gamma={self.gamma!r} must be in (0, 1]")
        if not 0 < self.plateau_factor < 1:
            raise ConfigError(f"schedule.plateau_factor={self.plateau_factor!r} must be in (0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    """Training epochs."""
    early_stopping: int = 0
    """Stop after this many epochs without improvement of `select_metric`; 0 = off."""
    select_metric: str = "val_mAP"
    """val_mAP (maximised) | val_loss (minimised): picks the best checkpoint and drives early stopping."""
    mixed_precision: str = "bf16"
    """bf16 | fp16 | no. On a CPU, fp16 falls back to no (with a warning)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    output_dir: str = "runs/default"
    """Run directory: checkpoints, resolved config, scores, thresholds, metrics."""
    resume: str = "auto"
    """auto (newest complete checkpoint in output_dir, if any) | never | PATH to a checkpoint directory."""
    resume_accept: str = ""
    """Comma-separated keys (or `all`) whose change since the checkpoint a resume accepts on purpose; others are refused."""
    checkpoint_every_steps: int = 0
    """Also checkpoint every N optimizer steps inside an epoch; 0 = at epoch ends only."""
    keep_checkpoints: int = 2
    """Newest step/epoch checkpoints kept (the best one is always kept)."""
    max_steps_per_epoch: int = 0
    """Cap on optimizer steps per epoch (smoke tests, benchmarks); 0 = the whole split."""
    log_every_steps: int = 10
    """Progress-bar refresh and step-metric logging interval."""
    eval_test: bool = True
    """Score the test split with the best checkpoint at the end."""
    max_nonfinite_steps: int = 10
    """Stop (diverged) after this many optimizer steps in a row with a non-finite loss or gradient; those steps are skipped."""
    ddp_bucket_cap_mb: int = 25
    """DDP gradient bucket size in MB."""
    ddp_gradient_as_bucket_view: bool = True
    """Let gradients alias DDP buckets (saves one copy of the gradients)."""
    ddp_static_graph: bool = False
    """Tell DDP the graph never changes (enables extra overlap)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights (decay per optimizer step, e.g. 0.999; ~1/(1-decay) steps of memory); validated each epoch beside the raw weights, the better one is selected; 0 = off."""

    def __post_init__(self):
        _check_positive("train.epochs", self.epochs)
        _check_positive("train.early_stopping", self.early_stopping, allow_zero=True)
        _check_choice("train.select_metric", self.select_metric, ("val_mAP", "val_loss"))
        _check_choice("train.mixed_precision", self.mixed_precision, ("bf16", "fp16", "no"))
        _check_positive("train.grad_accum_steps", self.grad_accum_steps)
        _check_positive("train.checkpoint_every_steps", self.checkpoint_every_steps, allow_zero=True)
        _check_positive("train.keep_checkpoints", self.keep_checkpoints)
        _check_positive("train.log_every_steps", self.log_every_steps)
        _check_positive("train.max_steps_per_epoch", self.max_steps_per_epoch, allow_zero=True)
        _check_positive("train.max_nonfinite_steps", self.max_nonfinite_steps)
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay={self.ema_decay!r} must be in [0, 1) (0 = off; ASL uses 0.9997 "
                              f"over ~640 steps an epoch)")
        if self.resume not in ("auto", "never") and not self.resume:
            raise ConfigError("train.resume='' is not valid; use auto, never or a checkpoint directory")


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    """Log params, metrics and artifacts to MLflow (rank 0 only)."""
    uri: Optional[str] = None
    """MLflow tracking URI; null = the embedded local store (sqlite:///mlflow.db in the working directory)."""
    experiment: str = "mlic"
    """MLflow experiment name."""
    run_name: Optional[str] = None
    """MLflow run name; null = the basename of train.output_dir."""
    parent_run_id: Optional[str] = None
    """Nest this run under a parent run (sweeps set this)."""
    log_artifacts: bool = True
    """Upload the run directory's files (config, metrics, scores, thresholds, best weights) as artifacts."""
    flush_timeout_s: float = 120.0
    """At the end, wait at most this long for queued MLflow calls (a few seconds if MLflow is down)."""

    def __post_init__(self):
        _check_positive("tracking.flush_timeout_s", self.flush_timeout_s, allow_zero=True)


@dataclass(frozen=True)
class Config:
    seed: int = 0
    """Seeds Python, NumPy, torch and the data pipelines (per rank offsets are added)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# The one list of what keys mean, for a resume (mlic_dist/resume.py) and for ensemble grouping
# (mlic_dist/ensemble_selection.py). Keys in none of the sets below define the model a run
# learns (learning rates, sizes, augmentation, model, data, seed...): a resume refuses a change
# to them unless train.resume_accept names them, and runs that differ in them are different
# models. A new key is model-defining until it is listed here.
# Keys that leave the numbers alone: where a run writes and logs, how often it reports and
# checkpoints, resume bookkeeping, speed knobs.
BOOKKEEPING = frozenset({
    "train.output_dir", "train.resume", "train.resume_accept", "train.log_every_steps",
    "train.checkpoint_every_steps", "train.keep_checkpoints", "train.eval_test", "train.max_nonfinite_steps",
    "data.eval_batch_size_per_gpu", "data.test_split",
    "model.compile", "model.channels_last", "train.ddp_bucket_cap_mb",
    "train.ddp_gradient_as_bucket_view", "train.ddp_static_graph",
})
BOOKKEEPING_PREFIXES = ("tracking.",)
# A resume may also extend or shorten a training, and find its data at another path (it compares
# the data's content digest instead); for grouping these still tell models apart.
RESUME_FREE = BOOKKEEPING | {"train.epochs", "train.early_stopping", "data.shards"}
RESUME_FREE_PREFIXES = BOOKKEEPING_PREFIXES
RESUME_REPLAY = frozenset({"data.loader", "data.num_workers", "data.shuffle_buffer"})


def is_model_key(key: str) -> bool:
    """Does a dotted key define the model a run learns? Not the bookkeeping keys, and not the
    loader's implementation (RESUME_REPLAY: which loader, its workers and shuffle buffer change
    the sample order as another seed would, not the recipe). Ensembles group runs on these."""
    return not (key in BOOKKEEPING or key.startswith(BOOKKEEPING_PREFIXES) or key in RESUME_REPLAY)


# --------------------------------------------------------------------------- building


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """Convert a YAML value to the annotated type, or raise naming the key."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(key, value, args[0])
    if origin is tuple:
        args = get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r} must be a list of {len(args)} values")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}={value!r} must be an integer")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} must be an integer") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} must be a number") from None
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads `no`/`yes` as booleans (mixed_precision: no)
            return "yes" if value else "no"
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r} must be a string")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r} in {where}; valid keys: {sorted(valid)}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, key + ".")
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict:
    """Read a config file, merging the files its `base:` names first (relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else bases:
        merged = _deep_merge(merged, read_yaml(path.parent / b))
    return _deep_merge(merged, data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings (values parsed as YAML scalars/lists) to a nested dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. data.size=512)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        data = _deep_merge(data, _nest(key.strip(), value))
    return data


def _nest(dotted: str, value: Any) -> dict:
    parts = dotted.split(".")
    out: Any = value
    for p in reversed(parts):
        out = {p: out}
    return out


def config_from_dict(data: dict) -> Config:
    return _build(Config, data)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults < YAML file (with its bases) < dotted overrides."""
    data = read_yaml(path) if path else {}
    return config_from_dict(apply_overrides(data, list(overrides)))


def to_dict(cfg) -> dict:
    """Nested plain dict (tuples as lists), safe for YAML and JSON."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


def flatten(d: dict, prefix: str = "") -> dict:
    """{'data': {'size': 448}} -> {'data.size': 448} (the names users type as overrides)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg: Config, overrides: list[str]) -> Config:
    """A copy of `cfg` with dotted overrides applied (validated like any other)."""
    return config_from_dict(apply_overrides(to_dict(cfg), overrides))
