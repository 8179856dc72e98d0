"""Qwen2 RMSNorm, optionally fused with the residual add (docs/reference-behaviour.md section 8).

Math, per row of width N (any N up to 65536):

    s      = x + residual                      # in x's dtype, rounded like torch (if residual)
    h      = float32(s)
    normed = weight * dtype(h * rsqrt(mean(h^2) + eps))

cast back to x's dtype *before* the weight multiply, as transformers does; the product is
rounded once to the result dtype (promote(weight, x), x's dtype for Qwen2).

Shapes: x (..., N), weight (N,), residual like x -> normed like x; with ``residual`` it returns
(normed, s) from one pass over the data (read x, residual; write normed, s).

Tolerance against ``ovfast.ops.rms_norm.reference``: s is bit-exact (fp32 add then one rounding,
exactly torch's); normed differs only through the fp32 sum order and ``rsqrt``'s last bit, so
fp32 within 1e-5 relative and bf16/fp16 within one ulp of the dtype (almost always equal).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import INTERPRET, check_device, check_float, round_to

MAX_WIDTH = 65536  # one row lives in registers: 64k fp32 over 16 warps is 128 per thread


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr,
    n_rows, n_cols, eps,
    stride_x_row, stride_res_row, stride_out_row, stride_sum_row,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
):
    # Each program normalises BLOCK_M whole rows held in registers: (BLOCK_M, BLOCK_N) tile.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    rows64 = rows.to(tl.int64)[:, None]  # row offsets can pass 2^31 elements (long prompts x 8192)
    x = tl.load(x_ptr + rows64 * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows64 * stride_res_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # torch adds in fp32 and rounds once to x's dtype; so do we, and normalise the rounded sum.
        s = round_to(x + r, sum_ptr.dtype.element_ty, INTERPRET)
        tl.store(sum_ptr + rows64 * stride_sum_row + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    ms = tl.sum(x * x, axis=1) / n_cols  # (BLOCK_M,) mean of squares in fp32
    rstd = tl.rsqrt(ms + eps)
    y = round_to(x * rstd[:, None], sum_ptr.dtype.element_ty, INTERPRET).to(tl.float32)  # back to x's dtype
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    out = round_to(w[None, :] * y, out_ptr.dtype.element_ty, INTERPRET)
    tl.store(out_ptr + rows64 * stride_out_row + cols[None, :], out, mask=mask)


def _config(n_cols: int, n_rows: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): whole rows per program, about 4k-8k elements per program."""
    block_n = triton.next_power_of_2(n_cols)
    if INTERPRET:  # the interpreter runs programs one by one: give each many rows
        return max(1, min(64, 4096 // block_n)), block_n, 1
    # Narrow rows (896 -> 1024) batch 4 rows per program so a program still moves ~16 KB.
    block_m = max(1, min(4096 // block_n, triton.next_power_of_2(max(1, n_rows))))
    num_warps = min(16, max(4, block_m * block_n // 512))  # ~16 fp32 per thread
    return block_m, block_n, num_warps


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``ovfast.ops.rms_norm``: normed, or (normed, x + residual) with ``residual``."""
    check_float("x", x)
    check_float("weight", weight)
    check_device(x.device, weight=weight, **({"residual": residual} if residual is not None else {}))
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({n},) for x of shape {tuple(x.shape)}")
    if n > MAX_WIDTH:
        raise ValueError(f"rms_norm rows of width {n} exceed the kernel's {MAX_WIDTH}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}")
    if weight.stride(0) != 1:
        weight = weight.contiguous()
    x2 = x.reshape(-1, n)  # a view for the usual (T, N) rows; a copy only for exotic layouts
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    out2 = out.view(-1, n)
    if residual is not None:
        r2 = residual.reshape(-1, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        s2 = s.view(-1, n)
    else:  # not accessed (HAS_RESIDUAL=False); s2 only tells the kernel x's dtype
        r2, s2 = x2, x2
    if rows == 0:
        return (out, s) if residual is not None else out
    block_m, block_n, num_warps = _config(n, rows)
    _rms_norm_kernel[(triton.cdiv(rows, block_m),)](
        x2, r2, weight, out2, s2,
        rows, n, float(eps),
        x2.stride(0), r2.stride(0), out2.stride(0), s2.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n, INTERPRET=INTERPRET,
        num_warps=num_warps,
    )
    return (out, s) if residual is not None else out
