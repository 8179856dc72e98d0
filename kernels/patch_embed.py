"""SigLIP patch embedding: normalise, gather patches, GEMM, bias and positions in one kernel.

Math (the contract, ``ovfast.ops.patch_embed.reference``)::

    out = conv2d(pixels * scale + shift, weight, bias, stride=p).flatten(2).transpose(1, 2) + pos_embed

pixels (N, C, H, W) uint8 or float, any strides (a permuted view of HWC tiles reads as well as
CHW); weight (D, C, p, p); bias (D,); pos_embed (P, D) with P = (H // p) * (W // p); optional
per-channel fp32 scale and shift (C,) fold the x/255, (x - mean)/std normalisation in. Returns
(N, P, D) in the weight's dtype; pixels past the last whole patch are never read.

As a GEMM: M = N * P patch rows, K = C * p * p, in the weight's (c, ky, kx) order. Each program
gathers its [BLOCK_M, BLOCK_K] slice of patches straight from the pixels (no im2col tensor;
uint8 stays one byte per pixel until it is in registers), applies the affine in fp32, rounds to
the weight dtype as the reference's ``.to(weight.dtype)`` does, and accumulates in fp32. The
epilogue adds the bias, rounds to the weight dtype (the conv's output), adds the position row in
fp32 and rounds again, matching the reference's two roundings.

Tolerance against the reference: fp32 ~1e-5 relative (fp32 dots run with input_precision="ieee",
not TF32); fp16 / bf16 within the usual accumulation-order noise (~1e-2 relative).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ovfast import ops

from . import _runtime
from ._runtime import FLOAT_DTYPES, check_tensor, dot_acc, grouped_pid, max_offset, round_to


@triton.jit
def _patch_embed_kernel(
    px_ptr, w_ptr, b_ptr, pos_ptr, scale_ptr, shift_ptr, out_ptr,
    M, D, K, P, GRID_W, M_BUCKET,  # M_BUCKET: the autotuning key only (_runtime.m_bucket)
    stride_px_n, stride_px_c, stride_px_h, stride_px_w,
    stride_w_d, stride_w_k,
    stride_pos_p, stride_pos_d,
    stride_out_m, stride_out_d,
    PATCH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    IEEE: tl.constexpr, BF16_FIX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M row blocks sweep all column blocks together, so a group's
    # patches are gathered from L2 rather than HBM for every column block.
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, D, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # patch rows (image, patch)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output features
    m_ok = offs_m < M
    n_ok = offs_n < D
    image = offs_m // P
    patch = offs_m % P
    # Top-left pixel of each patch: the row part of every gathered address.
    row_off = image * stride_px_n + (patch // GRID_W) * PATCH * stride_px_h + (patch % GRID_W) * PATCH * stride_px_w

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        # k = (c, ky, kx) in the weight's layout; PATCH is constexpr, so these divide by constants.
        chan = offs_k // (PATCH * PATCH)
        ky = (offs_k // PATCH) % PATCH
        kx = offs_k % PATCH
        col_off = chan * stride_px_c + ky * stride_px_h + kx * stride_px_w
        a = tl.load(px_ptr + row_off[:, None] + col_off[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        a = a.to(tl.float32)  # exact for uint8, fp16 and bf16 pixels
        if HAS_SCALE:
            a = a * tl.load(scale_ptr + chan, mask=k_ok, other=0.0)[None, :]
        if HAS_SHIFT:
            # Columns past K hold the shift, but their weights load as 0.
            a = a + tl.load(shift_ptr + chan, mask=k_ok, other=0.0)[None, :]
        a = round_to(a, w_ptr.dtype.element_ty, BF16_FIX)
        b = tl.load(w_ptr + offs_n[None, :] * stride_w_d + offs_k[:, None] * stride_w_k,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N) of weight.T
        acc = dot_acc(a, b, acc, IEEE, BF16_FIX)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ty = out_ptr.dtype.element_ty
    pos = tl.load(pos_ptr + patch[:, None] * stride_pos_p + offs_n[None, :] * stride_pos_d,
                  mask=m_ok[:, None] & n_ok[None, :], other=0.0)
    y = round_to(acc, out_ty, BF16_FIX).to(tl.float32) + pos.to(tl.float32)
    y = round_to(y, out_ty, BF16_FIX)
    tl.store(out_ptr + offs_m[:, None] * stride_out_m + offs_n[None, :] * stride_out_d, y,
             mask=m_ok[:, None] & n_ok[None, :])


_launch = _runtime.tunable(_patch_embed_kernel, _runtime.GEMM_CONFIGS, key=["M_BUCKET", "D", "K"])


def patch_embed(
    pixels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos_embed: torch.Tensor,
    scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton twin of ``ovfast.ops.patch_embed`` (same arguments): (N, C, H, W) -> (N, P, D)."""
    check_tensor("weight", weight, ndim=4, dtypes=FLOAT_DTYPES)
    dev = weight.device
    check_tensor("pixels", pixels, ndim=4, dtypes=FLOAT_DTYPES + (torch.uint8,), device=dev)
    check_tensor("pos_embed", pos_embed, ndim=2, device=dev)
    d, c, p, p2 = weight.shape
    n, pc, h, w = pixels.shape
    if p != p2 or pc != c:
        raise ValueError(f"weight {tuple(weight.shape)} needs square patches over the pixels' {pc} channels")
    num_patches = (h // p) * (w // p)
    if pos_embed.shape != (num_patches, d):
        raise ValueError(f"pos_embed has shape {tuple(pos_embed.shape)}, expected ({num_patches}, {d}) "
                         f"for {h}x{w} pixels and {p}px patches")
    for name, v in (("scale", scale), ("shift", shift)):
        if v is not None:
            check_tensor(name, v, ndim=1, device=dev)
            if v.numel() != c:
                raise ValueError(f"{name} must have one value per channel ({c}), got {v.numel()}")
    if (bias is not None and bias.dtype != weight.dtype) or pos_embed.dtype != weight.dtype:
        # Mixed parameter dtypes follow torch's type promotion, which the kernel's fixed output
        # dtype does not model; the model never builds them.
        return ops.patch_embed.reference(pixels, weight, bias, pos_embed, scale, shift)
    if max_offset(pixels) >= 2**31:
        raise ValueError("pixels span more than 2**31 elements: embed them in smaller batches")

    m, k = n * num_patches, c * p * p
    out = torch.empty((n, num_patches, d), dtype=weight.dtype, device=dev)
    if m == 0:
        return out
    w2 = weight.reshape(d, k)  # a view for the (contiguous) parameter
    scale32 = scale.float().contiguous() if scale is not None else None
    shift32 = shift.float().contiguous() if shift is not None else None
    meta = _runtime.GEMM_INTERPRET_CONFIG if _runtime.INTERPRET else {}

    def grid(meta_):
        return (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(d, meta_["BLOCK_N"]),)

    _launch[grid](
        pixels, w2, bias, pos_embed, scale32, shift32, out,
        m, d, k, num_patches, w // p, _runtime.m_bucket(m),
        *pixels.stride(),
        *w2.stride(),
        *pos_embed.stride(),
        d, 1,
        PATCH=p, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        IEEE=weight.dtype == torch.float32, BF16_FIX=_runtime.BF16_FIX, **meta,
    )
    return out
