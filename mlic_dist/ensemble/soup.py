"""Greedy weight soup (Wortsman et al. 2022, "Model soups", Algorithm 1): one network whose
weights are the average of several fine-tuned runs, so an ensemble's gain at ONE forward pass.

    python -m mlic_dist.ensemble --experiment mlic --select soup [--soup-bn-batches 50] [--device cuda]
Python (a sweep's `ensembles: [soup]`): `build_ensembles("mlic", ["soup"], uri, parent_id)`.

Which runs are averaged (`soup_key`): weights can be averaged only between runs that started
from the same point in weight space and share every tensor's shape, so a soup group is the runs
of one dataset (classes and validation keys) with the same
  - `model.backbone` (the architecture),
  - `model.pretrained` (the initialisation's source: imagenet, a PATH, or none) and, for
    imagenet, `model.weights` (the torchvision version),
  - `seed` when `model.pretrained=none` (from scratch, the seed IS the initialisation: two seeds
    are two unrelated minima whose average is meaningless); with pretrained weights the seed
    only draws the head and the data order, and runs of several seeds are soup ingredients,
and they may differ in anything else: data.size, data.augment, the optimiser, schedule, epochs
(a sweep's grid). A run whose state dict still differs in a key or a shape (a timm ViT built
for another data.size) is left out of the soup, recorded as not kept with the reason.
Runs tagged `mlic.derived` (soups, distilled students) are never ingredients.

The soup (greedy): ingredients sorted by their recorded validation mAP (metrics.json, the best
checkpoint's), best first; the soup starts as the best; each next ingredient is tried: the
uniform average of the kept ingredients plus it (floating tensors averaged in float64; integer
buffers such as BatchNorm's num_batches_tracked from the first ingredient), then its BatchNorm
running statistics recomputed (`recompute_bn`: a cumulative average, momentum=None, over the
first `bn_batches` batches of the TRAINING split read with the evaluation transform at the
soup's size; only the BatchNorm layers in train mode, so dropout / drop-path do not disturb the
statistics), then scored on validation. It is kept when the soup's validation mAP does not drop
(>=). Every soup, the one-ingredient start included, is evaluated the same way (average, BN
recompute, score), so a duplicate of a kept ingredient is always kept. The soup's config is the
best ingredient's (its data.size, normalisation, classes): the soup is served at that size.
The test split is scored once, after the soup is chosen; thresholds are tuned on validation.

Output: an ordinary run directory (default runs/ensembles/soup-BACKBONE-INIT-DIGEST): config.yaml,
classes.json, best_model.pt, scores / targets / keys per split, thresholds.json, metrics.json
(kind soup, forward_passes 1) and soup.json (docs/contracts.md); logged to MLflow as a run with
mlic.kind=single, mlic.derived=soup, mlic.ingredients (kept, in order), mlic.candidates.
"""
from __future__ import annotations

import datetime
import json
import sys
import warnings
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .. import metrics, rundir
from ..atomic import check_dir, replace_dir, replace_with
from ..config import config_from_dict, flatten
from ..data import build_loader, read_manifest
from ..data.labels import read_split_labels
from ..losses import build_loss
from ..models import create_model
from ..tracking import derived, query as mq
from ..tracking.store import resolve_uri
from ..tracking.tracker import final_metrics
from .members import EnsembleError, Member
from .selection import digest

SOUP_FORMAT_VERSION = 1
DEFAULT_BN_BATCHES = 50
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)   # timm's BatchNormAct2d too


# --------------------------------------------------------------------------- groups


def soup_key(member: Member) -> str:
    """Canonical text of what makes two runs' weights averageable (module docstring)."""
    flat = member.flat_config
    pretrained = str(flat.get("model.pretrained"))
    key = {"model.backbone": flat.get("model.backbone"), "model.pretrained": pretrained,
           "classes": member.run.classes, "val_keys": sorted(member.run.split("val").keys)}
    if pretrained == "imagenet":
        key["model.weights"] = flat.get("model.weights")
    if pretrained == "none":
        key["seed"] = flat.get("seed")
    return json.dumps(key, sort_keys=True, default=str)


def recorded_val_map(member: Member) -> float:
    """The validation mAP of the run's best checkpoint: metrics.json's, else its saved scores'."""
    value = (member.run.metrics.get("val") or {}).get("mAP")
    if value is None:
        val = member.run.split("val")
        value = metrics.mean_average_precision(val.scores, val.targets)
    return float(value)


@dataclass
class SoupGroup:
    key: str
    items: list          # Members, best recorded val mAP first

    @property
    def name(self) -> str:
        """soup-BACKBONE-INIT-DIGEST: INIT is seedN (from scratch), imagenet, or path."""
        cfg = json.loads(self.key)
        pretrained = cfg["model.pretrained"]
        init = f"seed{cfg.get('seed')}" if pretrained == "none" else pretrained if pretrained == "imagenet" else "path"
        backbone = str(cfg["model.backbone"]).replace("/", "_")
        return f"soup-{backbone}-{init}-{digest(self.key)}"


def find_soup_groups(members: Sequence[Member]) -> list[SoupGroup]:
    """Runs grouped by `soup_key`, each group ordered by recorded val mAP (ties: name). Runs
    without best_model.pt, or derived (a soup, a student), are left out with a warning."""
    by_key: dict[str, list] = {}
    for m in members:
        if not (m.run.path / rundir.BEST_MODEL).is_file() or m.run.config is None:
            warnings.warn(f"soup: {m.label} has no {rundir.BEST_MODEL} or {rundir.CONFIG}; not an ingredient")
            continue
        if m.run.metrics.get("kind") in ("soup", "distill"):   # made from other runs, not a fine-tuning
            warnings.warn(f"soup: {m.label} is a {m.run.metrics['kind']} (made from other runs); not an ingredient")
            continue
        by_key.setdefault(soup_key(m), []).append(m)
    groups = [SoupGroup(k, sorted(v, key=lambda m: (-np.nan_to_num(recorded_val_map(m), nan=-1.0), m.name)))
              for k, v in by_key.items()]
    return sorted(groups, key=lambda g: g.name)


# --------------------------------------------------------------------------- weights


def load_weights(member: Member) -> dict:
    return torch.load(member.run.path / rundir.BEST_MODEL, map_location="cpu", weights_only=True)


def shape_mismatch(ref: dict, sd: dict) -> Optional[str]:
    """Why `sd` cannot be averaged with `ref` (other keys, or a tensor of another shape), or None."""
    if set(ref) != set(sd):
        diff = sorted(set(ref) ^ set(sd))
        return f"its state dict has other keys ({diff[:3]}{' ...' if len(diff) > 3 else ''})"
    for k, v in ref.items():
        if v.shape != sd[k].shape:
            return f"{k} has shape {tuple(sd[k].shape)}, the best ingredient's {tuple(v.shape)}"
    return None


def average_state_dicts(sum_sd: dict, count: int, first: dict) -> dict:
    """The uniform average: floating tensors = sum / count (sums kept in float64) cast to the
    first ingredient's dtype; every other tensor (num_batches_tracked) the first's."""
    return {k: (sum_sd[k] / count).to(v.dtype) if v.is_floating_point() else v.clone() for k, v in first.items()}


def add_into(sum_sd: Optional[dict], sd: dict) -> dict:
    """sum_sd += sd over the floating tensors (float64); a new sum when sum_sd is None."""
    if sum_sd is None:
        return {k: v.double().clone() for k, v in sd.items() if v.is_floating_point()}
    for k in sum_sd:
        sum_sd[k] += sd[k].double()
    return sum_sd


@torch.no_grad()
def recompute_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """BatchNorm running statistics recomputed on `batches` (image tensors): reset, momentum=None
    (the cumulative average over the batches, as torch.optim.swa_utils.update_bn does), only the
    BatchNorm layers in train mode (dropout stays off). Returns the batches used (0, and nothing
    touched, for a model without BatchNorm)."""
    bns = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]
    if not bns:
        return 0
    model.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    used = 0
    for images in batches:
        model(images)
        used += 1
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.eval()
    if used == 0:
        raise EnsembleError("soup: the training split gave no batch to recompute BatchNorm statistics on")
    return used


def bn_batches(loader, limit: int) -> Iterable[torch.Tensor]:
    """The first `limit` batches' real images (padding rows dropped)."""
    loader.set_epoch(0)
    for batch in islice(loader, limit):
        keep = batch.ids >= 0
        if bool(keep.any()):
            yield batch.images[keep]


@torch.no_grad()
def score_split(model: nn.Module, loader, num_samples: int, loss_fn) -> tuple[np.ndarray, float]:
    """(N, C) float32 probabilities in sample-id order (fp32, padding dropped) and the mean loss
    over the non-ignored entries (the trainer's scale, losses.py)."""
    model.eval()
    loader.set_epoch(0)
    ids, probs, loss_sum, count = [], [], 0.0, 0.0
    for batch in loader:
        logits = model(batch.images).float()                       # (B, C)
        keep = batch.ids >= 0
        loss_sum += float(loss_fn.entries(logits[keep], batch.targets[keep], batch.mask[keep]).sum())
        count += float(batch.mask[keep].sum())
        ids.append(batch.ids[keep].cpu())
        probs.append(torch.sigmoid(logits[keep]).cpu())
    all_ids = torch.cat(ids).numpy()
    order = np.argsort(all_ids, kind="stable")
    all_ids, all_probs = all_ids[order], torch.cat(probs).numpy()[order]
    first = np.concatenate([[True], all_ids[1:] != all_ids[:-1]])
    all_ids, all_probs = all_ids[first], all_probs[first]
    if len(all_ids) != num_samples or not np.array_equal(all_ids, np.arange(num_samples)):
        raise RuntimeError(f"soup scoring got {len(all_ids)} distinct samples, the split has {num_samples}")
    return all_probs.astype(np.float32), loss_sum / count if count else float("nan")


# --------------------------------------------------------------------------- the greedy soup


@dataclass
class Soup:
    state_dict: dict           # the chosen soup's weights (BN statistics recomputed)
    val_probs: np.ndarray      # (N, C) its validation scores
    val_loss: float
    ingredients: list          # soup.json "ingredients"
    kept: list                 # Members, in the order kept
    bn_batches_used: int


class _Scorer:
    """The soup's model and loaders (the best ingredient's config): evaluate a state dict."""

    def __init__(self, best: Member, num_classes: int, bn_limit: int, device: str):
        self.cfg = best.run.cfg()
        cfg = self.cfg
        self.device = torch.device(device)
        self.model = create_model(cfg.model.backbone, num_classes, pretrained="none", dropout=cfg.model.dropout,
                                  image_size=cfg.data.size).to(self.device)
        loader_args = dict(train=False, rank=0, world_size=1, device=self.device, seed=cfg.seed)
        try:
            self.train_loader = build_loader(cfg.data, cfg.data.train_split, **loader_args)
            self.val_loader = build_loader(cfg.data, cfg.data.val_split, **loader_args)
        except (ValueError, FileNotFoundError) as e:
            raise EnsembleError(f"soup: cannot read the shards of {best.label} (data.shards={cfg.data.shards}): "
                                f"{str(e).splitlines()[0]}") from None
        self.val_keys, self.val_labels = read_split_labels(cfg.data.shards, cfg.data.val_split)
        self.loss_fn = build_loss(cfg.loss)
        self.bn_limit = bn_limit

    def __call__(self, sd: dict) -> tuple[float, np.ndarray, float, dict, int]:
        """(val mAP, val probs, val loss, the evaluated state dict, BN batches used)."""
        self.model.load_state_dict(sd)
        used = recompute_bn(self.model, bn_batches(self.train_loader, self.bn_limit)) if self.bn_limit > 0 else 0
        probs, loss = score_split(self.model, self.val_loader, len(self.val_labels), self.loss_fn)
        # a diverging average (non-finite scores) scores -inf: never kept, never an error
        value = metrics.mean_average_precision(probs, self.val_labels) if np.isfinite(probs).all() else -np.inf
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return value, probs, loss, state, used


def greedy_soup(group: SoupGroup, scorer: _Scorer) -> Soup:
    """Algorithm 1 of Wortsman et al. 2022 over `group.items` (best first; module docstring)."""
    items = group.items
    best_sd = load_weights(items[0])
    sum_sd = add_into(None, best_sd)
    value, probs, loss, state, used = scorer(average_state_dicts(sum_sd, 1, best_sd))
    if not np.isfinite(value):
        raise EnsembleError(f"soup {group.name}: {items[0].label} gives non-finite validation scores after "
                            f"the BatchNorm recompute; check its {rundir.BEST_MODEL}")
    soup = Soup(state, probs, loss, [], [items[0]], used)
    current = value

    def record(m: Member, kept: bool, soup_value: float, reason: Optional[str] = None, tried: Optional[float] = None):
        entry = {"run_dir": str(m.run.path.resolve()), "run_id": m.run_id, "name": m.name,
                 "val_mAP": recorded_val_map(m), "kept": kept, "tried_val_mAP": tried, "soup_val_mAP": soup_value}
        if reason:
            entry["reason"] = reason
        soup.ingredients.append(entry)

    record(items[0], True, current, tried=current)
    print(f"soup {group.name}: {items[0].name} (val mAP {recorded_val_map(items[0]):.4f}; as a soup of one, "
          f"BatchNorm recomputed: {current:.4f})", file=sys.stderr)
    for m in items[1:]:
        sd = load_weights(m)
        why = shape_mismatch(best_sd, sd)
        if why is not None:
            record(m, False, current, reason=f"not averageable with {items[0].name}: {why}")
            print(f"soup {group.name}: {m.name} left out: {why}", file=sys.stderr)
            continue
        trial_sum = {k: v + sd[k].double() for k, v in sum_sd.items()}
        value, probs, loss, state, used = scorer(average_state_dicts(trial_sum, len(soup.kept) + 1, best_sd))
        keep = bool(value >= current)        # the greedy rule: kept when validation mAP does not drop
        if keep:
            sum_sd, current = trial_sum, value
            soup.state_dict, soup.val_probs, soup.val_loss, soup.bn_batches_used = state, probs, loss, used
            soup.kept.append(m)
        record(m, keep, current, tried=value)
        print(f"soup {group.name}: + {m.name} -> val mAP {value:.4f}: {'kept' if keep else 'rejected'}",
              file=sys.stderr)
    return soup


# --------------------------------------------------------------------------- the run directory


def _check_out(out: Path) -> None:
    check_dir(out, "--out", EnsembleError)
    if out.exists() and not (out / rundir.SOUP).is_file():
        if not out.is_dir() or any(out.iterdir()):
            raise EnsembleError(f"soup output {out} exists and is not a soup directory (no {rundir.SOUP}); "
                                f"choose a new directory (a soup never overwrites a training run)")


def _previous_run(out: Path, target, candidates: list[str]) -> Optional[str]:
    """The MLflow run of this directory's previous build when it soaked the same candidates."""
    try:
        old = json.loads((out / rundir.SOUP).read_text())
    except (OSError, ValueError):
        return None
    if [i["run_dir"] for i in old.get("ingredients", [])] != candidates:
        return None
    return derived.previous_run(out, resolve_uri(target.uri), target.experiment, mq.SINGLE)


def build_soup(group: SoupGroup, *, out: Path, target=None, parent_run_id: Optional[str] = None,
               bn_limit: int = DEFAULT_BN_BATCHES, device: str = "cpu") -> rundir.RunDir:
    """The greedy soup of `group`, written to `out` (a run directory) and logged to `target`
    (an object with .uri and .experiment, e.g. ensemble.build.Target; None: not logged)."""
    if bn_limit < 0:
        raise EnsembleError(f"--soup-bn-batches {bn_limit} must be >= 0 (0: keep the averaged statistics)")
    out = Path(out)
    _check_out(out)
    best = group.items[0]
    classes = list(best.run.classes)
    scorer = _Scorer(best, len(classes), bn_limit, device)
    soup = greedy_soup(group, scorer)
    cfg = scorer.cfg
    val_labels = scorer.val_labels
    thresholds = metrics.tune_thresholds(soup.val_probs, val_labels)            # validation only
    result = {"kind": "soup", "forward_passes": 1, "selection_split": "val", "num_ingredients": len(soup.kept),
              "num_candidates": len(group.items), "bn_batches": soup.bn_batches_used,
              "val": {**metrics.evaluate(soup.val_probs, val_labels, classes=classes, thresholds=thresholds),
                      "loss": soup.val_loss}}
    splits = {"val": (soup.val_probs, val_labels, scorer.val_keys)}
    test = cfg.data.test_split
    if cfg.train.eval_test and test and test in read_manifest(cfg.data.shards).splits:     # scored ONCE, the soup chosen
        scorer.model.load_state_dict(soup.state_dict)
        keys, labels = read_split_labels(cfg.data.shards, test)
        loader = build_loader(cfg.data, test, train=False, rank=0, world_size=1, device=scorer.device, seed=cfg.seed)
        probs, loss = score_split(scorer.model, loader, len(labels), scorer.loss_fn)
        result["test"] = {**metrics.evaluate(probs, labels, classes=classes, thresholds=thresholds), "loss": loss}
        splits["test"] = (probs, labels, keys)
    config = json.loads(json.dumps(best.run.config))
    config.setdefault("train", {})["output_dir"] = str(out.resolve())
    config_from_dict(config)   # still a valid config
    doc = {"format_version": SOUP_FORMAT_VERSION, "kind": "soup", "name": out.name,
           "method": "greedy soup (Wortsman et al. 2022, Algorithm 1): uniform weight average, "
                     "BatchNorm statistics recomputed on training images, kept when val mAP does not drop",
           "selection_split": "val",
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "config_from": str(best.run.path.resolve()), "group": json.loads(group.key) | {"val_keys": len(scorer.val_keys)},
           "bn": {"split": cfg.data.train_split, "max_batches": bn_limit, "batches": soup.bn_batches_used,
                  "transform": f"evaluation (squash to {cfg.data.size} px, {cfg.data.normalize})"},
           "ingredients": soup.ingredients, "soup_val_mAP": result["val"]["mAP"],
           "best_single_val_mAP": recorded_val_map(best)}
    candidates = [i["run_dir"] for i in soup.ingredients]
    previous = _previous_run(out, target, candidates) if target is not None else None
    with replace_dir(out) as tmp:
        rundir.write_config(tmp, config)
        rundir.write_classes(tmp, classes)
        for split, (probs, labels, keys) in splits.items():
            rundir.write_split(tmp, split, probs, labels, keys)
        rundir.write_thresholds(tmp, thresholds, classes)
        rundir.write_metrics(tmp, result)
        rundir.write_json(tmp, rundir.SOUP, doc)
        with replace_with(tmp / rundir.BEST_MODEL) as f:
            torch.save(soup.state_dict, f)
    if target is not None:
        log_soup(out, target, group, soup, config, result, parent_run_id, previous)
    return rundir.load_run(out)


def log_soup(out: Path, target, group: SoupGroup, soup: Soup, config: dict, result: dict,
             parent_run_id: Optional[str], previous: Optional[str]) -> Optional[str]:
    """The soup as a single-model MLflow run (mlic.kind=single, mlic.derived=soup), nested under
    the candidates' common parent (a sweep) or `parent_run_id`."""
    parents = {m.parent_run_id for m in group.items}
    parent = parent_run_id or (parents.pop() if len(parents) == 1 else None)
    flat = flatten(config)
    ident = lambda m: m.run_id or str(m.run.path.resolve())   # noqa: E731
    tags = {mq.DERIVED_TAG: "soup", mq.INGREDIENTS_TAG: ",".join(ident(m) for m in soup.kept),
            mq.CANDIDATES_TAG: ",".join(ident(m) for m in group.items),
            "backbone": flat.get("model.backbone"), "augment": flat.get("data.augment"), "size": flat.get("data.size")}
    params = {**flat, "soup.num_ingredients": len(soup.kept), "soup.num_candidates": len(group.items),
              "soup.ingredients": ", ".join(m.name for m in soup.kept), "soup.bn_batches": soup.bn_batches_used,
              "soup.selection_split": "val"}
    artifacts = rundir.artifact_files(out) + [out / rundir.BEST_MODEL]
    return derived.log_derived(out, uri=target.uri, experiment=target.experiment, run_name=out.name, kind=mq.SINGLE,
                               params=params, tags=tags, metrics=final_metrics(result), artifacts=artifacts,
                               parent_run_id=parent, previous=previous)


def build_soups(members: Sequence[Member], out_dir: Path, target=None, parent_run_id: Optional[str] = None,
                suffix: str = "", bn_limit: int = DEFAULT_BN_BATCHES, device: str = "cpu") -> list[rundir.RunDir]:
    """A greedy soup of every soup group among `members` with two or more candidates, each under
    `out_dir`/NAME+suffix; a group of one is skipped with a message."""
    built = []
    groups = find_soup_groups(members)
    for g in groups:
        if len(g.items) < 2:
            print(f"soup: {g.name} skipped: {g.items[0].name} is the only run of its initialisation "
                  f"(backbone, pretrained weights{', seed' if 'seed' in json.loads(g.key) else ''})")
            continue
        built.append(build_soup(g, out=Path(out_dir) / (g.name + suffix), target=target,
                                parent_run_id=parent_run_id, bn_limit=bn_limit, device=device))
    if not groups:
        print(f"soup: nothing to average among {len(members)} finished runs")
    return built
