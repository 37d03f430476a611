"""The teacher of a distillation and its probabilities on the training images.

A teacher is a finished run directory (best_model.pt: a training run, a soup, another student)
or an ensemble directory whose ensemble.json fuses member runs by score (scale, distr, greedy,
manual). Its probabilities on the training split are computed ONCE before the student trains:
each member scores the un-augmented training images with its own evaluation transform (its
data.size, its data.normalize; the student's loader reads the shards), in float32 like a run's
final scores, and the members are fused with the ensemble's weights by
`ensemble.members.fuse`, as the ensemble fused its val / test scores and as predict fuses new
images. The matrix is cached in train.output_dir/teacher/ (train/teacher.py: format and check)
with a digest of the teacher (members, weights, sizes, weight files) and of the shards; a resumed
or repeated command with the same teacher and shards reuses it.

Several processes: each rank scores its share of the split (the evaluation rank plan), the
shares are gathered (train/scoring.py's `predict_split`: every sample once, in id order), rank
0 writes the cache and every rank waits for it; then every rank trains. Nothing is collective
before the checks (the teacher, the shards, the config), so bad input is one line per rank.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

from .. import rundir
from ..config import Config
from ..config.schema import LossConfig
from ..data import build_loader, read_manifest
from ..data.manifest import content_digest
from ..ensemble.members import fuse
from ..errors import UserError
from ..losses import build_loss
from ..predict import load_member
from ..train import teacher as cache_format
from ..train.distributed import build_accelerator
from ..train.loop import check_inputs, train
from ..train.scoring import predict_split

# ensemble.json kinds that fuse member runs' probabilities with weights (mlic_dist/ensemble);
# others (a TTA ensemble of views of one run, anything newer) are refused, not misread
FUSED_KINDS = ("scale", "distr", "greedy", "manual")
CACHE = Path("teacher") / "train.npy"   # under the student's train.output_dir


class DistillError(UserError, ValueError):
    """The teacher cannot teach this student (not a finished run, another dataset, a kind of
    ensemble not handled); the message names the directory and the fix."""


@dataclass
class TeacherMember:
    run_dir: Path
    run_id: Optional[str]
    weight: float
    cfg: Config


@dataclass
class Teacher:
    path: Path
    kind: str                 # run | an ensemble.json kind
    run_id: Optional[str]     # the teacher's MLflow run (tracking.json), if it has one
    classes: list[str]
    members: list[TeacherMember]

    def digest(self, loader: str) -> str:
        """What the cached probabilities depend on besides the shards: every member's weight,
        size, normalisation, backbone and weight file (hashed), and the loader that decodes."""
        h = hashlib.sha256(json.dumps({"classes": self.classes, "loader": loader}).encode())
        for m in self.members:
            h.update(json.dumps([m.weight, m.cfg.data.size, m.cfg.data.normalize, m.cfg.model.backbone]).encode())
            with open(m.run_dir / rundir.BEST_MODEL, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()[:32]


def _member(path: Path, run_id: Optional[str], weight: float, teacher: Path) -> TeacherMember:
    try:
        run = rundir.load_run(path, splits=())
    except rundir.RunDirError as e:
        raise DistillError(f"teacher {teacher}: member {path}: {e}") from None
    if run.is_ensemble or not (run.path / rundir.BEST_MODEL).is_file():
        raise DistillError(f"teacher {teacher}: {run.path} has no {rundir.BEST_MODEL}; a teacher is a finished "
                           f"training run or an ensemble of finished runs")
    return TeacherMember(run.path, run_id or (run.tracking or {}).get("run_id"), weight, run.cfg())


def load_teacher(path: str | Path) -> Teacher:
    """The run or ensemble directory as a Teacher; DistillError when it cannot teach."""
    path = Path(path)
    try:
        run = rundir.load_run(path, splits=())
    except rundir.RunDirError as e:
        raise DistillError(f"--teacher {path}: {e}") from None
    run_id = (run.tracking or {}).get("run_id")
    if not run.is_ensemble:
        return Teacher(run.path, "run", run_id, run.classes, [_member(run.path, run_id, 1.0, path)])
    doc = run.ensemble
    kind, members = doc.get("kind"), doc.get("members") or []
    viewed = next((m for m in members if "view" in m), None)
    if kind not in FUSED_KINDS or viewed is not None:
        what = f"member view {viewed['view']!r}" if viewed is not None else f"kind {kind!r}"
        raise DistillError(f"--teacher {path}: {rundir.ENSEMBLE} has {what}; distillation takes a run or an "
                           f"ensemble that fuses runs ({', '.join(FUSED_KINDS)}): pass one of those")
    if not members:
        raise DistillError(f"--teacher {path}: {rundir.ENSEMBLE} lists no members; rebuild the ensemble")
    out = []
    for m in members:
        if "run_dir" not in m or "weight" not in m:
            raise DistillError(f"--teacher {path}: a member of {rundir.ENSEMBLE} lacks run_dir or weight "
                               f"({m}); rebuild the ensemble")
        member = _member(Path(m["run_dir"]), m.get("run_id"), float(m["weight"]), path)
        member_classes = rundir.load_classes(member.run_dir / rundir.CLASSES)
        if member_classes != run.classes:
            raise DistillError(f"--teacher {path}: member {member.run_dir} has classes {member_classes}, the "
                               f"ensemble has {run.classes}; rebuild the ensemble")
        out.append(member)
    return Teacher(run.path, str(kind), run_id, run.classes, out)


def _check(teacher: Teacher, cfg: Config) -> None:
    manifest = read_manifest(cfg.data.shards)
    if list(manifest.classes) != teacher.classes:
        raise DistillError(f"--teacher {teacher.path} was trained on the classes {teacher.classes}, "
                           f"data.shards={cfg.data.shards!r} has {list(manifest.classes)}; distil on the "
                           f"teacher's dataset (its shards, or shards with the same classes)")


@torch.no_grad()
def teacher_probabilities(teacher: Teacher, cfg: Config, accelerator) -> np.ndarray:
    """(N_train, C) float32: every member's probabilities on the un-augmented `data.train_split`
    images of `cfg.data.shards` (its own size and normalisation, float32), fused with the
    ensemble's weights (`ensemble.members.fuse`). Collective: every rank calls it and gets the
    whole matrix; each rank scores its share."""
    n = read_manifest(cfg.data.shards).split(cfg.data.train_split).num_samples
    scorer = SimpleNamespace(accelerator=accelerator, loss_fn=build_loss(LossConfig()), model=None)
    probs = []
    for m in teacher.members:
        member, _ = load_member(m.run_dir, accelerator.device)
        data_cfg = dataclasses.replace(cfg.data, size=m.cfg.data.size, normalize=m.cfg.data.normalize)
        loader = build_loader(data_cfg, cfg.data.train_split, train=False, rank=accelerator.process_index,
                              world_size=accelerator.num_processes, device=accelerator.device, seed=cfg.seed)
        try:
            scorer.model = member.model
            p, _ = predict_split(scorer, loader, n, desc=f"teacher {m.run_dir.name}", fp32=True)
        finally:
            loader.close()
        probs.append(p)
    return fuse(probs, [m.weight for m in teacher.members])


def _cached(scores: Path, manifest, cfg: Config, digest: str) -> bool:
    """Is there a cache for this teacher and these shards at `scores` (and does it fit them)?"""
    if not scores.is_file():
        return False
    try:
        cache = cache_format.check_cache(scores, manifest, cfg.data.train_split)
    except UserError:
        return False
    return (cache.meta.get("teacher_digest") == digest
            and cache.meta.get("manifest_sha256") == content_digest(cfg.data.shards)
            and cache.meta.get("npy_sha256") == cache_format.npy_sha256(scores))   # not cut mid-overwrite


def distill(teacher_dir: str | Path, cfg: Config) -> dict:
    """The teacher's cached probabilities (computed unless a matching cache exists), then
    `train(cfg)` with distill.teacher_scores naming them; returns metrics.json's dict."""
    if cfg.distill.teacher_scores:
        raise DistillError(f"distill.teacher_scores={cfg.distill.teacher_scores!r} is set and --teacher "
                           f"{teacher_dir} is given: the command computes the teacher's scores itself; drop "
                           f"the key (or run python -m mlic_dist.train with it, without --teacher)")
    teacher = load_teacher(teacher_dir)
    manifest = check_inputs(cfg)        # the shards and the student's model, before any process group
    _check(teacher, cfg)
    scores = (Path(cfg.train.output_dir) / CACHE).resolve()
    # the decode changes the pixels: the loader, DALI's upsampling, and GPU (mixed) vs CPU decoding
    digest = teacher.digest(f"{cfg.data.loader}:fancy_upsampling={cfg.data.dali_fancy_upsampling}:"
                            f"cuda={torch.cuda.is_available()}")
    reuse = _cached(scores, manifest, cfg, digest)    # every rank decides alike, before anyone writes
    if not reuse and scores.is_file() and any((Path(cfg.train.output_dir) / "checkpoints").glob("e*")):
        # the checkpoints trained on the cache there: resuming them on another teacher's targets
        # would mix two teachers under one name
        raise DistillError(f"{cfg.train.output_dir} holds a student's checkpoints trained on another teacher's "
                           f"(or other shards') probabilities ({scores}); distill into a new train.output_dir, "
                           f"or delete that directory to start this student afresh")
    acc = build_accelerator(cfg)
    if reuse:
        if acc.is_main_process:
            print(f"teacher probabilities: reusing {scores}", flush=True)
    else:
        probs = teacher_probabilities(teacher, cfg, acc)
        if acc.is_main_process:
            keys = (Path(cfg.data.shards) / f"{cfg.data.train_split}-keys.txt").read_text().splitlines()
            meta = {"teacher": str(teacher.path.resolve()), "teacher_run_id": teacher.run_id,
                    "teacher_kind": teacher.kind,
                    "members": [{"run_dir": str(m.run_dir.resolve()), "run_id": m.run_id, "weight": m.weight,
                                 "backbone": m.cfg.model.backbone, "size": m.cfg.data.size,
                                 "normalize": m.cfg.data.normalize} for m in teacher.members],
                    "classes": teacher.classes, "split": cfg.data.train_split, "num_samples": len(probs),
                    "shards": str(Path(cfg.data.shards).resolve()),
                    "manifest_sha256": content_digest(cfg.data.shards), "teacher_digest": digest,
                    "loader": cfg.data.loader}
            cache_format.write_cache(scores, probs, keys, meta)
            print(f"teacher probabilities: {probs.shape[0]} training images x {len(teacher.members)} member(s) "
                  f"-> {scores}", flush=True)
        acc.wait_for_everyone()
    student = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher_scores=str(scores)))
    return train(student)
