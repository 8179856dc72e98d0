"""What the kernels' launchers share: where the kernels run, tuning, rounding and input checks.

* ``INTERPRET``: ``TRITON_INTERPRET=1`` runs every kernel in Triton's NumPy interpreter on CPU
  tensors (CI has no GPU). Read once at import, as Triton itself reads it when kernels are
  defined, so it must be set before ``ovfast.kernels`` is imported (tests/conftest.py does).
* ``BF16_FIX``: Triton 3.9's interpreter gets bf16 wrong twice: ``tl.dot`` on bf16 operands
  returns garbage (fp16 and fp32 are right), and fp32 -> bf16 casts truncate instead of rounding
  to nearest even (uint8 -> bf16 even reinterprets the integer bits). Kernels take the flag as a
  constexpr: when set, ``dot_operand`` upcasts dot operands to fp32 (bf16 and fp16 are exact in
  fp32, so the products are the same) and ``round_to`` rounds on the bits. Compiled kernels
  never see it. Launchers read it at call time, so tests can switch it off to show the traps.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ovfast.settings import environment

INTERPRET = environment.triton_interpret()
BF16_FIX = INTERPRET


@triton.jit
def dot_operand(x, BF16_FIX: tl.constexpr):
    """A tl.dot operand: as is when compiled, in fp32 under the interpreter (see BF16_FIX)."""
    if BF16_FIX:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def round_to(x, dtype: tl.constexpr, BF16_FIX: tl.constexpr):
    """fp32 ``x`` rounded to nearest even in ``dtype`` (bit twiddling for bf16 under the interpreter)."""
    if BF16_FIX:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)  # carries into the exponent as RNE must
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(dtype)
    else:
        return x.to(dtype)


# H100 GEMM tiles for the vision GEMMs (patch embedding: K = 588; projector: K, N in 896..3584 over
# up to ~27k rows): the Triton tutorial's Hopper shapes, 128- and 256-wide tiles keeping wgmma fed.
# Configs too big for shared memory (fp32) are skipped by the tuner.
GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
]
# Interpreter: one NumPy op per block op, so fewer, larger programs run fastest.
GEMM_INTERPRET_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}


@triton.jit
def dot_acc(a, b, acc, IEEE: tl.constexpr, BF16_FIX: tl.constexpr):
    """acc + a @ b for the GEMM kernels: IEEE fp32 products when asked (no TF32), and the
    interpreter's bf16 workaround on the operands (see BF16_FIX)."""
    a = dot_operand(a, BF16_FIX)
    b = dot_operand(b, BF16_FIX)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def grouped_pid(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a GEMM program in grouped order: GROUP_M row blocks sweep every column
    block together, so a column block (weights, or gathered patches) is reused from L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit
def online_softmax_step(acc, m_i, l_i, s, v, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block of FlashAttention's online softmax: scores ``s`` (rows, keys; log2 units,
    masked keys at -inf, at least one finite per row overall) and values ``v`` (keys, d) update the
    running (acc, max, sum). P is rounded to the value dtype for the second GEMM, as FlashAttention
    does; under the interpreter with bf16 (DOT_FP32) that rounding is done by hand and the dot in fp32."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DOT_FP32:
        p = round_to(p, tl.bfloat16, True).to(tl.float32)
        v = v.to(tl.float32)
    else:
        p = p.to(v.dtype)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


def m_bucket(m: int) -> int:
    """The autotuning key of a GEMM's row count: the next power of two (at least 64). One image's
    729 rows and a 16-tile batch's 11664 want different tiles; tuning once per bucket keeps the
    number of tunings small and lets the engine warm every bucket up at load."""
    return max(64, 1 << max(0, m - 1).bit_length())


def tunable(kernel, configs: list[triton.Config], key: list[str]):
    """The kernel to launch: autotuned over ``configs`` when compiled, the plain kernel under the
    interpreter, where autotuning would only multiply the runtime (launchers pass a fixed
    config there)."""
    return kernel if INTERPRET else triton.autotune(configs=configs, key=key)(kernel)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None, device: torch.device | None = None) -> None:
    """Raise a clear error when ``t`` is not a tensor of the expected rank, dtype and device."""
    check_float(name, t, dtypes if dtypes is not None else (t.dtype,) if isinstance(t, torch.Tensor) else ())
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all inputs on one device)")
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"{name} is on {t.device}: Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 "
                           "set before ovfast.kernels is imported (CPU tests)")


def max_offset(t: torch.Tensor) -> int:
    """The largest element offset a kernel adds to ``t``'s pointer: int32 offsets must hold it."""
    return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(name: str, t, dtypes=FLOAT_DTYPES) -> None:
    """Raise a clear error when ``t`` is not a tensor of one of ``dtypes`` (the device is check_device's)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {[str(d) for d in dtypes]}")


def check_device(device: torch.device, **tensors: torch.Tensor) -> None:
    """All tensors on ``device``, and that device one the kernels can run on."""
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device} (all inputs on one device)")
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 to run them on the CPU"
        )


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a cached host-side query); 8 when interpreting."""
    if device.type != "cuda":
        return 8  # few programs: the interpreter runs them one after another
    return torch.cuda.get_device_properties(device).multi_processor_count
