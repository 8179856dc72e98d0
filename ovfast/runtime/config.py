"""``EngineConfig``: the one list of engine options.

``ovfast.load(model, **options)`` takes exactly these fields (plus ``weights=``), the server and
the CLI build them from their flags, and nothing else holds a default of its own. Environment
variables (``ovfast.settings.environment``) only fill the fields left at ``None``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import ConfigError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

_POSITIVE = ("max_batch_size", "max_images", "max_video_frames", "vision_chunk", "max_queue",
             "preprocess_workers", "tensor_parallel_size")


@dataclass(frozen=True)
class EngineConfig:
    device: str | int | torch.device | None = None  # None: CUDA when a GPU is visible, else the CPU
    dtype: str | torch.dtype | None = None  # None: bfloat16 on a GPU, float32 on the CPU
    semantics: str | None = None  # "original" or "transformers"; None: the checkpoint family's own
    max_batch_size: int = 4  # KV-cache slots: requests decoded together
    max_seq_len: int | None = None  # per slot; None: min(16384, the model's max positions)
    max_images: int = 16  # images in one request
    max_video_frames: int = 64  # video frames in one request (all videos)
    vision_chunk: int = 16  # tiles through the vision tower per loop turn (one piece of a request's vision)
    max_queue: int = 256  # requests accepted but not yet running; beyond: EngineOverloadedError
    prefill_chunk: int | None = None  # prompt tokens per loop turn, between decode steps; None: 1024 on a GPU, 4096 on a CPU
    preprocess_workers: int = 2  # threads decoding and tiling media
    max_prepared: int | None = None  # preprocessed requests holding pixels before admission; None: 2 x slots
    tensor_parallel_size: int = 1  # ranks the decoder is cut across (one GPU each, or CPU processes)
    cuda_graphs: bool | None = None  # capture the decode steps as CUDA graphs; None: OVFAST_CUDA_GRAPHS (on)
    kv_cache_tokens: int | None = None  # KV-cache budget in positions; None: from free GPU memory, or a CPU bound
    kv_block_size: int | None = None  # positions per KV page; None: 256 where flash-attn runs, else 16
    gpu_memory_utilization: float = 0.9  # fraction of the GPU's memory the engine may fill (weights, cache, graphs)
    prefix_caching: bool = True  # reuse the KV of earlier requests' identical prefixes (media included)
    encoder_cache_tokens: int = 16384  # vision features kept by media hash, in feature rows; 0: off

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, options: dict) -> "EngineConfig":
        """A checked config from keyword options; ConfigError naming any unknown one."""
        unknown = sorted(set(options) - set(cls.fields()))
        if unknown:
            raise ConfigError(f"unknown engine option(s) {unknown}; known: {list(cls.fields())}")
        config = cls(**options)
        config.check()
        return config

    def check(self) -> None:
        for name in _POSITIVE:
            _positive(name, getattr(self, name))
        for name in ("max_seq_len", "max_prepared", "prefill_chunk"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        for name in ("kv_cache_tokens", "kv_block_size"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.kv_block_size is not None and self.kv_block_size & (self.kv_block_size - 1):
            raise ConfigError(f"kv_block_size must be a power of two, got {self.kv_block_size}")
        if isinstance(self.encoder_cache_tokens, bool) or not isinstance(self.encoder_cache_tokens, int) \
                or self.encoder_cache_tokens < 0:
            raise ConfigError(f"encoder_cache_tokens must be an integer >= 0, got {self.encoder_cache_tokens!r}")
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {u!r}")
        if not isinstance(self.prefix_caching, bool):
            raise ConfigError(f"prefix_caching must be True or False, got {self.prefix_caching!r}")
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise ConfigError(f"cuda_graphs must be True, False or None, got {self.cuda_graphs!r}")

    @property
    def prepared_limit(self) -> int:
        return self.max_prepared or 2 * self.max_batch_size


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def resolve_prefill_chunk(chunk: int | None, device: torch.device) -> int:
    """A CPU prefills a 3k-token image prompt about a third slower in 1024-token chunks than in
    one piece (each later chunk attends to the cached ones through a mask, with no causal
    skipping): there chunks are 4096 tokens, fewer stalls bought with longer ones."""
    if chunk is not None:
        return chunk
    return 4096 if device.type == "cpu" else 1024


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ConfigError(f"unknown dtype {dtype!r}; use 'float32', 'bfloat16' or 'float16'")
