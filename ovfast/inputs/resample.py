"""Pillow's BICUBIC resize, re-derived: coefficient tables and a NumPy twin, bit-identical to Pillow.

Pillow resizes 8-bit images in two separable passes, each a fixed-point convolution. Up to
Pillow 12 the horizontal pass always ran first (over only the rows the vertical pass reads);
Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many pixels
as the width does. The order changes the result (the intermediate is rounded to uint8), so
``horizontal_first`` follows the installed Pillow, which is what transformers' PIL processor uses.
Per pass:

* for output index i of a pass from ``n_in`` to ``n_out`` samples, scale = n_in / n_out, the
  filter is stretched by max(scale, 1) (so shrinking averages), its support is 2 * that, and the
  taps are the input samples [xmin, xmin + count) around center = (i + 0.5) * scale;
* tap weights are the bicubic kernel (a = -0.5) at (x - center + 0.5) / max(scale, 1), normalised
  to sum 1 (summed left to right, in double), then turned into integers with 22 fractional bits,
  rounding half away from zero;
* each output sample is (2^21 + sum(pixel * weight)) >> 22, clamped to [0, 255]; the horizontal
  pass's output is stored as uint8 before the vertical pass reads it.

The tables feed the native and GPU resizers (csrc/, kernels/); ``resize`` is their test oracle
next to Pillow itself.
"""
from __future__ import annotations

import math

import numpy as np
import PIL

PILLOW_MAJOR = int(PIL.__version__.split(".")[0])

PRECISION_BITS = 22  # 32 - 8 (pixel) - 2 (headroom for negative lobes and sums above 1)
_SUPPORT = 2.0  # bicubic


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel with a = -0.5, in double precision and the same operation order."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's tables for one pass: (xmin, count) int32 of shape (out,), weights int32 (out, ksize).

    Output sample i reads input samples xmin[i] .. xmin[i] + count[i] - 1 with weights[i, :count[i]];
    the weights past count are 0.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # C casts truncate toward zero; the clamps make the sign irrelevant for xmin.
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    count = xmax - xmin
    taps = np.arange(ksize, dtype=np.int64)[None, :]
    w = _bicubic((taps + xmin[:, None] - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(taps < count[:, None], w, 0.0)
    total = np.zeros(out_size, dtype=np.float64)
    for k in range(ksize):  # left-to-right, as C sums: a pairwise sum could differ in the last bit
        total += w[:, k]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    scaled = w * float(1 << PRECISION_BITS)
    fixed = np.trunc(np.where(w < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)
    return xmin.astype(np.int32), count.astype(np.int32), fixed


def _pass(src: np.ndarray, xmin: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """One fixed-point convolution pass of uint8 ``src`` along ``axis`` (0 = rows, 1 = columns)."""
    ksize = weights.shape[1]
    n = src.shape[axis]
    idx = np.minimum(xmin[:, None] + np.arange(ksize)[None, :], n - 1)  # past-count taps weigh 0
    acc = np.full((len(xmin),) + tuple(np.delete(src.shape, axis)), 1 << (PRECISION_BITS - 1), dtype=np.int64)
    moved = np.moveaxis(src, axis, 0)
    extra = (None,) * (src.ndim - 1)
    for k in range(ksize):
        acc += moved[idx[:, k]].astype(np.int64) * weights[:, k][(slice(None),) + extra]
    out = np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def horizontal_first(in_h: int, in_w: int, out_h: int, out_w: int, pillow_major: int = PILLOW_MAJOR) -> bool:
    """Whether Pillow runs the horizontal pass before the vertical one for this resize."""
    if pillow_major < 13:
        return True
    shrink_h, shrink_w = in_h - out_h, in_w - out_w
    return not (shrink_h > 0 and shrink_h > shrink_w * 2)


def resize(img: np.ndarray, out_h: int, out_w: int, pillow_major: int = PILLOW_MAJOR) -> np.ndarray:
    """Bicubic resize of an (H, W) or (H, W, C) uint8 array, bit-identical to Pillow's Image.resize."""
    h, w = img.shape[:2]
    if (out_h, out_w) == (h, w):
        return img.copy()
    y_min, y_count, y_weights = coefficients(h, out_h)
    x_min, _, x_weights = coefficients(w, out_w)
    if not horizontal_first(h, w, out_h, out_w, pillow_major):
        return _pass(_pass(img, y_min, y_weights, axis=0), x_min, x_weights, axis=1)
    if out_w != w:
        # Only the rows the vertical pass reads are resampled horizontally.
        first, last = int(y_min[0]), int(y_min[-1] + y_count[-1])
        img = _pass(img[first:last], x_min, x_weights, axis=1)
        y_min = y_min - first
    if out_h != h:
        img = _pass(img, y_min, y_weights, axis=0)
    return img
