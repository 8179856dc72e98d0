"""Half-split (NeoX) rotary position embedding, in place on q and k (docs/reference-behaviour.md section 8).

Math, for each token t at position p = positions[t] and each head, with h = d/2:

    c, s   = dtype(cos_sin_cache[p, :h]), dtype(cos_sin_cache[p, h:])   # fp32 angles, cast
    x'[:h] = x[:h] * c - x[h:] * s
    x'[h:] = x[h:] * c + x[:h] * s

with every product and sum rounded to the activation dtype, the order transformers computes
``x*cos + rotate_half(x)*sin`` in (the rotation is the same for each half of the head).

Shapes: q (T, Hq, d) and k (T, Hkv, d), any strides (the model passes views of the fused qkv
projection whose row stride is (Hq + 2 Hkv) d): updated in place through those strides;
positions (T,) integer; cos_sin_cache (max_pos, d) fp32. Positions must be < max_pos (not checked:
that would need a device sync).

Tolerance against ``ovfast.ops.rope.reference``: bf16/fp16 results are bit-exact (same roundings
in the same order); fp32 may differ in the last bit where the GPU fuses a multiply-add.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import INTERPRET, check_device, check_float, round_to


@triton.jit
def _rotate_heads(
    x_ptr, tok, tok_mask, cos, sin, n_heads, half,
    stride_x_t, stride_x_h, stride_x_d,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Rotate (BLOCK_T, BLOCK_H, BLOCK_HALF) pairs of one tensor in place; cos/sin (BLOCK_T, 1, BLOCK_HALF)."""
    dt = x_ptr.dtype.element_ty
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    off = tok.to(tl.int64)[:, None, None] * stride_x_t + h[None, :, None] * stride_x_h + j[None, None, :] * stride_x_d
    mask = tok_mask[:, None, None] & (h < n_heads)[None, :, None] & (j < half)[None, None, :]
    x1 = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + off + half * stride_x_d, mask=mask, other=0.0).to(tl.float32)
    # Round after each operation, as torch does for every elementwise op in a 16-bit dtype.
    lo = round_to(round_to(x1 * cos, dt, INTERPRET).to(tl.float32) + round_to(-x2 * sin, dt, INTERPRET).to(tl.float32),
                  dt, INTERPRET)
    hi = round_to(round_to(x2 * cos, dt, INTERPRET).to(tl.float32) + round_to(x1 * sin, dt, INTERPRET).to(tl.float32),
                  dt, INTERPRET)
    tl.store(x_ptr + off, lo, mask=mask)
    tl.store(x_ptr + off + half * stride_x_d, hi, mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, pos_ptr, cs_ptr,
    n_tokens, n_heads_q, n_heads_k, half,
    stride_q_t, stride_q_h, stride_q_d, stride_k_t, stride_k_h, stride_k_d, stride_pos, stride_cs_pos,
    BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # One program: BLOCK_T tokens, all their q and k heads; cos/sin read once per token.
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = tok < n_tokens
    pos = tl.load(pos_ptr + tok * stride_pos, mask=tok_mask, other=0).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    cs_off = pos[:, None] * stride_cs_pos + j[None, :]
    cs_mask = tok_mask[:, None] & (j < half)[None, :]
    dt = q_ptr.dtype.element_ty
    cos = round_to(tl.load(cs_ptr + cs_off, mask=cs_mask, other=0.0), dt, INTERPRET).to(tl.float32)
    sin = round_to(tl.load(cs_ptr + cs_off + half, mask=cs_mask, other=0.0), dt, INTERPRET).to(tl.float32)
    cos = cos[:, None, :]  # (BLOCK_T, 1, BLOCK_HALF): broadcast over heads
    sin = sin[:, None, :]
    _rotate_heads(q_ptr, tok, tok_mask, cos, sin, n_heads_q, half, stride_q_t, stride_q_h, stride_q_d,
                  BLOCK_HQ, BLOCK_HALF, INTERPRET)
    _rotate_heads(k_ptr, tok, tok_mask, cos, sin, n_heads_k, half, stride_k_t, stride_k_h, stride_k_d,
                  BLOCK_HK, BLOCK_HALF, INTERPRET)


def _config(n_tokens: int, heads_q: int, half: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps): about 2k q pairs per program (one 7B token is 28 x 64 = 1.8k)."""
    per_token = triton.next_power_of_2(heads_q) * triton.next_power_of_2(half)
    budget = 8192 if INTERPRET else 2048  # the interpreter runs programs serially: fewer, bigger ones
    block_t = max(1, min(budget // per_token, triton.next_power_of_2(max(1, n_tokens))))
    return block_t, 1 if INTERPRET else 4


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Triton twin of ``ovfast.ops.rope``: rotates q (T, Hq, d) and k (T, Hkv, d) in place."""
    check_float("q", q)
    check_float("cos_sin_cache", cos_sin_cache, (torch.float32,))
    check_device(q.device, k=k, positions=positions, cos_sin_cache=cos_sin_cache)
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be (T, heads, head_dim); got {tuple(q.shape)} and {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"q is {q.dtype} but k is {k.dtype}")
    t, hq, d = q.shape
    if k.shape[0] != t or k.shape[2] != d or positions.shape != (t,):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and positions {tuple(positions.shape)} disagree")
    if d % 2 or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != d:
        raise ValueError(f"cos_sin_cache must be (max_pos, {d}) for an even head_dim {d}; "
                         f"got {tuple(cos_sin_cache.shape)}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"positions must be int32 or int64, got {positions.dtype}")
    if cos_sin_cache.stride(1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    if t == 0:
        return None
    half = d // 2
    block_t, num_warps = _config(t, hq, half)
    _rope_kernel[(triton.cdiv(t, block_t),)](
        q, k, positions, cos_sin_cache,
        t, hq, k.shape[1], half,
        *q.stride(), *k.stride(), positions.stride(0), cos_sin_cache.stride(0),
        BLOCK_T=block_t, BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half), INTERPRET=INTERPRET, num_warps=num_warps,
    )
    return None
