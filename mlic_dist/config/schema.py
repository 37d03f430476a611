"""The configuration's schema: frozen dataclasses, one docstring per field, each value validated in
`__post_init__` (`ConfigError` names the dotted key, the value and the fix), and which keys are
bookkeeping rather than the recipe (`is_model_key`, the resume rules).

Config keys are part of the interface: users type them as overrides, sweeps grid over them,
MLflow logs them. Building one from YAML and overrides: mlic_dist/config/load.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import UserError
from .choices import LOSSES, MEAN_STD, NAMES as AUGMENT_PRESETS


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
    """Square input side in pixels (the paper uses 384, 448, 512). Unset with a timm backbone: its pretrained_cfg's input size."""
    augment: str = "M2"
    """M0 = squash resize only; M1 = squash + flip; M2 = random-resized-crop + flip; M3 = M2 + OR-mixup on every other epoch; RA = M2 + RandAugment; CO = M2 + Cutout (mlic_dist/config/choices.py)."""
    loader: str = "dali"
    """dali | torch: DALI pipeline (GPU `mixed` decode when there is a GPU) or the webdataset + torchvision loader."""
    batch_size_per_gpu: int = 16
    """Training samples per process and step (global batch = this x processes x grad accumulation)."""
    eval_batch_size_per_gpu: int = 0
    """Evaluation batch per process; 0 = 2 x batch_size_per_gpu."""
    normalize: str = "imagenet"
    """imagenet (mean/std of ImageNet, for pretrained backbones) | half (0.5/0.5, the AdvancedCNN recipe; timm's ViTs) | clip (OpenAI CLIP) | unit (0..1, TResNet). Unset with a timm backbone: what its pretrained_cfg uses."""
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
    shard_shuffle: bool = True
    """Training reads the split's tars in a new order every epoch, drawn from the seed and the same on every rank (torch loader: plan.shard_order; DALI: the reader's shuffle_after_epoch), besides the shuffle buffer; false = the written order."""
    dali_hw_decoder_load: float = 0.65
    """DALI on a GPU: the share of JPEGs sent to the hardware decoder (A100/H100 nvJPEG engines), the rest to CUDA nvJPEG; DALI's default, until a device measures better (bench/gpu_device.md)."""
    dali_fancy_upsampling: bool = False
    """DALI on a GPU: decode chroma with the CPU decoder's (libjpeg's fancy) upsampling, so GPU and CPU decoding agree in colour; off = nvJPEG's faster default."""
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
        _check_choice("data.normalize", self.normalize, tuple(MEAN_STD))
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
        _check_positive("data.shuffle_buffer", self.shuffle_buffer)
        if not 0 <= self.dali_hw_decoder_load <= 1:
            raise ConfigError(f"data.dali_hw_decoder_load={self.dali_hw_decoder_load!r} must be in [0, 1] (the share of "
                              f"images for the hardware JPEG decoder; DALI's default is 0.65)")
        if self.val_split == self.test_split:
            raise ConfigError(f"data.val_split={self.val_split!r} equals data.test_split: model selection must not see test")
        if self.val_split == self.train_split:
            raise ConfigError(f"data.val_split={self.val_split!r} equals data.train_split: model selection, early "
                              f"stopping and thresholds would be tuned on the training data; shard a validation "
                              f"split (python -m mlic_dist.shard carves one out of train)")
        if not self.train_split or not self.val_split:
            raise ConfigError("data.train_split and data.val_split must name splits of the shards (e.g. train, val)")

    @property
    def eval_batch_size(self) -> int:
        return self.eval_batch_size_per_gpu or 2 * self.batch_size_per_gpu


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet101"
    """A name in the model registry (`python -m mlic_dist.models`), or timm/NAME for any of timm.list_models() (e.g. timm/convnext_tiny)."""
    pretrained: str = "imagenet"
    """imagenet (torchvision weights from the local torch hub cache) | none | PATH to a state dict (timm backbones: none or PATH, e.g. the model's model.safetensors)."""
    weights: str = "auto"
    """ImageNet version for pretrained=imagenet: auto (DEFAULT if its file is present, else any present version), or a torchvision version name such as IMAGENET1K_V1 (the paper's recipes) or IMAGENET1K_V2; docs/weights.md lists the files."""
    dropout: float = 0.0
    """Dropout before the new classification head (advanced_cnn always uses 0.5)."""
    channels_last: bool = True
    """Keep activations in NHWC memory format (faster convolutions with AMP)."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    grad_checkpointing: bool = False
    """timm backbones: recompute activations in the backward pass (timm's set_grad_checkpointing) to fit large models in memory, at the cost of recomputing each checkpointed block once."""
    sync_bn: bool = False
    """Synchronise BatchNorm statistics across processes (SyncBatchNorm; GPU DDP only, ignored with 1 process)."""

    def __post_init__(self):
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout={self.dropout!r} must be in [0, 1)")
        if self.weights != "auto" and not re.fullmatch(r"[A-Z][A-Z0-9_]*", str(self.weights)):
            raise ConfigError(f"model.weights={self.weights!r} must be auto or a torchvision weights version "
                              f"such as IMAGENET1K_V1 or IMAGENET1K_V2")


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
    lr_scaling: str = "ask"
    """What to do when the global batch differs from base_batch_size: ask (refuse to start until one of the others is chosen) | linear (lr and head_lr x global batch / base_batch_size) | none (keep them). docs/training.md."""
    base_batch_size: int = 0
    """Global batch the recipe's lr and head_lr were tuned for (the paper: 16); 0 = none declared (no rule applies)."""
    warmup_epochs: float = 0.0
    """Linear learning-rate warmup from ~0 over this many epochs (per optimizer step); 0 = off."""

    def __post_init__(self):
        _check_choice("optim.name", self.name, ("sgd", "adam"))
        _check_choice("optim.lr_scaling", self.lr_scaling, ("ask", "linear", "none"))
        _check_positive("optim.base_batch_size", self.base_batch_size, allow_zero=True)
        _check_positive("optim.warmup_epochs", self.warmup_epochs, allow_zero=True)
        _check_positive("optim.lr", self.lr)
        _check_positive("optim.head_lr", self.head_lr)
        _check_positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("optim.grad_clip", self.grad_clip, allow_zero=True)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum={self.momentum!r} must be in [0, 1) (the paper: 0.9)")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)} must both be in [0, 1) (Adam's default: [0.9, 0.999])")


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
        _check_choice("loss.name", self.name, LOSSES)
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
        _check_positive("schedule.plateau_patience", self.plateau_patience, allow_zero=True)


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
    system_metrics: bool = True
    """Log MLflow's system metrics (CPU, memory, disk, network; NVIDIA GPUs with nvidia-ml-py) into the run, one sampler per node."""
    system_metrics_interval_s: float = 10.0
    """Seconds between two system-metrics samples (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it)."""

    def __post_init__(self):
        _check_positive("tracking.flush_timeout_s", self.flush_timeout_s, allow_zero=True)
        if not self.system_metrics_interval_s > 0:
            raise ValueError(f"tracking.system_metrics_interval_s={self.system_metrics_interval_s!r} must be "
                             f"a number of seconds > 0 (e.g. 10), or set tracking.system_metrics=false")


@dataclass(frozen=True)
class DistillConfig:
    teacher_scores: Optional[str] = None
    """Distillation (python -m mlic_dist.distill writes it): PATH to a teacher's cached (N_train, C) probabilities (.npy, with its .keys.txt and .json beside it, docs/ensembles.md); null = off (train on the labels)."""
    alpha: float = 0.5
    """Weight of the teacher's probabilities in the training targets: (1 - alpha) x labels + alpha x teacher on the non-ignored entries; 0 = the labels alone, 1 = the teacher alone. Validation, selection and thresholds always use the labels."""

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"distill.alpha={self.alpha!r} must be in [0, 1] (0 = labels only, 1 = teacher only; "
                              f"the default 0.5 weighs both alike)")
        if self.teacher_scores is not None and not str(self.teacher_scores).endswith(".npy"):
            raise ConfigError(f"distill.teacher_scores={self.teacher_scores!r} must name the teacher's .npy file "
                              f"(python -m mlic_dist.distill writes OUT/teacher/train.npy), or be null")


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
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self):
        _check_positive("seed", self.seed, allow_zero=True)


# The one list of what keys mean, for a resume (mlic_dist/train/resume.py) and for ensemble grouping
# (mlic_dist/ensemble/selection.py). Keys in none of the sets below define the model a run
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
RESUME_REPLAY = frozenset({"data.loader", "data.num_workers", "data.shuffle_buffer", "data.shard_shuffle"})


def is_model_key(key: str) -> bool:
    """Does a dotted key define the model a run learns? Not the bookkeeping keys, and not the
    loader's implementation (RESUME_REPLAY: which loader, its workers and shuffle buffer change
    the sample order as another seed would, not the recipe). Ensembles group runs on these."""
    return not (key in BOOKKEEPING or key.startswith(BOOKKEEPING_PREFIXES) or key in RESUME_REPLAY)
