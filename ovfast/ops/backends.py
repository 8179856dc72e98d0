"""Which implementation runs each operation of ``ovfast.ops``: a Triton kernel or plain torch.

Every op in ``ovfast.ops`` is decorated with ``dispatch``; when the kernels are enabled for the
op's tensors and ``ovfast.kernels`` has a function of the same name, that function runs instead
of the torch body (which stays available as ``op.reference``, the kernels' test oracle).

``OVFAST_KERNELS`` picks the mode at start-up; ``set_kernel_mode`` / ``kernel_mode`` change it:

* ``auto`` (default): Triton kernels for CUDA tensors when Triton is installed; for CPU tensors
  ovfast's compiled CPU kernels (``cpu_native``) where it has the op and could build them;
  torch otherwise;
* ``triton``: Triton kernels for every tensor (CPU tensors need ``TRITON_INTERPRET=1``: tests);
* ``torch``: plain torch everywhere.

Attention has a second switch, ``OVFAST_ATTENTION`` (``auto``, ``flash_attn``, ``triton``,
``torch``), read by ``ovfast.kernels.attention``: it picks flash-attn, Triton or SDPA behind the
kernels' attention entry points; ``ovfast.kernels.attention_backend`` reports the choice.
"""
from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from contextlib import contextmanager

import torch

from ..settings import environment


class Switch:
    """A mode whose start-up value comes from an environment variable (``value``: read through
    ``ovfast.settings.environment``, named ``env``), changeable at run time (and per block)."""

    def __init__(self, env: str, modes: tuple[str, ...], value: str):
        self.env, self.modes = env, modes
        if value not in modes:
            raise ValueError(f"{env}={value!r}; use one of {modes}")
        self.value = value

    def set(self, mode: str) -> None:
        if mode not in self.modes:
            raise ValueError(f"{self.env} mode {mode!r}; use one of {self.modes}")
        self.value = mode

    @contextmanager
    def using(self, mode: str):
        previous = self.value
        self.set(mode)
        try:
            yield
        finally:
            self.value = previous


MODES = environment.KERNEL_MODES
KERNELS = Switch("OVFAST_KERNELS", MODES, environment.kernels())


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def set_kernel_mode(mode: str) -> None:
    KERNELS.set(mode)


def get_kernel_mode() -> str:
    return KERNELS.value


def kernel_mode(mode: str):
    """Run a block with another kernel mode (tests force the Triton path with it)."""
    return KERNELS.using(mode)


def use_triton(device: torch.device) -> bool:
    if KERNELS.value == "torch":
        return False
    if KERNELS.value == "triton":
        return True
    return device.type == "cuda" and triton_available()


@functools.cache
def _kernels():
    import ovfast.kernels

    return ovfast.kernels


def kernel_for(name: str, device: torch.device) -> Callable | None:
    """The Triton (or, on the CPU, compiled CPU) implementation of op ``name`` for tensors on
    ``device``, or None for the torch one."""
    if not use_triton(device):
        return _cpu_kernel(name) if device.type == "cpu" and KERNELS.value == "auto" else None
    return getattr(_kernels(), name, None)


def _cpu_kernel(name: str) -> Callable | None:
    from . import cpu_native

    impl = getattr(cpu_native, name, None)
    return impl if impl is not None and name in cpu_native.OPS and cpu_native.available() else None


def dispatch(fn: Callable) -> Callable:
    """Route calls of a torch op to its Triton kernel when enabled; the device is the first tensor's."""

    @functools.wraps(fn)
    def op(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        impl = kernel_for(fn.__name__, first.device) if first is not None else None
        return (impl or fn)(*args, **kwargs)

    op.reference = fn
    return op
