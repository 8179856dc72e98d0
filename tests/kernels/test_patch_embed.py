"""ovfast.kernels.patch_embed against ovfast.ops.patch_embed.reference (conv2d + bias + positions)."""
from __future__ import annotations

import pytest
import torch
from vision_checks import DEVICE, DTYPE_IDS, FLOAT_TOLERANCES, assert_close_to_reference

from ovfast import ops
from ovfast.kernels import patch_embed

# (tiles, height, width, D, patch): crop counts and widths that are no multiple of the blocks
# (64 under the interpreter, 64..256 on a GPU); spare pixel rows / columns past the last whole
# patch, as 384 = 27 * 14 + 6 has; one real 384 px tile with SigLIP's 14 px patches.
SHAPES = [
    (3, 44, 30, 72, 14),
    (14, 30, 31, 48, 14),
    (27, 16, 28, 40, 14),
    (37, 14, 14, 48, 14),
    (2, 24, 20, 1152, 14),
    (1, 384, 384, 36, 14),
    (5, 21, 17, 24, 8),
]
SHAPE_IDS = [f"{n}x{h}x{w}-D{d}-p{p}" for n, h, w, d, p in SHAPES]


def _params(n, h, w, d, p, dtype, gen):
    weight = (torch.randn(d, 3, p, p, generator=gen) / (3 * p * p) ** 0.5).to(DEVICE, dtype)
    bias = torch.randn(d, generator=gen).to(DEVICE, dtype)
    pos = torch.randn((h // p) * (w // p), d, generator=gen).to(DEVICE, dtype)
    return weight, bias, pos


def _check(pixels, weight, bias, pos, scale, shift, atol, rtol):
    out = patch_embed(pixels, weight, bias, pos, scale, shift)
    ref = ops.patch_embed.reference(pixels, weight, bias, pos, scale, shift)
    ref32 = ops.patch_embed.reference(pixels, weight.float(), None if bias is None else bias.float(), pos.float(),
                                      scale, shift)
    assert out.shape == (pixels.shape[0], pos.shape[0], weight.shape[0])
    assert_close_to_reference(out, ref, ref32, atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", FLOAT_TOLERANCES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,h,w,d,p", SHAPES, ids=SHAPE_IDS)
def test_uint8_hwc_tiles_with_normalisation(n, h, w, d, p, dtype, atol, rtol):
    """The engine's GPU input: uint8 HWC tiles read through a permuted view, normalised on the fly."""
    gen = torch.Generator().manual_seed(n * h + d)
    tiles = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=gen).to(DEVICE)
    scale = torch.tensor([1 / 127.5, 1 / 100.0, 1 / 60.0], device=DEVICE)
    shift = torch.tensor([-1.0, -0.25, 0.5], device=DEVICE)
    _check(tiles.permute(0, 3, 1, 2), *_params(n, h, w, d, p, dtype, gen), scale, shift, atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", FLOAT_TOLERANCES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n,h,w,d,p", SHAPES[:4], ids=SHAPE_IDS[:4])
def test_normalised_float_pixels(n, h, w, d, p, dtype, atol, rtol):
    """The CPU-normalised input: float CHW pixels in the weight's dtype, no affine."""
    gen = torch.Generator().manual_seed(n + w)
    pixels = torch.randn(n, 3, h, w, generator=gen).to(DEVICE, dtype)
    _check(pixels, *_params(n, h, w, d, p, dtype, gen), None, None, atol, rtol)


def test_fp32_pixels_shift_only_no_bias():
    gen = torch.Generator().manual_seed(7)
    pixels = torch.rand(4, 3, 30, 45, generator=gen).to(DEVICE)[:, :, :, 2:]  # strided columns
    weight, _, pos = _params(4, 30, 43, 40, 14, torch.float32, gen)
    shift = torch.tensor([0.5, -0.5, 0.0], device=DEVICE)
    _check(pixels, weight, None, pos, None, shift, 1e-5, 1e-5)


def test_raw_uint8_without_affine():
    """uint8 without scale/shift embeds the byte values themselves, as conv2d on x.to(dtype) does."""
    gen = torch.Generator().manual_seed(8)
    pixels = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8, generator=gen).to(DEVICE)
    weight, bias, pos = _params(2, 28, 28, 24, 14, torch.bfloat16, gen)
    _check(pixels, weight, bias, pos, None, None, 2e-2, 2e-2)


def test_rejects_mismatched_positions():
    weight = torch.zeros(8, 3, 14, 14, device=DEVICE)
    with pytest.raises(ValueError, match="pos_embed"):
        patch_embed(torch.zeros(1, 3, 28, 28, device=DEVICE), weight, None, torch.zeros(5, 8, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [10, 37])
@pytest.mark.parametrize("dtype,atol,rtol", FLOAT_TOLERANCES[1:], ids=DTYPE_IDS[1:])
def test_real_size_on_gpu(tiles, dtype, atol, rtol):
    """37 anyres crops (the most one image makes) of 384 px through SigLIP's real patch embedding."""
    gen = torch.Generator().manual_seed(tiles)
    pixels = torch.randint(0, 256, (tiles, 384, 384, 3), dtype=torch.uint8, generator=gen).to(DEVICE)
    scale = torch.full((3,), 1 / 127.5, device=DEVICE)
    shift = torch.full((3,), -1.0, device=DEVICE)
    _check(pixels.permute(0, 3, 1, 2), *_params(tiles, 384, 384, 1152, 14, dtype, gen), scale, shift, atol, rtol)
