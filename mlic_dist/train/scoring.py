"""Scoring a split across ranks: every sample exactly once, in id order.

The loaders pad each rank to the same number of batches (padding rows carry id -1, and a rank's
last real sample may repeat); `predict_split` drops the padding, gathers (ids, probabilities,
loss sums, mask counts) from every rank, keeps one copy of each id and checks that the split is
complete. The loss is `run.loss_fn` (mlic_dist/losses.py) on the scale training reports: the sum
over all non-ignored (image, class) entries of the split divided by their count (not a mean of
per-sample means, which weighs an image with ignored labels more).
Functions take any object with `.model`, `.accelerator` and `.loss_fn` (train.Run).

Precision: the per-epoch validation runs under the trainer's autocast (train.mixed_precision);
the final scoring (`fp32=True`: the scores, thresholds and metrics a run keeps) runs in float32,
as predict, export and serving do, so the thresholds tuned on the saved validation scores fit
the scores those tools compute (bf16 moved them by ~1e-4, enough to flip labels at a threshold).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from tqdm import tqdm

from .. import metrics
from .distributed import gather


@contextlib.contextmanager
def _plain_forward(model):
    """The model's own forward for the block. Accelerate's prepare() replaces the forward of the
    module it was given by one that enters autocast itself (keeping the original as
    `_original_forward`), so an outer `autocast(enabled=False)` cannot turn it off. That module
    is `model`, or `model.module` under DDP (a compiled model's wrapper, either way).
    Accelerate's private `_original_forward`, checked against accelerate 1.15
    (tests/test_private_apis.py)."""
    holders = [m for m in (model, getattr(model, "module", None))
               if isinstance(m, torch.nn.Module) and "_original_forward" in vars(m)]
    wrapped = [(m, m.forward) for m in holders]
    for m in holders:
        m.forward = m._original_forward
    try:
        yield
    finally:
        for m, forward in wrapped:
            m.forward = forward


@torch.no_grad()
def predict_split(run, loader, num_samples: int, desc: str = "eval", model=None,
                  fp32: bool = False) -> tuple[np.ndarray, float]:
    """Probabilities (N, C) in id order (every sample exactly once, padding dropped) and the
    mean loss over the split's non-ignored entries, gathered from all ranks. `model` defaults to
    `run.model` (the EMA passes its own). `fp32`: autocast off (the final scores), else the
    trainer's mixed precision. A progress bar on rank 0."""

    acc = run.accelerator
    model = run.model if model is None else model
    was_training = model.training
    model.eval()
    ids, rows = [], []   # kept where they are made (the device) and copied to the host once
    # the prepared model has autocast already; an EMA copy does not
    precision = (lambda: torch.autocast(acc.device.type, enabled=False)) if fp32 else acc.autocast
    # `with`: the bar is closed on errors too, so an error message starts a line of its own
    with tqdm(total=len(loader), desc=desc, disable=not acc.is_main_process, dynamic_ncols=True,
              leave=False) as bar, (_plain_forward(model) if fp32 else contextlib.nullcontext()):
        for batch in loader:
            with precision():
                logits = model(batch.images).float()  # (B, C)
            entries = run.loss_fn.entries(logits, batch.targets, batch.mask)  # (B, C), 0 where ignored
            # (B, C + 2) float64: probabilities, per-sample loss sums, non-ignored entry counts;
            # padding rows (id -1) are dropped on the host, so no boolean indexing syncs here
            rows.append(torch.cat([torch.sigmoid(logits).double(), entries.double().sum(1, keepdim=True),
                                   batch.mask.double().sum(1, keepdim=True)], 1))
            ids.append(batch.ids)
            bar.update(1)
    all_rows = torch.cat(rows).cpu().numpy()            # every rank has at least one batch (plan.py)
    all_batch_ids = torch.cat(ids).cpu().numpy()
    keep = all_batch_ids >= 0
    local = (all_batch_ids[keep], all_rows[keep, :-2].astype(np.float32), all_rows[keep, -2], all_rows[keep, -1])
    parts = gather(acc, local)
    all_ids, all_probs, all_sums, all_counts = (np.concatenate([p[k] for p in parts]) for k in range(4))
    order = np.argsort(all_ids, kind="stable")
    all_ids, all_probs, all_sums, all_counts = (a[order] for a in (all_ids, all_probs, all_sums, all_counts))
    # Padding repeats real samples on some ranks; keep the first copy of each id.
    first = np.concatenate([[True], all_ids[1:] != all_ids[:-1]]) if len(all_ids) else np.zeros(0, bool)
    all_ids, all_probs, all_sums, all_counts = (a[first] for a in (all_ids, all_probs, all_sums, all_counts))
    if len(all_ids) != num_samples or (num_samples and (all_ids[0] != 0 or all_ids[-1] != num_samples - 1)):
        raise RuntimeError(f"evaluation scored {len(all_ids)} distinct samples, the split has {num_samples}: "
                           f"the loader lost or invented samples")
    model.train(was_training)
    count = float(all_counts.sum())
    return all_probs.astype(np.float32), float(all_sums.sum() / count) if count else float("nan")


def evaluate(run, loader, labels: np.ndarray, desc: str = "eval", model=None) -> dict:
    """{"loss", "mAP", "chance_mAP", "probs"}; mAP is NaN when the scores are not finite
    (divergence); chance_mAP (metrics.chance_mean_average_precision) depends on `labels` only."""
    probs, loss = predict_split(run, loader, len(labels), desc, model=model)
    chance = metrics.chance_mean_average_precision(labels)
    if not np.isfinite(probs).all():
        return {"loss": loss, "mAP": float("nan"), "chance_mAP": chance, "probs": probs}
    ap = metrics.average_precision(probs, labels)
    valid = ~np.isnan(ap)
    return {"loss": loss, "mAP": float(ap[valid].mean()) if valid.any() else float("nan"),
            "chance_mAP": chance, "probs": probs}
