"""The hot operations behind one name each: plain-torch references (``torch_ops``) and the switch
that routes them to ``ovfast.kernels`` (``backends``).

May import: torch, ``ovfast.errors``, ``ovfast.settings``. ``backends`` imports ``ovfast.kernels``
lazily, at the first dispatch, and the kernels import this package back for their references,
never at import time.
"""
from __future__ import annotations

import torch

from . import cpu_native
from .backends import kernel_for
from .torch_ops import (
    DISPATCHED,
    attention_chunk,
    attention_decode,
    attention_prefill,
    bilinear_resize,
    linear,
    linear_gelu,
    patch_embed,
    projector,
    rms_norm,
    rope,
    rope_cos_sin_cache,
    sample,
    silu_mul,
)


def fused_decode(device: torch.device) -> bool:
    """Whether a decode step's layers may run as one call of ``cpu_native.decode_layers`` (CPU
    tensors with the CPU kernels on; it still declines inputs it does not cover)."""
    return device.type == "cpu" and kernel_for("linear", device) is not None


def report(device: torch.device | str) -> dict[str, str]:
    """Which implementation each op uses on ``device``: "triton", "cpu" (compiled CPU kernels) or "torch"."""
    device = torch.device(device)
    return {name: (("cpu" if device.type == "cpu" else "triton") if kernel_for(name, device) else "torch")
            for name in DISPATCHED}


__all__ = [
    "DISPATCHED", "attention_chunk", "cpu_native", "fused_decode", "attention_decode", "attention_prefill", "bilinear_resize", "linear", "linear_gelu", "patch_embed", "projector", "report",
    "rms_norm", "rope", "rope_cos_sin_cache", "sample", "silu_mul",
]
