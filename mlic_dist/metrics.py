"""Multi-label classification metrics: pure functions on (N, C) score and target arrays.

    from mlic_dist.metrics import evaluate, tune_thresholds
    thresholds = tune_thresholds(val_scores, val_targets)            # (C,) F1-maximising, on val
    result = evaluate(test_scores, test_targets, classes, k=3, thresholds=thresholds)
    result["mAP"], result["top3"]["OF1"], result["thresh"]["CF1"]

Inputs. `scores` (N, C): any finite real numbers, higher = more likely (probabilities in [0, 1]
for the `thresh` rule's default 0.5; ranking metrics accept logits too). `targets` (N, C): 1
positive, 0 negative, -1 ignore (VOC "difficult", NUS unlabeled). Every value is a fraction in
[0, 1] (reports multiply by 100); a value that is undefined (no positives to measure against) is
NaN in arrays and None in `evaluate`'s dict, never a number silently averaged in.

Definitions (the literature's repos disagree; these are the choices, and the tests pin each):
- AP of a class: non-interpolated average precision over the rows whose target is not -1
  (`sklearn.metrics.average_precision_score`). Ties: tied scores enter the ranking together, so
  each tied positive gets the precision of the whole tie group (pessimistic, the same as the seed
  repo's `>=` count in `cemap_cal` and ML-GCN's AP). Not VOC07 11-point, not "all-point
  interpolated" (query2labels' voc_mAP), which are higher.
- mAP: mean AP over the classes with at least one positive; the others are NaN per class and are
  listed in `classes_without_positives`.
- eAP (the seed repo's `emap`): the same AP per image over its non-ignored classes, averaged over
  the images with at least one positive.
- Per-class P / R / F1 from counts over non-ignored entries: P = TP / predicted, with P = 0 for a
  class with no predicted positives (ML-GCN, sklearn's default); R = TP / positives, undefined
  (NaN) without positives; F1 = 2PR / (P + R), 0 when P + R = 0.
- CP, CR, CF1_mean: means of per-class P, R, F1 over the classes with at least one positive (as
  mAP; predictions on the other classes still count as false positives in OP). CF1 = 2 CP CR /
  (CP + CR), ML-GCN's definition; CF1_mean is ASL / mmpretrain's mean of per-class F1.
- OP, OR, OF1: the same counts pooled over every non-ignored (image, class) pair.
- `topk` rule: each image predicts its k highest-scoring classes, no threshold (the seed paper's
  table). Ties at the k-th place go to the lower class index (exactly k per image). Ignored
  entries (`topk_ignore="exclude"`, default) are taken out of the ranking first, so they never
  use a slot; an image with fewer than k non-ignored classes predicts them all. Without ignore
  entries OP = TP / (N k), the seed repo's `prf_cal`. `topk_ignore="slot"` reproduces `prf_cal`
  on data with ignore entries: they compete for slots and a slot they take counts as a prediction
  that is never correct (OP = TP / (N k) always).
- `thresh` rule: predicted iff score >= threshold, a global float or one per class.
- Tuned thresholds (`tune_thresholds`): per class, the score from
  `sklearn.metrics.precision_recall_curve` (non-ignored rows) maximising F1 under `>=`; among
  equal F1 the lowest such score; a class without positives gets `fallback` (0.5).
"""
from __future__ import annotations

import functools
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve

from .errors import UserError
from .resources import usable_cores


class MetricsError(UserError, ValueError):
    """Score / target / threshold inputs that the metrics cannot take; the message names the fix."""


SUMMARY_KEYS = ("CP", "CR", "CF1", "CF1_mean", "OP", "OR", "OF1")
TOPK_IGNORE_MODES = ("exclude", "slot")


# ----------------------------------------------------------------------------- validation
def validate(scores, targets) -> tuple[np.ndarray, np.ndarray]:
    """Checks and converts inputs: returns (float64 scores (N, C), int8 targets (N, C)).

    Raises ValueError naming the problem and the first bad (row, col) and its value.
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    for name, arr in (("scores", scores), ("targets", targets)):
        if arr.ndim != 2:
            raise MetricsError(f"{name} must be a 2-D (N, C) array; got shape {arr.shape}")
        if arr.size == 0:
            raise MetricsError(f"{name} is empty (shape {arr.shape}); need at least one image and one class")
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise MetricsError(f"{name} must be numeric; got dtype {arr.dtype}")
    if scores.shape != targets.shape:
        raise MetricsError(
            f"scores shape {scores.shape} != targets shape {targets.shape}; both must be (N, C) "
            "with the same images (rows) and classes (columns)")
    scores = scores.astype(np.float64)
    bad = ~np.isfinite(scores)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise MetricsError(
            f"scores has {int(bad.sum())} non-finite value(s); first at (row {row}, col {col}) = "
            f"{scores[row, col]}; fix the model output or drop those rows")
    bad = ~np.isin(targets, (-1, 0, 1))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise MetricsError(
            f"targets must be 1 (positive), 0 (negative) or -1 (ignore); {int(bad.sum())} value(s) "
            f"are not, first at (row {row}, col {col}) = {targets[row, col].item()!r}")
    return scores, targets.astype(np.int8)


def _check_k(k: int, num_classes: int) -> int:
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= num_classes:
        raise MetricsError(f"k={k!r} must be an integer in 1..{num_classes} (the number of classes)")
    return int(k)


def _per_class_thresholds(threshold, thresholds, num_classes: int) -> np.ndarray:
    """(C,) thresholds from a global float or a per-class sequence (which wins when given)."""
    if thresholds is None:
        if isinstance(threshold, bool) or not np.isscalar(threshold) or not np.isfinite(threshold):
            raise MetricsError(f"threshold={threshold!r} must be a finite number, e.g. 0.5")
        return np.full(num_classes, float(threshold))
    out = np.asarray(thresholds, dtype=np.float64)
    if out.shape != (num_classes,):
        raise MetricsError(
            f"thresholds has shape {out.shape}; need one per class, shape ({num_classes},)")
    if not np.isfinite(out).all():
        col = int(np.flatnonzero(~np.isfinite(out))[0])
        raise MetricsError(f"thresholds[{col}] = {out[col]} is not finite")
    return out


# ----------------------------------------------------------------------------- ranking metrics
def average_precision(scores, targets) -> np.ndarray:
    """(C,) non-interpolated AP per class over non-ignored rows; NaN where a class has no positives."""
    scores, targets = validate(scores, targets)
    ap = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        keep = targets[:, c] != -1
        y = targets[keep, c] == 1
        if y.any():  # sklearn warns and returns 0 without positives; undefined here instead
            ap[c] = average_precision_score(y, scores[keep, c])
    return ap


def chance_average_precision(targets) -> np.ndarray:
    """(C,) the expected AP of random scores (every ranking equally likely) per class, over the
    rows `average_precision` uses (ignore labels dropped); NaN where a class has no positives.
    Exact, not the positive rate: with P positives among N rows the positive at rank i has
    expected precision (1 + (P - 1)(i - 1) / (N - 1)) / i, so E[AP] = (1/N) sum_i of that
    (Bestgen 2015); it tends to P/N for large N (1/N * H_N for one positive)."""
    targets = np.asarray(targets)
    chance = np.full(targets.shape[1], np.nan)
    for c in range(targets.shape[1]):
        col = targets[:, c]
        n, pos = int((col != -1).sum()), int((col == 1).sum())
        if pos:
            i = np.arange(1, n + 1, dtype=np.float64)
            spread = (pos - 1) * (i - 1) / (n - 1) if n > 1 else 0.0
            chance[c] = float(np.sum((1 + spread) / i) / n)
    return chance


def chance_mean_average_precision(targets) -> float:
    """The mAP of random scores: `chance_average_precision` averaged as mAP averages classes
    (the classes with at least one non-ignored positive); NaN if no class has one."""
    return nanmean(chance_average_precision(targets))


def mean_average_precision(scores, targets) -> float:
    """mAP over the classes with at least one positive; NaN if no class has one."""
    return nanmean(average_precision(scores, targets))


def example_average_precision(scores, targets) -> np.ndarray:
    """(N,) AP of each image ranking its non-ignored classes; NaN for images without positives.

    Vectorised (one sort for all images, rather than N sklearn calls) with the same tie rule as
    `average_precision`: a positive's precision counts every class scoring >= it.
    """
    scores, targets = validate(scores, targets)
    valid = targets != -1
    positive = targets == 1
    # Ignored entries sort last (-inf) and add nothing to the counts.
    ranked = np.where(valid, scores, -np.inf)
    order = np.argsort(-ranked, axis=1, kind="stable")
    s = np.take_along_axis(ranked, order, axis=1)                    # (N, C) descending
    pos = np.take_along_axis(positive, order, axis=1)
    cum_pos = np.cumsum(pos, axis=1)
    cum_valid = np.cumsum(np.take_along_axis(valid, order, axis=1), axis=1)
    # Index of the last member of each entry's tie group: all ties count as ranked above.
    num_classes = s.shape[1]
    cols = np.arange(num_classes)
    is_end = np.ones_like(pos)
    is_end[:, :-1] = s[:, :-1] != s[:, 1:]
    end = np.where(is_end, cols, num_classes)
    end = np.minimum.accumulate(end[:, ::-1], axis=1)[:, ::-1]
    hits = np.take_along_axis(cum_pos, end, axis=1)
    seen = np.take_along_axis(cum_valid, end, axis=1)
    precision_at = np.where(pos, hits / np.maximum(seen, 1), 0.0)
    num_pos = positive.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(num_pos > 0, precision_at.sum(axis=1) / num_pos, np.nan)


# ----------------------------------------------------------------------------- fast AP (many evaluations)
class FastAP:
    """Per-class AP of many score matrices against one target matrix, equal to
    `average_precision` (ties as one group, ignore entries left out) without sklearn's per-class
    sort-and-curve. Built for greedy ensemble selection, which scores thousands of fused matrices.

        ap = FastAP(val_targets)              # targets (N, C) in {1, 0, -1}, layout prepared once
        ap(scores_cn)                         # scores (C, N) class-major -> (C,) AP, NaN w/o positives

    For a class with P positives, sklearn's AP (sum over distinct thresholds of recall step x
    precision) equals (1/P) * sum over positives i of pos(>= s_i) / all(>= s_i), where the counts
    run over non-ignored rows and a tie counts as "ranked above". Both counts are binary searches
    of the sorted positive scores into the sorted column, so the cost is ONE sort per class
    (in place, float32 kept: float32 -> float64 preserves every comparison, so ties are the same)
    plus O(P log N). Ignored entries are set to -inf before the sort: no finite positive score is
    <= them. The row sorts are split over `threads` (NumPy releases the GIL while sorting).
    """

    def __init__(self, targets, threads: Optional[int] = None):
        targets = np.asarray(targets)
        if targets.ndim != 2 or targets.size == 0:
            raise MetricsError(f"targets must be a non-empty 2-D (N, C) array; got shape {targets.shape}")
        bad = ~np.isin(targets, (-1, 0, 1))
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise MetricsError(f"targets must be 1, 0 or -1; (row {row}, col {col}) = {targets[row, col].item()!r}")
        self.num_samples, self.num_classes = targets.shape
        by_class = targets.T                                              # (C, N)
        self.positives = [np.flatnonzero(row == 1) for row in by_class]   # C x (P_c,) row indices
        ignored = by_class == -1
        self.ignored = ignored if ignored.any() else None                 # (C, N) bool
        self.threads = max(1, min(threads or usable_cores(), self.num_classes))

    def __call__(self, scores_cn, overwrite: bool = False) -> np.ndarray:
        """(C,) AP of `scores_cn` (C, N), NaN where a class has no positives. `overwrite=True`
        sorts the caller's array in place (saves a copy; it is garbage afterwards)."""
        x = np.asarray(scores_cn)
        if x.shape != (self.num_classes, self.num_samples):
            raise MetricsError(f"scores must be class-major (C, N) = {(self.num_classes, self.num_samples)}; "
                             f"got {x.shape} (transpose an (N, C) matrix with .T)")
        if x.dtype not in (np.float32, np.float64):
            x, overwrite = x.astype(np.float64), True
        if not overwrite or not x.flags.writeable or not x.flags.c_contiguous:
            x = np.array(x, order="C", copy=True)
        positive_scores = [np.sort(x[c, idx]) for c, idx in enumerate(self.positives)]   # (P_c,) ascending
        if self.ignored is not None:
            x[self.ignored] = -np.inf
        self._sort_rows(x)
        n = self.num_samples
        ap = np.full(self.num_classes, np.nan)
        for c, ps in enumerate(positive_scores):
            if ps.size:
                all_ge = n - np.searchsorted(x[c], ps, side="left")       # rows scoring >= s_i
                pos_ge = ps.size - np.searchsorted(ps, ps, side="left")   # positives scoring >= s_i
                ap[c] = float(np.mean(pos_ge / all_ge))
        return ap

    def _sort_rows(self, x: np.ndarray) -> None:
        if self.threads == 1:
            x.sort(axis=1)
            return
        bounds = np.linspace(0, x.shape[0], self.threads + 1).astype(int)
        list(_sort_pool(self.threads).map(lambda lo_hi: x[lo_hi[0]:lo_hi[1]].sort(axis=1),
                                          zip(bounds[:-1], bounds[1:])))


@functools.lru_cache(maxsize=None)
def _sort_pool(threads: int):
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mlic-sort")


def average_precision_fast(scores, targets, threads: Optional[int] = None) -> np.ndarray:
    """(C,) the same values as `average_precision` (to rounding, ~1e-15) from one sort per class;
    see `FastAP`. scores (N, C) (float32 stays float32), targets (N, C) in {1, 0, -1}."""
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise MetricsError(f"scores shape {scores.shape} != targets shape {targets.shape}; both must be (N, C)")
    if not np.isfinite(scores).all():
        row, col = np.argwhere(~np.isfinite(scores))[0]
        raise MetricsError(f"scores has a non-finite value at (row {row}, col {col}) = {scores[row, col]}")
    return FastAP(targets, threads)(scores.T)


# ----------------------------------------------------------------------------- prediction rules
def topk_predictions(scores, targets, k: int = 3, topk_ignore: str = "exclude") -> np.ndarray:
    """(N, C) bool: each image's k highest scores (ties to the lower class index), no threshold.

    `topk_ignore="exclude"` ranks only non-ignored entries; "slot" ranks all (the seed repo).
    """
    scores, targets = validate(scores, targets)
    k = _check_k(k, scores.shape[1])
    if topk_ignore not in TOPK_IGNORE_MODES:
        raise MetricsError(f"topk_ignore={topk_ignore!r}; choose one of {list(TOPK_IGNORE_MODES)}")
    valid = targets != -1
    ranked = np.where(valid, scores, -np.inf) if topk_ignore == "exclude" else scores
    # A stable sort of -score keeps equal scores in class order: deterministic ties.
    top = np.argsort(-ranked, axis=1, kind="stable")[:, :k]
    predicted = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(predicted, top, True, axis=1)
    if topk_ignore == "exclude":
        predicted &= valid  # images with fewer than k non-ignored classes
    return predicted


def threshold_predictions(scores, threshold: float = 0.5, thresholds=None) -> np.ndarray:
    """(N, C) bool: score >= threshold (global), or >= thresholds[c] per class when given."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise MetricsError(f"scores must be a 2-D (N, C) array; got shape {scores.shape}")
    return scores >= _per_class_thresholds(threshold, thresholds, scores.shape[1])[None, :]


# ----------------------------------------------------------------------------- P / R / F1
def _f1(p, r):
    p, r = np.asarray(p, dtype=np.float64), np.asarray(r, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(p + r > 0, 2 * p * r / (p + r), np.where(np.isnan(p + r), np.nan, 0.0))


def nanmean(values) -> float:
    """Mean over the defined entries (a class without positives has NaN AP / recall); NaN when
    none is defined. mAP = nanmean(average_precision(...)): the one definition of the mean."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def precision_recall_f1(predicted, targets, count_ignored_predictions: bool = False) -> dict:
    """Per-class and overall P/R/F1 of boolean predictions (N, C) against targets (N, C).

    Returns {"CP", "CR", "CF1", "CF1_mean", "OP", "OR", "OF1": float} and (C,) arrays "P", "R",
    "F1", "num_correct", "num_predicted", "num_positives". Predictions on ignored entries are
    dropped unless `count_ignored_predictions` (then they count as wrong: the seed's top-k OP).
    """
    predicted = np.asarray(predicted, dtype=bool)
    targets = np.asarray(targets)
    if predicted.shape != targets.shape or predicted.ndim != 2:
        raise MetricsError(f"predicted shape {predicted.shape} != targets shape {targets.shape}; "
                         "both must be (N, C)")
    positive = targets == 1
    counted = predicted if count_ignored_predictions else predicted & (targets != -1)
    num_correct = (predicted & positive).sum(axis=0)                 # (C,) TP
    num_predicted = counted.sum(axis=0)                              # (C,) TP + FP
    num_positives = positive.sum(axis=0)                             # (C,) TP + FN
    has_pos = num_positives > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(num_predicted > 0, num_correct / num_predicted, 0.0)
        r = np.where(has_pos, num_correct / num_positives, np.nan)
    f1 = _f1(p, r)
    cp = float(p[has_pos].mean()) if has_pos.any() else float("nan")
    cr = nanmean(r)
    tp, npred, npos = num_correct.sum(), num_predicted.sum(), num_positives.sum()
    op = float(tp / npred) if npred else 0.0
    orec = float(tp / npos) if npos else float("nan")
    return {
        "CP": cp, "CR": cr, "CF1": float(_f1(cp, cr)), "CF1_mean": nanmean(f1),
        "OP": op, "OR": orec, "OF1": float(_f1(op, orec)),
        "P": p, "R": r, "F1": f1,
        "num_correct": num_correct, "num_predicted": num_predicted, "num_positives": num_positives,
    }


# ----------------------------------------------------------------------------- thresholds
def tune_thresholds(scores, targets, fallback: float = 0.5) -> np.ndarray:
    """(C,) per-class thresholds maximising F1 (rule score >= t) on these (validation) scores.

    Candidates are `precision_recall_curve`'s thresholds (the distinct scores of non-ignored
    rows); equal F1 picks the lowest; a class without positives gets `fallback`.
    """
    scores, targets = validate(scores, targets)
    out = np.full(scores.shape[1], float(fallback))
    for c in range(scores.shape[1]):
        keep = targets[:, c] != -1
        y = targets[keep, c] == 1
        if not y.any():
            continue
        precision, recall, cand = precision_recall_curve(y, scores[keep, c])
        # The last (P=1, R=0) point has no threshold; thresholds come in increasing order.
        f1 = _f1(precision[:-1], recall[:-1])
        out[c] = float(cand[int(np.argmax(f1))])
    return out


def save_thresholds(path: Union[str, Path], thresholds, classes: Sequence[str]) -> None:
    """Writes {class name: threshold} as JSON (Python floats round-trip float64 exactly)."""
    classes = _check_classes(classes, len(np.atleast_1d(thresholds)))
    values = _per_class_thresholds(None, thresholds, len(classes))
    Path(path).write_text(json.dumps(dict(zip(classes, map(float, values))), indent=2) + "\n")


def load_thresholds(path: Union[str, Path], classes: Sequence[str]) -> np.ndarray:
    """(C,) thresholds in `classes` order from a {class name: threshold} JSON file.

    Raises ValueError on a class missing from the file, a name not in `classes`, or a bad value.
    """
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise MetricsError(f"thresholds file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise MetricsError(f"thresholds file {path} must hold a JSON object {{class name: threshold}}; "
                         f"got {type(data).__name__}")
    classes = list(classes)
    missing = [c for c in classes if c not in data]
    unknown = [c for c in data if c not in set(classes)]
    if missing or unknown:
        raise MetricsError(
            f"thresholds file {path} does not match the classes: missing {missing[:10]}, "
            f"unknown {unknown[:10]}; re-tune the thresholds for this class list")
    out = np.empty(len(classes))
    for i, name in enumerate(classes):
        value = data[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise MetricsError(f"thresholds file {path}: {name!r} = {value!r} is not a finite number")
        out[i] = float(value)
    return out


def _check_classes(classes: Optional[Sequence[str]], num_classes: int) -> list[str]:
    if classes is None:
        return [f"class_{i}" for i in range(num_classes)]
    classes = [str(c) for c in classes]
    if len(classes) != num_classes:
        raise MetricsError(f"got {len(classes)} class names for {num_classes} score columns; "
                         "pass the class list the scores were written with")
    if len(set(classes)) != len(classes):
        dup = sorted({c for c in classes if classes.count(c) > 1})
        raise MetricsError(f"class names must be unique; repeated: {dup[:10]}")
    return classes


# ----------------------------------------------------------------------------- report
def _py(value):
    """float or None (JSON has no NaN)."""
    value = float(value)
    return None if np.isnan(value) else value


def evaluate(scores, targets, classes: Optional[Sequence[str]] = None, k: int = 3,
             threshold: float = 0.5, thresholds=None, topk_ignore: str = "exclude") -> dict:
    """Every metric, as plain JSON-ready Python values (None where undefined).

    {"num_samples", "num_classes", "mAP", "chance_mAP", "eAP", f"top{k}": {SUMMARY_KEYS}, "thresh": {...},
     "per_class": [{"name", "AP", "P", "R", "F1", "threshold", "num_positives", "num_ignored"}],
     "classes_without_positives": [names], "settings": {...}}. Per-class P/R/F1 use `thresh`.
    `chance_mAP`: the expected mAP of random scores on these targets (`chance_mean_average_precision`),
    the floor to read mAP against.
    """
    scores, targets = validate(scores, targets)
    num_classes = scores.shape[1]
    classes = _check_classes(classes, num_classes)
    per_class_t = _per_class_thresholds(threshold, thresholds, num_classes)
    ap = average_precision(scores, targets)
    top = precision_recall_f1(topk_predictions(scores, targets, k, topk_ignore), targets,
                              count_ignored_predictions=topk_ignore == "slot")
    thr = precision_recall_f1(threshold_predictions(scores, thresholds=per_class_t), targets)
    num_ignored = (targets == -1).sum(axis=0)
    per_class = [
        {"name": name, "AP": _py(ap[c]), "P": _py(thr["P"][c]), "R": _py(thr["R"][c]),
         "F1": _py(thr["F1"][c]), "threshold": float(per_class_t[c]),
         "num_positives": int(thr["num_positives"][c]), "num_ignored": int(num_ignored[c])}
        for c, name in enumerate(classes)]
    return {
        "num_samples": int(scores.shape[0]),
        "num_classes": num_classes,
        "mAP": _py(nanmean(ap)),
        "chance_mAP": _py(chance_mean_average_precision(targets)),
        "eAP": _py(nanmean(example_average_precision(scores, targets))),
        f"top{_check_k(k, num_classes)}": {key: _py(top[key]) for key in SUMMARY_KEYS},
        "thresh": {key: _py(thr[key]) for key in SUMMARY_KEYS},
        "per_class": per_class,
        "classes_without_positives": [n for c, n in enumerate(classes) if np.isnan(ap[c])],
        "settings": {"k": int(k), "topk_ignore": topk_ignore,
                     "threshold": "per-class" if thresholds is not None else float(threshold)},
    }
