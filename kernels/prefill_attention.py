"""Attention over packed variable-length sequences (prefill and the SigLIP encoder).

Math, for each sequence b (rows cu_seqlens[b]:cu_seqlens[b+1], length L_b), query head h and
query row i of that sequence, with g = Hq / Hkv and kv head j = h // g (GQA by head grouping):

    out[i, h] = sum_n softmax_n(scale * q[i, h] . k[n, j]) v[n, j],   n < L_b (n <= i if causal)

computed FlashAttention-2 style: a program owns BLOCK_M query rows of one (sequence, head),
streams the sequence's keys and values in BLOCK_N blocks and keeps a running row max m, row sum l
and fp32 accumulator (online softmax in base 2, scale folded with log2(e)); the (L, L) score
matrix is never materialised. Causal programs first run the key blocks left of their diagonal
without masks, then the diagonal block(s) with masks; non-causal programs mask only the
sequence's last, partial key block.

Shapes (the flash-attn varlen layout): q (T, Hq, d), k and v (T, Hkv, d), any strides (views of a
fused qkv projection are fine); cu_seqlens (B+1,) int32; max_seqlen an int >= every L_b (the grid
is built from it, so the launch needs no device sync: programs past a short sequence's end exit).
Returns (T, Hq, d) contiguous in q's dtype. head_dim up to 256, any value (72 for SigLIP): the
head axis is padded to a power of two with masks.

Tolerance against ``ovfast.ops.attention_prefill.reference`` (SDPA): fp32 1e-5 (dots are IEEE fp32,
not TF32); bf16/fp16 at most twice the error of the same reference computed in the low-precision
dtype against an fp32 reference, plus a small atol (P is rounded to the value dtype before P @ V,
as in FlashAttention).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import INTERPRET, check_device, check_float, online_softmax_step, round_to

LOG2E = 1.4426950408889634


@triton.jit
def _attn_block(
    acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, offs_n_base, offs_m, d_mask, seq_len, qk_scale,
    stride_k_t, stride_v_t,
    MASK_KEYS: tl.constexpr, CAUSAL_MASK: tl.constexpr, MASK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step of (BLOCK_M,) rows against keys/values [start_n, start_n + BLOCK_N).

    k_ptrs / v_ptrs: (BLOCK_N, BLOCK_D) pointers of the sequence's first key block. Masks only
    where a block can be partial (MASK_KEYS) or the head axis is padded (MASK_D).
    """
    offs_n = start_n + offs_n_base
    if MASK_KEYS:
        kv_mask = (offs_n[:, None] < seq_len) & d_mask
        k = tl.load(k_ptrs + start_n * stride_k_t, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs + start_n * stride_v_t, mask=kv_mask, other=0.0)
    elif MASK_D:
        k = tl.load(k_ptrs + start_n * stride_k_t, mask=d_mask, other=0.0)
        v = tl.load(v_ptrs + start_n * stride_v_t, mask=d_mask, other=0.0)
    else:
        k = tl.load(k_ptrs + start_n * stride_k_t)
        v = tl.load(v_ptrs + start_n * stride_v_t)
    if DOT_FP32:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
    if MASK_KEYS:
        s = tl.where((offs_n < seq_len)[None, :], s, float("-inf"))
    if CAUSAL_MASK:
        s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
    # Never -inf - -inf: every row has a visible key in the first block it runs (key 0, or key
    # lo on the causal diagonal), so the running max is finite from the first step on.
    return online_softmax_step(acc, m_i, l_i, s, v, DOT_FP32, DOT_PRECISION)


@triton.jit
def _attention_prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, cu_seqlens_ptr,
    qk_scale, group,
    stride_q_t, stride_q_h, stride_q_d, stride_k_t, stride_k_h, stride_k_d,
    stride_v_t, stride_v_h, stride_v_d, stride_out_t, stride_out_h,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    start_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    seq_start = tl.load(cu_seqlens_ptr + seq)
    seq_len = tl.load(cu_seqlens_ptr + seq + 1) - seq_start
    if start_m * BLOCK_M >= seq_len:  # the grid covers max_seqlen: shorter sequences stop here
        return
    kv_head = head // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n_base = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row0 = seq_start.to(tl.int64)
    q_mask = (offs_m[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)  # also the store mask
    q = tl.load(q_ptr + (row0 + offs_m[:, None]) * stride_q_t + head * stride_q_h + offs_d[None, :] * stride_q_d,
                mask=q_mask, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    # (BLOCK_N, BLOCK_D) pointers of the first key block; each step offsets them by start_n rows.
    k_ptrs = (k_ptr + row0 * stride_k_t + kv_head * stride_k_h
              + offs_n_base[:, None] * stride_k_t + offs_d[None, :] * stride_k_d)
    v_ptrs = (v_ptr + row0 * stride_v_t + kv_head * stride_v_h
              + offs_n_base[:, None] * stride_v_t + offs_d[None, :] * stride_v_d)
    d_mask = offs_d[None, :] < HEAD_DIM

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # [0, lo): whole key blocks every row of this program sees in full -> no masks.
    # [lo, hi): the diagonal (causal) or the sequence's partial last block -> masked.
    if CAUSAL:
        lo = start_m * BLOCK_M  # BLOCK_M is a multiple of BLOCK_N, and lo < seq_len
        hi = tl.minimum((start_m + 1) * BLOCK_M, seq_len)
    else:
        lo = (seq_len // BLOCK_N) * BLOCK_N
        hi = seq_len
    for start_n in range(0, lo, BLOCK_N):
        acc, m_i, l_i = _attn_block(
            acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, offs_n_base, offs_m, d_mask, seq_len, qk_scale,
            stride_k_t, stride_v_t, False, False, BLOCK_D != HEAD_DIM, DOT_FP32, DOT_PRECISION,
        )
    for start_n in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _attn_block(
            acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, offs_n_base, offs_m, d_mask, seq_len, qk_scale,
            stride_k_t, stride_v_t, True, CAUSAL, BLOCK_D != HEAD_DIM, DOT_FP32, DOT_PRECISION,
        )
    out = acc / l_i[:, None]
    tl.store(out_ptr + (row0 + offs_m[:, None]) * stride_out_t + head * stride_out_h + offs_d[None, :],
             round_to(out, out_ptr.dtype.element_ty, INTERPRET), mask=q_mask)


def _config(head_dim: int, max_seqlen: int, elem_bytes: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages).

    GPU, 16-bit: the Triton fused-attention tutorial's Hopper choice, 128 x 64 tiles with 8 warps
    for a 128-wide (padded) head, 4 warps below, 3 stages of K/V prefetch (<= 128 KB of the
    227 KB of shared memory, checked by tests/kernels/sm90_compile.py). fp32 tiles take twice the
    bytes: 64 x 32 and 2 stages (~100 KB at d = 128).
    Interpreter: 32 x 16 tiles for short (test) sequences, so they cross several blocks and the
    causal diagonal spans two key blocks; 128 x 128 for long ones (interpreted steps are costly:
    a 1350-token causal prefill with 6 heads took 1.6 s with these tiles, 2.7 s with 128 x 64 and
    5.0 s with 64 x 64), which keeps the engine tests' 729-token SigLIP tiles and prompts fast.
    BLOCK_M must be a multiple of BLOCK_N (the causal split into unmasked and diagonal blocks).
    """
    if INTERPRET:
        return (32, 16, 1, 1) if max_seqlen <= 256 else (128, 128, 1, 1)
    block_d = triton.next_power_of_2(head_dim)
    if elem_bytes == 4:
        return (64, 32, 4, 2) if block_d <= 128 else (32, 32, 4, 1)
    if block_d <= 64:
        return 128, 64, 4, 3
    if block_d <= 128:
        return 128, 64, 8, 3
    return 64, 32, 8, 2  # 256-wide heads: keep the tiles within registers


def attention_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    causal: bool = True, scale: float | None = None,
) -> torch.Tensor:
    """Triton twin of ``ovfast.ops.attention_prefill``: (T, Hq, d) attention over packed sequences."""
    check_float("q", q, (torch.float32, torch.float16, torch.bfloat16))
    check_device(q.device, k=k, v=v, cu_seqlens=cu_seqlens)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"q, k, v must be (T, heads, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    t, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != t or k.shape[2] != d:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be (T={t}, Hkv, d={d})")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} kv heads")
    if d > 256:
        raise ValueError(f"head_dim {d} > 256 is not supported")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be (B+1,) int32, got {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}")
    if cu_seqlens.stride(0) != 1:
        cu_seqlens = cu_seqlens.contiguous()
    out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    n_seq = cu_seqlens.numel() - 1
    if t == 0 or max_seqlen <= 0:
        return out
    if scale is None:
        scale = d**-0.5
    block_m, block_n, num_warps, num_stages = _config(d, int(max_seqlen), q.element_size())
    grid = (triton.cdiv(int(max_seqlen), block_m), hq, n_seq)
    _attention_prefill_kernel[grid](
        q, k, v, out, cu_seqlens,
        float(scale) * LOG2E, hq // hkv,
        *q.stride(), *k.stride(), *v.stride(), out.stride(0), out.stride(1),
        CAUSAL=bool(causal), HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_FP32=INTERPRET and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", INTERPRET=INTERPRET,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
