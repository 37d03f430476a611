"""Carve a validation split out of train with iterative stratification.

Model selection (early stopping, thresholds, checkpoint choice) must never see the test split, so a
dataset that ships without a validation split (VOC trainval, NUS-WIDE, COCO train+val-as-test, a CSV
without a split column) gets one carved from train. Multi-label data cannot be stratified per class
with a plain stratified split; `iterstrat`'s MultilabelStratifiedShuffleSplit (Sechidis et al. 2011)
keeps every class's positive rate close in both parts. "ignore" (-1) counts as positive for the
stratification: a difficult object is still an instance of the class.
"""
from __future__ import annotations

import numpy as np


def carve_val(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split rows of `labels` (N, C) int8 into (train_idx, val_idx), both sorted, disjoint."""
    n = len(labels)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--val-fraction={fraction!r} must be in (0, 1), e.g. 0.1")
    if n < 2:
        raise ValueError(f"cannot carve a validation split from {n} training sample(s); "
                         "provide a val split or more data")
    n_val = min(n - 1, max(1, int(round(n * fraction))))
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    y = (labels != 0).astype(np.int64)
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros((n, 1)), y))
    # iterative stratification only approximates the requested size (off by a few samples);
    # move random samples across so val is exactly round(n * fraction): sizes users can predict
    rng = np.random.default_rng(seed)
    if len(val_idx) > n_val:
        extra = rng.choice(len(val_idx), len(val_idx) - n_val, replace=False)
        train_idx = np.concatenate([train_idx, val_idx[extra]])
        val_idx = np.delete(val_idx, extra)
    elif len(val_idx) < n_val:
        take = rng.choice(len(train_idx), n_val - len(val_idx), replace=False)
        val_idx = np.concatenate([val_idx, train_idx[take]])
        train_idx = np.delete(train_idx, take)
    return np.sort(train_idx), np.sort(val_idx)


def distribution_report(classes: list[str], train: np.ndarray, val: np.ndarray) -> dict:
    """How well the carve kept per-class positive rates: JSON for the manifest and the summary."""
    def rate(a):
        return (a == 1).mean(0) if len(a) else np.zeros(len(classes))

    r_train, r_val = rate(train), rate(val)
    diff = np.abs(r_train - r_val)
    worst = int(np.argmax(diff)) if len(classes) else 0
    return {
        "train_samples": int(len(train)),
        "val_samples": int(len(val)),
        "val_positive": {c: int((val[:, i] == 1).sum()) for i, c in enumerate(classes)},
        "train_positive_rate": {c: round(float(r_train[i]), 4) for i, c in enumerate(classes)},
        "val_positive_rate": {c: round(float(r_val[i]), 4) for i, c in enumerate(classes)},
        "max_abs_rate_diff": round(float(diff.max()) if len(classes) else 0.0, 4),
        "max_abs_rate_diff_class": classes[worst] if len(classes) else None,
        "classes_without_val_positive": [c for i, c in enumerate(classes)
                                         if (val[:, i] == 1).sum() == 0],
    }
