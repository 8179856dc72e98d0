"""Every environment variable ovfast (and ovfast.kernels) reads, read here and nowhere else.

A variable only supplies a default: each function reads it when called (not at import), returns
a typed value, and raises ``ConfigError`` naming the variable when its value is malformed. Callers
that fix a value at start-up (the kernel switches, ``TRITON_INTERPRET``) do so by calling these.

Nothing in ovfast writes ``os.environ`` while threads may run, with one documented exception,
``default_nccl_socket_ifname``. Child processes get their environment as a new dict
(``child_env``). ``describe()`` lists the variables with their current values; docs/configuration.md
is the user-facing list.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import ConfigError

KERNEL_MODES = ("auto", "triton", "torch")
ATTENTION_MODES = ("auto", "flash_attn", "triton", "torch")

_MEANINGS = {
    "OVFAST_KERNELS": "start-up kernel mode: auto (Triton on CUDA), triton or torch",
    "OVFAST_ATTENTION": "start-up attention backend: auto, flash_attn, triton or torch",
    "OVFAST_CUDA_GRAPHS": "0 turns CUDA-graph capture of the decode step off (default on)",
    "OVFAST_CPU_KERNELS": "0 keeps the CPU decode on plain torch ops instead of ovfast's compiled CPU kernels (default on)",
    "OVFAST_CPU_BLOCK_CACHE_MB": "MiB of freed large CPU tensor blocks a CPU engine keeps for reuse (default 2048; 0: torch's allocator as is)",
    "OVFAST_CPU_PACKED_WEIGHTS_MB": "MiB of weights a CPU engine keeps a oneDNN-packed copy of for its prompt GEMMs (default 4096; 0: none)",
    "OVFAST_NATIVE": "0 forces the pure-Python preprocessing instead of ovfast._C (default native)",
    "OVFAST_PREPROCESS_THREADS": "threads of the native preprocessing (default: the usable CPUs)",
    "OVFAST_TP_TIMEOUT_S": "seconds a tensor-parallel data collective may wait before failing (default 600)",
    "OVFAST_TP_JOIN_TIMEOUT_S": "seconds tensor-parallel workers get to start and meet (default 300)",
    "OVFAST_CACHE": "cache directory of the demo and bench checkpoints and the compiled CPU kernels (default ~/.cache/ovfast)",
    "OVFAST_API_KEY": "the key `ovfast serve` requires when --api-key is not given",
    "RANK": "torchrun: this process's rank",
    "WORLD_SIZE": "torchrun: the number of ranks",
    "MASTER_ADDR": "torchrun: the rendezvous host (its presence marks a torchrun start)",
    "LOCAL_RANK": "torchrun: the rank on this node, i.e. its GPU (default RANK)",
    "GLOO_SOCKET_IFNAME": "network interface(s) of gloo groups (default: loopback for ranks ovfast starts)",
    "NCCL_SOCKET_IFNAME": "NCCL's socket interface (default: loopback for ranks ovfast starts)",
    "CUDA_VISIBLE_DEVICES": "the GPUs torch may see; quoted when none are visible",
    "TRITON_INTERPRET": "1 runs the Triton kernels in Triton's CPU interpreter (tests); read at import",
}


def _get(name: str) -> str | None:
    return os.environ.get(name)


def _malformed(name: str, value: str, expected: str) -> ConfigError:
    return ConfigError(f"environment variable {name}={value!r}: expected {expected}")


def _off_if_zero(name: str) -> bool:
    """True unless the variable is exactly "0" (unset, empty or anything else: on)."""
    return _get(name) != "0"


def _mode(name: str, modes: tuple[str, ...]) -> str:
    raw = _get(name)
    value = modes[0] if raw is None else raw.lower()
    if value not in modes:
        raise _malformed(name, raw, "one of " + ", ".join(modes))
    return value


def _seconds(name: str, default: float) -> float:
    raw = _get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _malformed(name, raw, "a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise _malformed(name, raw, "a positive, finite number of seconds")
    return value


def _int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise _malformed(name, raw, "an integer") from None


# --- kernels ---------------------------------------------------------------------------------------


def kernels() -> str:
    """OVFAST_KERNELS: the kernel mode at start-up, one of KERNEL_MODES (default "auto")."""
    return _mode("OVFAST_KERNELS", KERNEL_MODES)


def attention() -> str:
    """OVFAST_ATTENTION: the attention backend at start-up, one of ATTENTION_MODES (default "auto")."""
    return _mode("OVFAST_ATTENTION", ATTENTION_MODES)


def cuda_graphs() -> bool:
    """OVFAST_CUDA_GRAPHS: whether the decode step may be captured as CUDA graphs ("0": no)."""
    return _off_if_zero("OVFAST_CUDA_GRAPHS")


def triton_interpret() -> bool:
    """TRITON_INTERPRET: whether Triton runs kernels in its interpreter (set, and neither "" nor "0")."""
    return _get("TRITON_INTERPRET") not in (None, "", "0")


def cpu_kernels() -> bool:
    """OVFAST_CPU_KERNELS: whether CPU tensors may use ovfast's compiled CPU kernels ("0": plain torch)."""
    return _off_if_zero("OVFAST_CPU_KERNELS")


def _mib(name: str, default: int) -> int:
    raw = _get(name)
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()):
        raise _malformed(name, raw, "a whole number of MiB (0: off)")
    return int(raw)


def cpu_block_cache_mb() -> int:
    """OVFAST_CPU_BLOCK_CACHE_MB: how much freed large-tensor memory a CPU engine keeps for reuse
    (ovfast/ops/cpu_block_cache.cpp); 0 leaves torch's CPU allocator alone. Default 2048."""
    return _mib("OVFAST_CPU_BLOCK_CACHE_MB", 2048)


def cpu_packed_weights_mb() -> int:
    """OVFAST_CPU_PACKED_WEIGHTS_MB: how much memory a CPU engine may spend on oneDNN's blocked
    copies of its prompt GEMMs' weights (vision first, then the decoder's layers); 0: none, the
    GEMMs read the weights as loaded. Default 4096."""
    return _mib("OVFAST_CPU_PACKED_WEIGHTS_MB", 4096)


# --- preprocessing ---------------------------------------------------------------------------------


def native() -> bool:
    """OVFAST_NATIVE: whether preprocessing may use ovfast._C ("0": the pure-Python path)."""
    return _off_if_zero("OVFAST_NATIVE")


def preprocess_threads() -> int | None:
    """OVFAST_PREPROCESS_THREADS: the native preprocessing's thread count; None (unset or empty)
    means the caller's default."""
    raw = _get("OVFAST_PREPROCESS_THREADS")
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise _malformed("OVFAST_PREPROCESS_THREADS", raw, "a positive integer")
    return int(raw)


# --- tensor parallelism ----------------------------------------------------------------------------


def tp_timeout_s() -> float:
    """OVFAST_TP_TIMEOUT_S: seconds a tensor-parallel data collective may wait (default 600)."""
    return _seconds("OVFAST_TP_TIMEOUT_S", 600.0)


def tp_join_timeout_s() -> float:
    """OVFAST_TP_JOIN_TIMEOUT_S: seconds for tensor-parallel workers to start and join (default 300)."""
    return _seconds("OVFAST_TP_JOIN_TIMEOUT_S", 300.0)


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when a launcher such as torchrun started this process (RANK,
    WORLD_SIZE and MASTER_ADDR all set), else None. The local rank is LOCAL_RANK, default RANK."""
    if any(_get(name) is None for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR")):
        return None
    rank, world = _int("RANK", _get("RANK")), _int("WORLD_SIZE", _get("WORLD_SIZE"))
    local = _get("LOCAL_RANK")
    return rank, world, rank if local is None else _int("LOCAL_RANK", local)


def gloo_socket_ifname() -> list[str] | None:
    """GLOO_SOCKET_IFNAME: the interfaces gloo groups use (comma-separated), or None when unset.
    As torch's own reading, a value shorter than two characters counts as unset."""
    raw = _get("GLOO_SOCKET_IFNAME")
    if raw is None or len(raw) < 2:
        return None
    return [name for name in raw.split(",") if name] or None


def nccl_socket_ifname() -> str | None:
    """NCCL_SOCKET_IFNAME as set (NCCL itself parses it), or None."""
    return _get("NCCL_SOCKET_IFNAME")


def default_nccl_socket_ifname(interface: str) -> None:
    """Set NCCL_SOCKET_IFNAME to ``interface`` unless it is set already: the one write to
    ``os.environ`` in ovfast. NCCL takes its socket interface from the environment only (no field of
    ``ProcessGroupNCCL.Options`` / ``ncclConfig_t`` names one) and reads it once, when the process
    creates its first communicator; so call this only just before that point (tensor_parallel.join,
    before init_process_group). Once set, later calls change nothing."""
    os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)


# --- other -----------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """OVFAST_CACHE: where the demo and bench keep the checkpoints they build and the CPU kernels are
    compiled to (default ~/.cache/ovfast)."""
    raw = _get("OVFAST_CACHE")
    return Path(raw) if raw is not None else Path.home() / ".cache" / "ovfast"


def api_key() -> str | None:
    """OVFAST_API_KEY: the bearer key `ovfast serve` requires when --api-key is not given."""
    return _get("OVFAST_API_KEY")


def cuda_visible_devices() -> str | None:
    """CUDA_VISIBLE_DEVICES as set (torch and the driver parse it), or None; quoted in error messages."""
    return _get("CUDA_VISIBLE_DEVICES")


def child_env(extra: Mapping[str, str] | None = None, *, defaults: Mapping[str, str] | None = None) -> dict[str, str]:
    """A new environment for a child process: this process's variables over ``defaults``, under
    ``extra``. ``os.environ`` itself is not touched."""
    return {**(defaults or {}), **os.environ, **(extra or {})}


def describe() -> dict[str, tuple[str | None, str]]:
    """{variable: (its value now, or None when unset; what it means)} for every variable ovfast
    reads; OVFAST_API_KEY's value shows as "<set>", never the key."""
    out = {}
    for name, meaning in _MEANINGS.items():
        value = _get(name)
        if name == "OVFAST_API_KEY" and value is not None:
            value = "<set>"
        out[name] = (value, meaning)
    return out
