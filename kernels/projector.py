"""The multimodal projector: two GEMMs, the GELU fused into the first one's epilogue.

Math (the contract, ``ovfast.ops.projector.reference``)::

    out = gelu(x @ w1.T + b1, approximate) @ w2.T + b2

x (..., E); w1 (D, E); w2 (D, D); biases (D,) or None -> (..., D) in x's dtype, written into
``out`` when given (any tensor of that shape whose leading dims flatten to rows, e.g. a slice
of a prompt's embedding buffer, so packing needs no extra copy).

Two launches of one GEMM kernel. The first adds b1, rounds to x's dtype (F.linear's output),
applies the GELU in fp32 (erf, or tanh when approximate="tanh") and stores the intermediate
(M, D) in x's dtype, as the reference does; it never goes through memory in fp32. The second
adds b2 and writes the result rows wherever ``out`` points.

Tolerance: fp32 ~1e-5 relative (dots with input_precision="ieee", not TF32); fp16 / bf16 within
accumulation-order noise plus one rounding of the intermediate (~1e-2 relative).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ovfast import ops

from . import _runtime
from ._runtime import FLOAT_DTYPES, check_tensor, dot_acc, grouped_pid, round_to

_ACTIVATIONS = {None: 0, "none": 1, "tanh": 2}  # None: no activation (second GEMM)


@triton.jit
def _gelu(x, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        # tanh(u) = 1 - 2 / (exp(2u) + 1): tl has no tanh that also runs in the interpreter.
        # tanh(10) is 1.0 in fp32, so clamping there changes nothing and keeps exp finite.
        u = tl.minimum(0.7978845608028654 * (x + 0.044715 * x * x * x), 10.0)
        return 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
    else:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    M, N, K, M_BUCKET,  # M_BUCKET: the autotuning key only (_runtime.m_bucket)
    stride_x_m, stride_x_k,
    stride_w_n, stride_w_k,
    stride_out_m, stride_out_n,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr, BF16_FIX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out = act(x @ w.T + b): x (M, K), w (N, K) as nn.Linear stores it; ACT 0 = none, 1 = erf GELU, 2 = tanh GELU."""
    # Grouped ordering: GROUP_M row blocks share each weight column block while it is in L2.
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(x_ptr + offs_m[:, None] * stride_x_m + offs_k[None, :] * stride_x_k,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + offs_n[None, :] * stride_w_n + offs_k[:, None] * stride_w_k,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N) of w.T
        acc = dot_acc(a, b, acc, IEEE, BF16_FIX)

    out_ty = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = round_to(acc, out_ty, BF16_FIX)
    if ACT != 0:
        # F.gelu reads the linear's rounded output and computes in fp32.
        y = round_to(_gelu(y.to(tl.float32), ACT == 2), out_ty, BF16_FIX)
    tl.store(out_ptr + offs_m[:, None] * stride_out_m + offs_n[None, :] * stride_out_n, y,
             mask=m_ok[:, None] & n_ok[None, :])


_launch = _runtime.tunable(_linear_kernel, _runtime.GEMM_CONFIGS, key=["M_BUCKET", "N", "K"])


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor, act: str | None) -> None:
    """out (M, N) = act(x (M, K) @ w.T + b), all 2-D with any strides."""
    m, k = x.shape
    n = w.shape[0]
    meta = _runtime.GEMM_INTERPRET_CONFIG if _runtime.INTERPRET else {}

    def grid(meta_):
        return (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"]),)

    _launch[grid](
        x, w, b, out, m, n, k, _runtime.m_bucket(m), *x.stride(), *w.stride(), *out.stride(),
        HAS_BIAS=b is not None, ACT=_ACTIVATIONS[act], IEEE=x.dtype == torch.float32,
        BF16_FIX=_runtime.BF16_FIX, **meta,
    )


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """t (..., D) as a (rows, D) view without copying, or None when its leading dims do not merge."""
    lead = [(size, stride) for size, stride in zip(t.shape[:-1], t.stride()[:-1]) if size != 1]
    for (_, outer), (size, inner) in zip(lead, lead[1:]):
        if outer != inner * size:
            return None
    row_stride = lead[-1][1] if lead else t.shape[-1]
    return t.as_strided((t.shape[:-1].numel(), t.shape[-1]), (row_stride, t.stride(-1)))


def projector(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
    approximate: str = "none", out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton twin of ``ovfast.ops.projector`` (same arguments): x (..., E) -> (..., D)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    dev = x.device
    check_tensor("w1", w1, ndim=2, device=dev)
    check_tensor("w2", w2, ndim=2, device=dev)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    d, e = w1.shape
    if x.shape[-1] != e or w2.shape != (d, d):
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    params = [t for t in (w1, b1, w2, b2) if t is not None]
    if any(t.dtype != x.dtype for t in params) or (out is not None and out.dtype != x.dtype):
        # Mixed parameter dtypes: F.linear rejects them, so the reference raises its own error.
        # An out of another dtype: the reference's out.copy_ converts; the kernel stores x's dtype.
        return ops.projector.reference(x, w1, b1, w2, b2, approximate, out)
    for name, bias in (("b1", b1), ("b2", b2)):
        if bias is not None:
            check_tensor(name, bias, ndim=1, device=dev)
    shape = (*x.shape[:-1], d)
    if out is not None:
        check_tensor("out", out, device=dev)
        if tuple(out.shape) != shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}")

    x2 = _rows(x)
    if x2 is None:
        x2 = x.reshape(-1, e)  # a copy only for inputs whose leading dims do not merge
    target = out if out is not None else torch.empty(shape, dtype=x.dtype, device=dev)
    rows = _rows(target)
    # An out view whose rows cannot be addressed as one strided matrix gets a staging buffer.
    result = rows if rows is not None else torch.empty((x2.shape[0], d), dtype=x.dtype, device=dev)
    if x2.shape[0] > 0:
        hidden = torch.empty((x2.shape[0], d), dtype=x.dtype, device=dev)  # (M, D), gelu(x @ w1.T + b1)
        _linear(x2, w1, b1, hidden, approximate)
        _linear(hidden, w2, b2, result, None)
    if rows is None:
        target.copy_(result.view(shape))
    return target
