"""Helpers shared by the decoder kernels: interpreter detection, dtype rounding, launch checks.

Two defects of Triton 3.9's interpreter (``TRITON_INTERPRET=1``, how CI runs every kernel on the
CPU) are worked around here, and only when interpreting; compiled GPU code is unaffected:

* an fp32 -> bf16 cast truncates instead of rounding to nearest even (``fp_downcast_rounding``
  is ignored), so ``round_to`` rounds the fp32 bits by hand before the cast;
* ``tl.dot`` on bf16 operands returns garbage (fp16 and fp32 are right), so the attention
  kernels upcast bf16 dot operands to fp32 (exact) under the ``DOT_FP32`` flag.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Read once: triton.jit picks the interpreter at decoration time from the same variable.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def round_to(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 ``x`` rounded to nearest even in DTYPE (what torch's casts do)."""
    if INTERPRET and DTYPE == tl.bfloat16:
        # The interpreter truncates: add half an ulp of bf16 (ties to even) to the fp32 bits,
        # so the truncating cast below lands on the rounded value.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


def check_float(name: str, t: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {[str(d) for d in dtypes]}")


def check_device(device: torch.device, **tensors: torch.Tensor) -> None:
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
