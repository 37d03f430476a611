"""`data.transforms.eval_resize` written with plain tensor ops, so that an ONNX graph resizes
exactly (bit for bit) as training's evaluation and `predict` do.

onnxruntime's own antialiased `Resize` filters in float and rounds once; torch's uint8 kernel
(aten `_upsample_bilinear2d_aa`, Pillow-SIMD's fixed-point scheme) does not: per axis, the
triangle filter's weights (support = scale on a downscale, 1 on an upscale) are normalised in
float64, quantised to int16 with `precision` bits (the most that keep 2 * max weight < 2^15),
and each pass computes (sum(w_int * pixel) + 2^(precision-1)) >> precision, clamped to 0..255;
the horizontal pass runs first and its uint8 result feeds the vertical pass. Here each pass is
a float64 matrix product (every product and partial sum is an integer below 2^53, so the order
of summation cannot change it) with a (S, N) weight matrix computed in the graph from the
input's size, so one file serves any H and W. Checked against torch 2.14 (tests/test_export.py
compares it with eval_resize on real photos at many sizes, up and down).
"""
from __future__ import annotations

import torch

_MAX_PRECISION = 22          # the kernel's loop bound
_INT16_LIMIT = float(1 << 15)


def _weights(in_size: torch.Tensor, out_size: int, n: int) -> torch.Tensor:
    """(out_size, n) float64 int16-quantised weights of one axis (n = in_size, also as an int
    for the shapes), scaled by 2^precision; and the precision's power of two."""
    f64 = torch.float64
    scale = in_size.to(f64) / out_size                                      # () input / output
    support = torch.where(scale >= 1.0, scale, torch.ones_like(scale))      # bilinear: 2 * 0.5
    invscale = torch.where(scale >= 1.0, 1.0 / scale, torch.ones_like(scale))
    max_taps = torch.ceil(support) * 2 + 1
    center = scale * (torch.arange(out_size, dtype=f64) + 0.5)              # (S,)
    xmin = torch.clamp(torch.floor(center - support + 0.5), min=0.0)        # (S,)
    xmax = torch.minimum(torch.floor(center + support + 0.5), in_size.to(f64))
    xmax = torch.minimum(xmax, xmin + max_taps)                             # the kernel's clip
    pos = torch.arange(n, dtype=f64)                                        # (N,)
    inside = (pos[None, :] >= xmin[:, None]) & (pos[None, :] < xmax[:, None])        # (S, N)
    w = torch.clamp(1.0 - torch.abs((pos[None, :] - center[:, None] + 0.5) * invscale), min=0.0)
    w = torch.where(inside, w, torch.zeros_like(w))
    total = w.sum(dim=1, keepdim=True)
    w = torch.where(total != 0, w / torch.where(total != 0, total, torch.ones_like(total)), w)
    bits = torch.arange(_MAX_PRECISION, dtype=f64)                          # candidate precisions
    next_value = torch.floor(0.5 + w.max() * torch.pow(2.0, bits + 1))
    precision = (next_value < _INT16_LIMIT).to(f64).sum()                   # the loop's first break
    unit = torch.pow(2.0, precision)
    return torch.floor(w * unit + 0.5), unit


def _pass(x: torch.Tensor, weights: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """One axis (the last of x): float64 integer pixels -> float64 integer pixels 0..255."""
    acc = torch.matmul(x, weights.transpose(0, 1)) + unit / 2
    return torch.clamp(torch.floor(acc / unit), 0.0, 255.0)


def graph_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, S, S) holding eval_resize's uint8 values exactly."""
    h, w = images.shape[2], images.shape[3]
    x = images.to(torch.float64)
    # the size as a tensor (a symbolic int under torch.export stays a graph value)
    w_t = torch.ones(w, dtype=torch.int64).sum()
    h_t = torch.ones(h, dtype=torch.int64).sum()
    wx, ux = _weights(w_t, size, w)
    x = _pass(x, wx, ux)                                                    # (B, 3, H, S)
    wy, uy = _weights(h_t, size, h)
    x = _pass(x.transpose(2, 3), wy, uy).transpose(2, 3)                    # (B, 3, S, S)
    return x.to(torch.float32)
