"""Which runs an ensemble fuses: the paper's groups (ScaleEn, DistrEn), optionally restricted by
an `EnsembleRule` (a sweep file's `ensembles:` entry naming the members' augmentations, sizes and
backbones, as in the paper's Table 3), and greedy ensemble selection (Caruana et al., 2004). Pure functions on configs and validation score matrices;
`mlic_dist.ensemble` builds, writes and logs what they choose.

Groups come from each run's recorded config (config.yaml, flattened to dotted keys), never from
names. Two runs are in one ScaleEn group when their configs are equal except `data.size`, in
one DistrEn group when equal except `data.augment`, ignoring the keys that do not change the
model a run learns (`config.is_model_key`, the list a resume also uses: where it writes and logs,
resume bookkeeping such as train.resume_accept, checkpoint cadence, compile / memory-format / DDP
switches, the loader's implementation and workers). `seed` is NOT ignored: a run with
another seed is another model, so each seed gets its own ScaleEn / DistrEn (the report shows
them as mean +- std over seeds), and greedy selection may take several seeds of one config.
"""
from __future__ import annotations

import hashlib
import json
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from .. import metrics
from ..config import is_model_key  # the one list of model-defining keys (config/schema.py)
from ..resources import usable_cores

VARY = {"scale": "data.size", "distr": "data.augment"}
TIE_EPS = 1e-12   # mAPs closer than this are a tie: the lower member index wins (deterministic)


def model_config(flat: dict) -> dict:
    """The flattened config without the keys that do not define the model."""
    return {k: v for k, v in flat.items() if is_model_key(k)}


def group_key(flat: dict, vary: str) -> str:
    """Canonical text of everything that defines the model except `vary`."""
    cfg = {k: v for k, v in model_config(flat).items() if k != vary}
    return json.dumps(cfg, sort_keys=True, default=str)


def digest(text: str, n: int = 6) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


@dataclass
class Group:
    kind: str                 # scale | distr
    key: str                  # group_key text
    items: list               # the members, ordered by the varied value
    vary: str                 # the dotted key that differs
    rule: Optional["EnsembleRule"] = None    # the sweep file's entry that asked for it, if any

    @property
    def name(self) -> str:
        """e.g. scale-resnet101-M3-seed0-1a2b3c, or ScaleEn-resnet101-M3-seed0-1a2b3c under a rule
        named ScaleEn (the digest tells apart groups that differ in keys the name does not show,
        such as the learning rate)."""
        cfg = json.loads(self.key)
        shown = cfg.get("data.augment") if self.kind == "scale" else f"{cfg.get('data.size')}px"
        prefix = (self.rule.name if self.rule is not None else "") or self.kind
        backbone = str(cfg.get("model.backbone")).replace("/", "_")    # timm/NAME: a name, not a path
        return f"{prefix}-{backbone}-{shown}-seed{cfg.get('seed')}-{digest(self.key)}"


@dataclass(frozen=True)
class EnsembleRule:
    """Which runs a ScaleEn / DistrEn takes: a sweep file's `ensembles:` entry such as
    `{kind: scale, name: ScaleEn, where: {model.backbone: resnet101, data.augment: M1,
    data.size: [384, 448, 512]}}` (the paper's Table 3). Only runs whose config has one of the
    listed values for every `where` key are grouped (as always: equal but for VARY[kind]); when
    `where` lists the varied key's values, a group must have all of them (a group that lost a
    member is not the ensemble asked for: skipped, with a message)."""
    kind: str                 # scale | distr
    where: tuple = ()         # ((dotted key, (allowed values, ...)), ...)
    name: str = ""            # the ensembles' name prefix (default: the kind)

    @classmethod
    def from_dict(cls, entry: dict) -> "EnsembleRule":
        """From {"kind", "name"?, "where"?: {key: value or [values]}}; ValueError names the fault."""
        unknown = sorted(set(entry) - {"kind", "name", "where"})
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in ensemble entry {entry}; use kind, name, where")
        kind = entry.get("kind")
        if kind not in VARY:
            raise ValueError(f"ensemble entry {entry}: kind={kind!r} must be one of {sorted(VARY)} "
                             "(greedy takes every run: write it as a plain `greedy`)")
        where = entry.get("where") or {}
        if not isinstance(where, dict):
            raise ValueError(f"ensemble entry {entry}: where must map dotted config keys to a value or a list")
        name = str(entry.get("name") or "")
        if name and not all(ch.isalnum() or ch in "-_." for ch in name):
            raise ValueError(f"ensemble entry {entry}: name={name!r} may hold only letters, digits, - _ .")
        return cls(kind, tuple((k, tuple(v) if isinstance(v, (list, tuple)) else (v,))
                               for k, v in sorted(where.items())), name)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name,
                "where": {k: list(v) if len(v) > 1 else v[0] for k, v in self.where}}

    def describe(self) -> str:
        cond = " ".join(f"{k}={'|'.join(map(str, v))}" for k, v in self.where)
        return f"{self.name or self.kind}[{cond}]" if cond else (self.name or self.kind)

    def matches(self, flat: dict) -> bool:
        return all(k in flat and _same_value(flat[k], values) for k, values in self.where)

    def complete(self, group: "Group", flat_config: Callable) -> bool:
        wanted = dict(self.where).get(VARY[self.kind])
        if wanted is None:
            return True
        have = [flat_config(i)[VARY[self.kind]] for i in group.items]
        return len(have) == len(wanted) and all(_same_value(h, wanted) for h in have)


def _same_value(value, allowed: tuple) -> bool:
    """`value` is one of `allowed` (YAML 512 and a recorded "512" are one size)."""
    return any(value == a or str(value) == str(a) for a in allowed)


def find_groups(items: Sequence, kind: str, flat_config: Callable, newest: Callable, label: Callable,
                rule: Optional[EnsembleRule] = None) -> list[Group]:
    """Groups of `items` (anything: flat_config(item) -> dotted dict) whose configs differ only
    in VARY[kind], with at least two distinct values of it. Two runs with the same value (a rerun)
    are one model: the newest is kept (newest(item) -> sortable), the other skipped with a warning.
    With a `rule`, only the runs it matches, and only groups that are complete under it."""
    vary = VARY[kind]
    by_key: dict[str, dict] = {}
    for item in items:
        flat = flat_config(item)
        if vary not in flat or (rule is not None and not rule.matches(flat)):
            continue
        slot = by_key.setdefault(group_key(flat, vary), {})
        value = flat[vary]
        if value in slot:
            old, new = sorted([slot[value], item], key=newest)
            warnings.warn(f"{kind}: {label(old)} and {label(new)} have the same config ({vary}={value!r}); "
                          f"using the newer, {label(new)}")
            item = new
        slot[value] = item
    groups = []
    for key, slot in by_key.items():
        if len(slot) >= 2:
            ordered = [slot[v] for v in sorted(slot, key=lambda v: (str(type(v)), v))]
            group = Group(kind, key, ordered, vary, rule)
            if rule is not None and not rule.complete(group, flat_config):
                print(f"{rule.describe()}: {group.name} skipped: it has {vary} = "
                      f"{sorted(slot, key=str)}, the rule asks for {list(dict(rule.where)[vary])}")
                continue
            groups.append(group)
    return sorted(groups, key=lambda g: g.name)


# --------------------------------------------------------------------------- greedy selection


@dataclass
class GreedyResult:
    counts: np.ndarray                  # (M,) times each member was selected at the best point
    trajectory: list = field(default_factory=list)  # [{"step", "added", "size", "val_mAP"}]
    best_step: int = 0                  # index into trajectory


def greedy_select(val_scores: Sequence[np.ndarray], val_targets: np.ndarray, init: int = 3,
                  steps: int = 20, threads: Optional[int] = None) -> GreedyResult:
    """Caruana et al. (2004) ensemble selection on VALIDATION scores only.

    val_scores: M arrays (N, C) of probabilities (aligned rows); val_targets (N, C) in {1, 0, -1}.
    Sorted initialisation: the `init` best members by val mAP enter first (the trajectory records
    sizes 1..init); then `steps` rounds of forward selection WITH replacement, each adding the
    member whose addition gives the highest val mAP of the fused scores (the mean of the selected
    members' probabilities, a member counted as often as selected; float32 like a stored
    ensemble). Ties (within TIE_EPS) go to the lower member index. The result is the best point of
    the whole trajectory (ties: the earlier, smaller one); weights = selection counts there.

    Each candidate costs one fused matrix and one `metrics.FastAP` evaluation (one sort per
    class): M x steps evaluations in all (27 x 20 on 40,000 x 80: bench/ensemble.py). The M
    candidates of a step are evaluated on `threads` threads (default: the usable cores), each
    with its own buffers: NumPy releases the GIL in the sorts and the array arithmetic."""
    m = len(val_scores)
    if m == 0:
        raise ValueError("greedy selection needs at least one member")
    ap = metrics.FastAP(val_targets, threads=1)
    members = [np.ascontiguousarray(np.asarray(s, np.float32).T) for s in val_scores]   # M x (C, N)
    acc = np.zeros(members[0].shape, np.float64)      # sum of the selected members, (C, N)
    local = threading.local()

    def fused_map(candidate: int, size: int) -> float:
        if not hasattr(local, "tmp"):                 # per-thread buffers, reused every call
            local.tmp, local.fused = np.empty_like(acc), np.empty(acc.shape, np.float32)
        np.add(acc, members[candidate], out=local.tmp)
        np.divide(local.tmp, size, out=local.fused, casting="same_kind")   # float64 mean -> float32
        return metrics.nanmean(ap(local.fused, overwrite=True))

    workers = max(1, min(threads or usable_cores(), m))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mlic-greedy") as pool:
        single = list(pool.map(lambda s: metrics.nanmean(ap(s)), members))
        if all(np.isnan(single)):
            raise ValueError("the validation split has no positive label in any class: nothing to select on")
        order = sorted(range(m), key=lambda i: (-np.nan_to_num(single[i], nan=-1.0), i))
        counts = np.zeros(m, np.int64)
        trajectory = []
        for rank, i in enumerate(order[:max(1, min(init, m))]):
            value = single[i] if rank == 0 else fused_map(i, rank + 1)
            acc += members[i]
            counts[i] += 1
            trajectory.append({"step": len(trajectory), "added": i, "size": int(counts.sum()),
                               "val_mAP": value, "counts": counts.tolist()})
        for _ in range(steps):
            size = int(counts.sum()) + 1
            values = list(pool.map(lambda i: fused_map(i, size), range(m)))   # in member order
            best_i = 0
            for i in range(1, m):
                if values[i] > values[best_i] + TIE_EPS:
                    best_i = i
            acc += members[best_i]
            counts[best_i] += 1
            trajectory.append({"step": len(trajectory), "added": best_i, "size": size,
                               "val_mAP": values[best_i], "counts": counts.tolist()})
    best = 0
    for t, point in enumerate(trajectory):
        if point["val_mAP"] > trajectory[best]["val_mAP"] + TIE_EPS:
            best = t
    return GreedyResult(np.array(trajectory[best]["counts"], np.int64), trajectory, best)
