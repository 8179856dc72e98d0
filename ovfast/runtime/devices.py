"""The device a user asks for (``load(device=...)``, ``--device``), checked before anything runs on it.

torch itself answers a bad device with a parse error (``tpu``) or, for CUDA on a CPU-only build,
an ``AssertionError`` deep in the first allocation; here each becomes a ``ConfigError`` that
says what is wrong and what to do.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError
from ..settings import environment

_TYPES = ("cpu", "cuda")


def resolve_device(device: str | int | torch.device | None = None) -> torch.device:
    """The torch.device to run on: ``device`` checked, or CUDA when a GPU is visible, else the CPU.

    A CUDA device comes back with its index (``cuda`` -> ``cuda:<current device>``).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {str(device)!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type not in _TYPES:
        raise ConfigError(f"device {str(device)!r}: ovfast runs on 'cpu' or 'cuda' ('cuda:N'), not {dev.type}")
    if dev.type == "cpu":
        return dev
    if not torch.backends.cuda.is_built():
        raise ConfigError(f"device {str(device)!r}: this torch ({torch.__version__}) was built without CUDA, so it sees "
                          "no GPUs; install a CUDA build of torch, or run on the CPU (device 'cpu')")
    count = torch.cuda.device_count()
    if count == 0:
        visible = environment.cuda_visible_devices()
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else " (is the NVIDIA driver loaded?)"
        raise ConfigError(f"device {str(device)!r}: torch sees no GPUs{hint}; run on the CPU with device 'cpu'")
    if dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if dev.index >= count:
        names = ", ".join(f"cuda:{i}" for i in range(count))
        raise ConfigError(f"device {str(device)!r} does not exist; the GPUs torch sees: {names}")
    return dev
