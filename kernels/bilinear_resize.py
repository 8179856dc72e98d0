"""Bilinear resize of channels-last feature maps (align_corners=False, no antialias).

Math (the contract, ``ovfast.ops.bilinear_resize.reference``)::

    out = F.interpolate(x.permute(0, 3, 1, 2), size=(out_h, out_w), mode="bilinear",
                        align_corners=False).permute(0, 2, 3, 1)

x (B, H, W, C), any strides -> (B, out_h, out_w, C) in x's dtype, computed in fp32 with torch's
formulas: per axis, scale = in / out (fp32), src = max(scale * (i + 0.5) - 0.5, 0), taps
floor(src) and floor(src) + 1 (clamped to the edge) with weights 1 - frac(src) and frac(src);
value = wy0 * (wx0 * x00 + wx1 * x01) + wy1 * (wx0 * x10 + wx1 * x11), rounded once to x's dtype.
It serves the video 2x2 pooling (27x27 -> 14x14 per frame, which is *not* a 2x2 mean, see
docs/reference-behaviour.md section 7) and the anyres_max_9 downscale of an unpadded feature map.

Memory-bound: each program writes a [BLOCK_P pixels, BLOCK_C channels] block; channels are
contiguous in memory, so the four tap loads and the store are coalesced along C, and the taps
neighbouring programs share come from L2. Tolerance: fp32 within a few ulp of torch (FMA
contraction may differ); fp16 / bf16 within one ulp of the reference's rounding.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from . import _runtime
from ._runtime import FLOAT_DTYPES, check_tensor, max_offset, round_to


@triton.jit
def _source_taps(i, scale, size):
    """torch's align_corners=False source index: the two taps and their weights for outputs ``i``."""
    src = tl.maximum(scale * (i.to(tl.float32) + 0.5) - 0.5, 0.0)
    i0 = src.to(tl.int32)  # truncation is floor: src >= 0
    i1 = i0 + (i0 < size - 1).to(tl.int32)
    w1 = src - i0.to(tl.float32)
    return i0, i1, 1.0 - w1, w1


@triton.jit
def _bilinear_resize_kernel(
    x_ptr, out_ptr,
    H, W, C, OUT_H, OUT_W, NUM_PIX,
    scale_h, scale_w,
    stride_x_b, stride_x_h, stride_x_w, stride_x_c,
    stride_out_b, stride_out_h, stride_out_w, stride_out_c,
    BF16_FIX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # flat (b, oy, ox) output pixels
    chan = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (pix < NUM_PIX)[:, None] & (chan < C)[None, :]
    b = pix // (OUT_H * OUT_W)
    oy = (pix // OUT_W) % OUT_H
    ox = pix % OUT_W
    y0, y1, wy0, wy1 = _source_taps(oy, scale_h, H)
    x0, x1, wx0, wx1 = _source_taps(ox, scale_w, W)

    base = x_ptr + (b * stride_x_b)[:, None] + (chan * stride_x_c)[None, :]
    v00 = tl.load(base + (y0 * stride_x_h + x0 * stride_x_w)[:, None], mask=mask, other=0.0).to(tl.float32)
    v01 = tl.load(base + (y0 * stride_x_h + x1 * stride_x_w)[:, None], mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(base + (y1 * stride_x_h + x0 * stride_x_w)[:, None], mask=mask, other=0.0).to(tl.float32)
    v11 = tl.load(base + (y1 * stride_x_h + x1 * stride_x_w)[:, None], mask=mask, other=0.0).to(tl.float32)
    wx0 = wx0[:, None]
    wx1 = wx1[:, None]
    val = wy0[:, None] * (wx0 * v00 + wx1 * v01) + wy1[:, None] * (wx0 * v10 + wx1 * v11)

    out = out_ptr + (b * stride_out_b + oy * stride_out_h + ox * stride_out_w)[:, None] + (chan * stride_out_c)[None, :]
    tl.store(out, round_to(val, out_ptr.dtype.element_ty, BF16_FIX), mask=mask)


def _blocks(c: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): on a GPU ~4096 elements per program (16 per thread at 4 warps) with
    up to 256 contiguous channels, i.e. 512-byte bf16 row segments; under the interpreter
    bigger blocks, as fewer programs run faster there."""
    block_c = min(triton.next_power_of_2(c), 128 if _runtime.INTERPRET else 256)
    return max(1, (8192 if _runtime.INTERPRET else 4096) // block_c), block_c


def bilinear_resize(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Triton twin of ``ovfast.ops.bilinear_resize`` (same arguments): (B, H, W, C) -> (B, out_h, out_w, C)."""
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"output size must be positive, got {out_h}x{out_w}")
    if max_offset(x) >= 2**31:
        raise ValueError("x spans more than 2**31 elements: resize it in smaller batches")
    bsz, h, w, c = x.shape
    out = torch.empty((bsz, out_h, out_w, c), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    # torch computes scale = (float)in / out in fp32; np.float32 division rounds the same way.
    scale_h = float(np.float32(h) / np.float32(out_h))
    scale_w = float(np.float32(w) / np.float32(out_w))
    block_p, block_c = _blocks(c)
    num_pix = bsz * out_h * out_w
    grid = (triton.cdiv(num_pix, block_p), triton.cdiv(c, block_c))
    _bilinear_resize_kernel[grid](
        x, out, h, w, c, out_h, out_w, num_pix, scale_h, scale_w, *x.stride(), *out.stride(),
        BF16_FIX=_runtime.BF16_FIX, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4,
    )
    return out
