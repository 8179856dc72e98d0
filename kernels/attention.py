"""The two attention entry points and the choice of backend behind them.

``attention_prefill`` and ``attention_decode`` take the arguments of the same-named ops in
``ovfast.ops`` and run one of three backends, all on the flash-attn tensor layouts (packed
(T, H, d) activations, a (slots, S_max, Hkv, d) cache), so they share one KV cache:

* ``flash_attn``: the flash-attn package's ``flash_attn_varlen_func`` / ``flash_attn_with_kvcache``;
  chosen when it is importable and the tensors are CUDA fp16/bf16 on an sm80+ GPU with a head
  dim that is a multiple of 8 up to 256;
* ``triton``: ovfast's kernels (``prefill_attention``, ``decode_attention``); for CUDA tensors,
  and for CPU tensors under ``TRITON_INTERPRET=1`` (CI);
* ``torch``: the reference bodies of ``ovfast.ops`` (SDPA), everywhere else.

``OVFAST_ATTENTION`` (read at import; ``set_attention_mode`` / ``attention_mode`` change it)
forces the choice: ``auto`` (default, the order above), ``flash_attn``, ``triton`` or ``torch``.
Forcing a backend that cannot run the tensors raises instead of silently falling back.
``attention_backend(device, dtype, head_dim)`` reports the choice, and each new choice is logged
once at INFO level on the ``ovfast.kernels.attention`` logger.

These entry points run when ``ovfast.ops.backends`` routes an op to the kernels (``OVFAST_KERNELS``
``auto`` on CUDA, or ``triton``); with ``OVFAST_KERNELS=torch`` neither flash-attn nor Triton runs.
"""
from __future__ import annotations

import functools
import importlib
import logging

import torch

from ovfast import ops
from ovfast.ops.backends import Switch
from ovfast.settings import environment

from ._runtime import INTERPRET
from .decode_attention import attention_decode as _triton_decode
from .prefill_attention import attention_prefill as _triton_prefill

log = logging.getLogger(__name__)

MODES = environment.ATTENTION_MODES
ATTENTION = Switch("OVFAST_ATTENTION", MODES, environment.attention())


def set_attention_mode(mode: str) -> None:
    ATTENTION.set(mode)


def get_attention_mode() -> str:
    return ATTENTION.value


def attention_mode(mode: str):
    """Run a block with another attention mode."""
    return ATTENTION.using(mode)


@functools.cache
def flash_attn_module():
    """The flash_attn package, or None when it is not installed (looked up once; tests clear the cache)."""
    try:
        return importlib.import_module("flash_attn")
    except ImportError:
        return None


@functools.cache
def _sm80_or_newer(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def flash_attn_supports(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether flash-attn 2 runs these tensors: CUDA sm80+, fp16/bf16, head_dim % 8 == 0 and <= 256."""
    return (dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256
            and _sm80_or_newer(torch.device(device)))


def _triton_runs(device: torch.device) -> bool:
    return torch.device(device).type == "cuda" or INTERPRET


_reported: set[tuple] = set()


def attention_backend(device, dtype: torch.dtype, head_dim: int) -> str:
    """The backend ("flash_attn", "triton" or "torch") attention uses for these tensors now."""
    device = torch.device(device)
    mode = ATTENTION.value
    if mode == "flash_attn":
        if flash_attn_module() is None:
            raise RuntimeError("OVFAST_ATTENTION=flash_attn but the flash_attn package is not importable")
        if not flash_attn_supports(device, dtype, head_dim):
            raise RuntimeError(f"OVFAST_ATTENTION=flash_attn cannot run {dtype} tensors on {device} with "
                               f"head_dim {head_dim} (needs CUDA sm80+, fp16/bf16, head_dim % 8 == 0, <= 256)")
        choice = "flash_attn"
    elif mode == "triton":
        if not _triton_runs(device):
            raise RuntimeError(f"OVFAST_ATTENTION=triton needs CUDA tensors or TRITON_INTERPRET=1 (got {device})")
        choice = "triton"
    elif mode == "torch":
        choice = "torch"
    elif flash_attn_module() is not None and flash_attn_supports(device, dtype, head_dim):
        choice = "flash_attn"
    else:
        choice = "triton" if _triton_runs(device) else "torch"
    key = (choice, device.type, dtype, head_dim)
    if key not in _reported:
        _reported.add(key)
        log.info("attention backend for %s %s head_dim %d: %s (OVFAST_ATTENTION=%s)",
                 device.type, dtype, head_dim, choice, mode)
    return choice


def attention_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    causal: bool = True, scale: float | None = None,
) -> torch.Tensor:
    """``ovfast.ops.attention_prefill`` on the selected backend: q (T, Hq, d), k/v (T, Hkv, d) -> (T, Hq, d)."""
    backend = attention_backend(q.device, q.dtype, q.shape[-1])
    if backend == "flash_attn":
        fa = flash_attn_module()
        return fa.flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=causal,
        )
    if backend == "triton":
        return _triton_prefill(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale)
    return ops.attention_prefill.reference(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale)


def attention_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """``ovfast.ops.attention_decode`` on the selected backend: q (B, Hq, d) -> (B, Hq, d)."""
    backend = attention_backend(q.device, q.dtype, q.shape[-1])
    if backend == "flash_attn":
        fa = flash_attn_module()
        bsz = q.shape[0]
        # Rows 0..B-1 are cache slots 0..B-1; the new k/v are already in the cache, so no k=/v=.
        out = fa.flash_attn_with_kvcache(
            q[:, None], k_cache[:bsz], v_cache[:bsz], cache_seqlens=seq_lens.to(torch.int32), softmax_scale=scale,
            causal=True,
        )  # (B, 1, Hq, d)
        return out[:, 0]
    if backend == "triton":
        return _triton_decode(q, k_cache, v_cache, seq_lens, scale=scale)
    return ops.attention_decode.reference(q, k_cache, v_cache, seq_lens, scale=scale)
