"""SwiGLU on a fused gate/up projection: out = silu(gate_up[..., :I]) * gate_up[..., I:].

Math, elementwise with g = gate, u = up read as fp32:

    a   = dtype(g / (1 + exp(-g)))      # F.silu: computed in fp32, rounded to the dtype
    out = dtype(a * u)                  # the product, rounded once

the two roundings torch makes for ``F.silu(gate) * up`` in a 16-bit dtype.

Shapes: gate_up (..., 2I) with unit stride along the last axis (rows may be strided)
-> out (..., I), contiguous, in gate_up's dtype.

Tolerance against ``ovfast.ops.silu_mul.reference``: one ulp of the dtype (bf16 2^-8, fp16 2^-11
relative), from ``exp``'s last bit moving a rounding; nearly all elements are bit-equal (the tests
check both); fp32 within 1e-5 relative.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import INTERPRET, check_device, check_float, round_to


@triton.jit
def _silu_mul_kernel(
    x_ptr, out_ptr,
    n_rows, n_cols,
    stride_x_row, stride_out_row,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x_off = rows64 * stride_x_row + cols[None, :]
    g = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + x_off + n_cols, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    a = round_to(g / (1.0 + tl.exp(-g)), dt, INTERPRET).to(tl.float32)
    tl.store(out_ptr + rows64 * stride_out_row + cols[None, :], round_to(a * u, dt, INTERPRET), mask=mask)


def _config(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): 1024-wide column tiles (16 KB read per program at bf16 x 4 rows)."""
    block_n = min(1024, triton.next_power_of_2(n_cols))
    if INTERPRET:  # serial programs: fewer, bigger tiles
        return max(1, min(64, 8192 // block_n)), block_n, 1
    block_m = max(1, min(4, 4096 // block_n, triton.next_power_of_2(max(1, n_rows))))
    return block_m, block_n, 4


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton twin of ``ovfast.ops.silu_mul``: (..., 2I) -> (..., I)."""
    check_float("gate_up", gate_up)
    check_device(gate_up.device)
    two_i = gate_up.shape[-1]
    if two_i % 2:
        raise ValueError(f"gate_up's last axis ({two_i}) must be even: gate and up halves")
    n = two_i // 2
    x = gate_up.reshape(-1, two_i)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((*gate_up.shape[:-1], n), dtype=gate_up.dtype, device=gate_up.device)
    rows = x.shape[0]
    if rows == 0 or n == 0:
        return out
    block_m, block_n, num_warps = _config(rows, n)
    out2 = out.view(-1, n)
    _silu_mul_kernel[(triton.cdiv(rows, block_m), triton.cdiv(n, block_n))](
        x, out2, rows, n, x.stride(0), out2.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, INTERPRET=INTERPRET, num_warps=num_warps,
    )
    return out
