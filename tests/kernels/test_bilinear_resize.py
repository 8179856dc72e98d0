"""ovfast.kernels.bilinear_resize against ovfast.ops.bilinear_resize.reference (F.interpolate, bilinear)."""
from __future__ import annotations

import pytest
import torch
from vision_checks import DEVICE, DTYPE_IDS, FLOAT_TOLERANCES, assert_close_to_reference

from ovfast import ops
from ovfast.kernels import bilinear_resize

# (B, H, W, C, out_h, out_w): the video pooling 27x27 -> 14x14 for 3, 14 and 37 frames; the
# anyres_max_9 downscale of a 1080x1920 image's unpadded map (75x135 -> 60x108); upsampling,
# a 1x1 source and channel counts off the block multiples.
SHAPES = [
    (3, 27, 27, 48, 14, 14),
    (14, 27, 27, 72, 14, 14),
    (37, 27, 27, 40, 14, 14),
    (1, 75, 135, 72, 60, 108),
    (2, 5, 7, 3, 9, 4),
    (1, 1, 1, 5, 3, 2),
    (1, 27, 27, 1152, 14, 14),
]
SHAPE_IDS = ["{}x{}x{}x{}-to-{}x{}".format(*s) for s in SHAPES]


@pytest.mark.parametrize("dtype,atol,rtol", FLOAT_TOLERANCES, ids=DTYPE_IDS)
@pytest.mark.parametrize("b,h,w,c,out_h,out_w", SHAPES, ids=SHAPE_IDS)
def test_matches_reference(b, h, w, c, out_h, out_w, dtype, atol, rtol):
    x = torch.randn(b, h, w, c, generator=torch.Generator().manual_seed(b * h + c)).to(DEVICE, dtype)
    out = bilinear_resize(x, out_h, out_w)
    ref = ops.bilinear_resize.reference(x, out_h, out_w)
    assert out.shape == (b, out_h, out_w, c) and out.dtype == dtype
    # The reference computes in fp32 and rounds once, so it is its own fp32 reference.
    assert_close_to_reference(out, ref, ops.bilinear_resize.reference(x.float(), out_h, out_w), atol, rtol)


def test_strided_view_of_a_feature_grid():
    """pack_anyres hands over a crop of the tile grid's map: a view with row and column offsets."""
    fmap = torch.randn(81, 108, 40, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    view = fmap[3:78, 0:100][None]  # (1, 75, 100, 40), not contiguous
    torch.testing.assert_close(bilinear_resize(view, 60, 80), ops.bilinear_resize.reference(view, 60, 80),
                               atol=1e-5, rtol=1e-5)


def test_video_pooling_is_not_a_2x2_mean():
    """27 -> 14 bilinear weights drift across the grid (docs/reference-behaviour.md section 7): a mean is wrong."""
    x = torch.randn(1, 27, 27, 8, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    out = bilinear_resize(x, 14, 14)
    mean = torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), 2, ceil_mode=True).permute(0, 2, 3, 1)
    assert not torch.allclose(out, mean, atol=1e-2)
    # Output row 3 reads source rows 6 and 7 with weights 0.75 / 0.25 (column 0: 0.536 / 0.464).
    wx = 1 - ((0 + 0.5) * 27 / 14 - 0.5)
    row = 0.75 * x[0, 6] + 0.25 * x[0, 7]
    torch.testing.assert_close(out[0, 3, 0], wx * row[0] + (1 - wx) * row[1], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("c", [896, 3584])
@pytest.mark.parametrize("dtype,atol,rtol", FLOAT_TOLERANCES, ids=DTYPE_IDS)
def test_real_size_on_gpu(c, dtype, atol, rtol):
    """32 video frames of projected features, and a 1080x1920 image's downscale, at decoder width."""
    gen = torch.Generator().manual_seed(c)
    for shape, size in (((32, 27, 27, c), (14, 14)), ((1, 75, 135, c), (60, 108))):
        x = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
        ref = ops.bilinear_resize.reference(x, *size)
        assert_close_to_reference(bilinear_resize(x, *size), ref, ops.bilinear_resize.reference(x.float(), *size),
                                  atol, rtol)
