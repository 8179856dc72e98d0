"""The hot operations behind one name each: plain-torch references (``torch_ops``) and the switch
that routes them to ``ovfast.kernels`` (``backends``).

May import: torch, ``ovfast.errors``, ``ovfast.settings``. ``backends`` imports ``ovfast.kernels``
lazily, at the first dispatch, and the kernels import this package back for their references,
never at import time.
"""
from __future__ import annotations

import torch

from .backends import kernel_for
from .torch_ops import (
    DISPATCHED,
    attention_chunk,
    attention_decode,
    attention_prefill,
    bilinear_resize,
    patch_embed,
    projector,
    rms_norm,
    rope,
    rope_cos_sin_cache,
    sample,
    silu_mul,
)


def report(device: torch.device | str) -> dict[str, str]:
    """Which implementation each op uses on ``device``: "triton" or "torch"."""
    device = torch.device(device)
    return {name: ("triton" if kernel_for(name, device) else "torch") for name in DISPATCHED}


__all__ = [
    "DISPATCHED", "attention_chunk", "attention_decode", "attention_prefill", "bilinear_resize", "patch_embed", "projector", "report",
    "rms_norm", "rope", "rope_cos_sin_cache", "sample", "silu_mul",
]
