"""ovfast.inputs.resample (Pillow's BICUBIC re-derived) against the installed Pillow, bit for bit."""
from __future__ import annotations

import random

import numpy as np
import PIL.Image
import pytest

from ovfast.inputs.resample import coefficients, horizontal_first, resize

EXTREMES = [
    (1, 1, 384, 384), (13, 2000, 384, 384), (2000, 13, 384, 384), (1, 500, 384, 384), (500, 1, 384, 384),
    (480, 640, 576, 768), (480, 640, 384, 384), (899, 1024, 1152, 1010), (3000, 4000, 1728, 2304),
    (4000, 3000, 384, 384), (7, 5, 2304, 100), (384, 384, 384, 1000),
]


def _pillow(img, out_h, out_w):
    return np.asarray(PIL.Image.fromarray(img).resize((out_w, out_h), PIL.Image.Resampling.BICUBIC))


@pytest.mark.parametrize("size", EXTREMES, ids=[f"{a}x{b}-{c}x{d}" for a, b, c, d in EXTREMES])
def test_extreme_sizes(size):
    h, w, oh, ow = size
    img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    assert np.array_equal(resize(img, oh, ow), _pillow(img, oh, ow))


def test_random_sizes_both_pass_orders():
    rng = np.random.default_rng(1)
    r = random.Random(1)
    orders = set()
    for _ in range(60):
        h, w, oh, ow = (r.randint(1, 500) for _ in range(4))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        assert np.array_equal(resize(img, oh, ow), _pillow(img, oh, ow)), (h, w, oh, ow)
        orders.add(horizontal_first(h, w, oh, ow))
    assert orders == {True, False} or PIL.__version__ < "13"


def test_grey_and_smooth_images():
    y, x = np.mgrid[0:300, 0:200]
    smooth = np.stack([x * 255 // 199, y * 255 // 299, (x + y) % 256], -1).astype(np.uint8)
    for oh, ow in [(384, 384), (900, 500), (20, 700)]:
        assert np.array_equal(resize(smooth, oh, ow), _pillow(smooth, oh, ow))
    grey = smooth[..., 0].copy()
    assert np.array_equal(resize(grey, 77, 333), _pillow(grey, 77, 333))


def test_coefficient_tables():
    xmin, count, weights = coefficients(640, 384)
    assert weights.dtype == np.int32 and xmin.shape == count.shape == (384,)
    sums = weights.astype(np.int64).sum(axis=1)
    assert np.all(np.abs(sums - (1 << 22)) <= count)  # each row sums to 1.0 up to rounding
    assert np.all(weights[np.arange(weights.shape[1])[None, :] >= count[:, None]] == 0)
    assert xmin[0] == 0 and xmin[-1] + count[-1] == 640
