"""Scoring a split across ranks: every sample exactly once, in id order.

The loaders pad each rank to the same number of batches (padding rows carry id -1, and a rank's
last real sample may repeat); `predict_split` drops the padding, gathers (ids, probabilities,
losses) from every rank, keeps one copy of each id and checks that the split is complete.
Functions take any object with `.model` and `.accelerator` (train.Run).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics
from .distributed import gather


@torch.no_grad()
def predict_split(run, loader, num_samples: int, desc: str = "eval") -> tuple[np.ndarray, float]:
    """Probabilities (N, C) in id order (every sample exactly once, padding dropped) and the
    mean validation loss over those samples, gathered from all ranks. A progress bar on rank 0."""
    from tqdm import tqdm

    model, acc = run.model, run.accelerator
    model.eval()
    ids, probs, losses = [], [], []
    # `with`: the bar is closed on errors too, so an error message starts a line of its own
    with tqdm(total=len(loader), desc=desc, disable=not acc.is_main_process, dynamic_ncols=True,
              leave=False) as bar:
        for batch in loader:
            logits = model(batch.images).float()  # (B, C)
            per_sample = (F.binary_cross_entropy_with_logits(logits, batch.targets, reduction="none")
                          * batch.mask).sum(1) / batch.mask.sum(1).clamp_min(1.0)  # (B,)
            keep = batch.ids >= 0
            ids.append(batch.ids[keep].cpu())
            probs.append(torch.sigmoid(logits[keep]).cpu())
            losses.append(per_sample[keep].cpu())
            bar.update(1)
    local = (torch.cat(ids).numpy(), torch.cat(probs).numpy(), torch.cat(losses).numpy())
    parts = gather(acc, local)
    all_ids = np.concatenate([p[0] for p in parts])
    all_probs = np.concatenate([p[1] for p in parts])
    all_losses = np.concatenate([p[2] for p in parts])
    order = np.argsort(all_ids, kind="stable")
    all_ids, all_probs, all_losses = all_ids[order], all_probs[order], all_losses[order]
    # Padding repeats real samples on some ranks; keep the first copy of each id.
    first = np.concatenate([[True], all_ids[1:] != all_ids[:-1]]) if len(all_ids) else np.zeros(0, bool)
    all_ids, all_probs, all_losses = all_ids[first], all_probs[first], all_losses[first]
    if len(all_ids) != num_samples or (num_samples and (all_ids[0] != 0 or all_ids[-1] != num_samples - 1)):
        raise RuntimeError(f"evaluation scored {len(all_ids)} distinct samples, the split has {num_samples}: "
                           f"the loader lost or invented samples")
    model.train()
    return all_probs.astype(np.float32), float(all_losses.mean()) if len(all_losses) else float("nan")


def evaluate(run, loader, labels: np.ndarray, desc: str = "eval") -> dict:
    """{"loss", "mAP", "probs"}; mAP is NaN when the scores are not finite (divergence)."""
    probs, loss = predict_split(run, loader, len(labels), desc)
    if not np.isfinite(probs).all():
        return {"loss": loss, "mAP": float("nan"), "probs": probs}
    ap = metrics.average_precision(probs, labels)
    valid = ~np.isnan(ap)
    return {"loss": loss, "mAP": float(ap[valid].mean()) if valid.any() else float("nan"), "probs": probs}
