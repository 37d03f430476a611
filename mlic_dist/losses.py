"""Multi-label losses on (logits, targets, mask): one definition for training and validation.

    loss_fn = build_loss(cfg.loss)                     # loss.name = bce | asl | focal
    entries = loss_fn.entries(logits, targets, mask)   # (B, C) float32, 0 where mask == 0
    loss = loss_fn(logits, targets, mask)              # scalar: mean over the mask-1 entries

The scale (one for every loss, for training and validation alike): the MEAN OVER THE NON-IGNORED
(image, class) ENTRIES, i.e. sum(entries) / sum(mask). ASL's repo returns the SUM over the batch
and classes (`-loss.sum()`), so its numbers are B x C times ours and change with the batch size;
BCE here matches `BCEWithLogitsLoss(reduction="mean")` when nothing is ignored. Validation sums
entries and counts masks over all batches and ranks before dividing (scoring.py), so a train and
a val loss are the same quantity.

Numerics: every loss is computed in float32 from the logits (an fp16/bf16 autocast output is cast
first) with log-sigmoid formulas, never log(sigmoid(x)) or pow of a probability that rounds to 0:
  log p       = logsigmoid(x)          log(1 - p) = logsigmoid(-x)
  (1 - p)^g   = exp(g logsigmoid(-x))  p^g        = exp(g logsigmoid(x))
so logits of +-1e4 give finite losses and gradients (ASL's probability-space code, with its
`clamp(min=eps)` and `torch.pow(1 - pt, gamma)`, is the source of its NaN reports under fp16).

  bce    -[t log p + (1 - t) log(1 - p)]
  focal  Lin et al. 2017, -a_t (1 - p_t)^gamma log p_t, p_t = p if t else 1 - p,
         a_t = alpha if t else 1 - alpha (alpha < 0: no weighting). torchvision.ops'
         sigmoid_focal_loss gives the same values; it is not used because it raises (1 - p_t) to
         gamma in probability space (NaN gradients for gamma < 1 at saturated logits).
  asl    Ridnik et al. 2021 (ICCV), with the probability shift p_m = max(p - clip, 0) on negatives:
         positives  -(1 - p)^gamma_pos log p
         negatives  -p_m^gamma_neg log(1 - p_m)
         The focusing weights are part of the graph (gradients flow through them), as in
         ASL's AsymmetricLoss class today (its no-grad switch is commented out there).

Published defaults (`LossConfig`): asl gamma_neg=4, gamma_pos=0, clip=0.05, the values of ASL's
train.py (`AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05)`) and of the paper's COCO / VOC
experiments; the class's own signature defaults gamma_pos=1, which its train.py overrides.
ASL's eps=1e-8 clamp (a log p floor of -18.4) is not reproduced: log-sigmoid needs no floor.
focal gamma=2, alpha=0.25 (the RetinaNet paper and torchvision's defaults).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAMES = ("bce", "asl", "focal")


def bce_entries(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, C) float32 per-entry binary cross-entropy."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none")


def focal_entries(logits: torch.Tensor, targets: torch.Tensor, gamma: float, alpha: float) -> torch.Tensor:
    """(B, C) float32 focal loss (targets in [0, 1]; mixed targets interpolate both sides)."""
    # log p_t and log(1 - p_t) from the signed logit z = x for positives, -x for negatives
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    pos = -torch.exp(gamma * log_not_p) * log_p          # t = 1: -(1 - p)^g log p
    neg = -torch.exp(gamma * log_p) * log_not_p          # t = 0: -p^g log(1 - p)
    if alpha >= 0:
        pos, neg = alpha * pos, (1.0 - alpha) * neg
    return targets * pos + (1.0 - targets) * neg


def asl_entries(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float, gamma_pos: float,
                clip: float) -> torch.Tensor:
    """(B, C) float32 asymmetric loss."""
    pos = -torch.exp(gamma_pos * F.logsigmoid(-logits)) * F.logsigmoid(logits)
    if clip > 0:
        p_m = (torch.sigmoid(logits) - clip).clamp_min(0.0)       # shifted probability
        # 1 - p_m >= clip > 0, so the log is finite; the weight p_m^g is taken at a floor of
        # 1e-12 and zeroed below it (pow's gradient at exactly 0 is inf for g < 1)
        weight = torch.where(p_m > 0, p_m.clamp_min(1e-12) ** gamma_neg, torch.zeros_like(p_m))
        neg = -weight * torch.log1p(-p_m)
    else:
        neg = -torch.exp(gamma_neg * F.logsigmoid(logits)) * F.logsigmoid(-logits)
    return targets * pos + (1.0 - targets) * neg


class MultiLabelLoss:
    """`entries` (B, C) and the masked mean; built from a `config.LossConfig`."""

    def __init__(self, cfg):
        if cfg.name not in NAMES:
            raise ValueError(f"loss.name={cfg.name!r} is not valid; choose one of {list(NAMES)}")
        self.cfg = cfg

    def entries(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, C) float32 losses, 0 where mask == 0 (targets/mask (B, C) float in {0, 1})."""
        c = self.cfg
        x = logits.float()                  # autocast output (fp16/bf16) -> float32
        t = targets.float()
        if c.name == "bce":
            e = bce_entries(x, t)
        elif c.name == "focal":
            e = focal_entries(x, t, c.gamma, c.alpha)
        else:
            e = asl_entries(x, t, c.gamma_neg, c.gamma_pos, c.clip)
        return e * mask

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scalar: the mean over the non-ignored entries (0 when the batch has none)."""
        return self.entries(logits, targets, mask).sum() / mask.sum().clamp_min(1.0)


def build_loss(cfg) -> MultiLabelLoss:
    return MultiLabelLoss(cfg)
