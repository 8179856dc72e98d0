"""``ovfast.preprocess``: request items to normalised pixel values, as the engine feeds them to the tower.

``pixel_values`` tiles each item (``items.open_item``) and adds the normalisation into one
contiguous, optionally pinned, (N, 3, T, T) buffer; it is ``ovfast.preprocess`` and
``Engine.preprocess``.
"""
from __future__ import annotations

import functools

import torch

from ..checkpoint.config import ModelConfig
from ..errors import UnsupportedInputError
from . import native
from .items import open_item
from .media import Video, as_items
from .processing import PixelNormalizer, ProcessingConfig

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pixel_values(images, model: ModelConfig, proc: ProcessingConfig, normalizer: PixelNormalizer,
                 dtype: torch.dtype = torch.float32, pin_memory: bool = False) -> list[torch.Tensor]:
    """Normalised pixels per item, views of one contiguous (N, 3, T, T) buffer in item order."""
    if dtype not in _DTYPES:
        raise UnsupportedInputError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, not {dtype}")
    items = as_items(images)
    n_images = sum(not isinstance(x, Video) for x in items)
    visual = [open_item(x, n_images, model, proc).tile() for x in items]
    t = proc.tile
    out = torch.empty((sum(len(v.tiles) for v in visual), 3, t, t), dtype=dtype, pin_memory=pin_memory)
    table = normalizer.table(dtype)
    views, start = [], 0
    for v in visual:
        view = out[start : start + len(v.tiles)]
        if native.enabled():
            native.normalize(v.tiles, table, view)
        else:
            view.copy_(normalizer(torch.from_numpy(v.tiles), dtype))
        views.append(view)
        start += len(v.tiles)
    return views


@functools.cache
def _onevision_defaults() -> tuple[ModelConfig, ProcessingConfig, PixelNormalizer]:
    """LLaVA-OneVision's settings: 384 px tiles, the 36 default pinpoints, mean = std = 0.5, anyres_max_9."""
    proc = ProcessingConfig()
    return ModelConfig.from_dict({}), proc, PixelNormalizer(proc)


def preprocess(images, *, dtype: torch.dtype = torch.float32, engine=None, model: ModelConfig | None = None,
               processing: ProcessingConfig | None = None, pin_memory: bool = False) -> list[torch.Tensor]:
    """Normalised pixel values of each item, as the engine feeds them to the vision tower.

    ``images`` is what ``Engine.complete`` takes: an image, an ``ovfast.Video`` or a list. A lone
    image gives its anyres tiles (1 + n, 3, 384, 384), each of several images (1, 3, 384, 384),
    a video (T, 3, 384, 384). The settings are ``engine``'s, or ``model`` / ``processing``, or
    LLaVA-OneVision's defaults. Thread-safe: services call it on their own threads (the native
    path releases the GIL). ``pin_memory=True`` (needs CUDA) pins the one buffer behind the views.
    """
    if engine is not None:
        return engine.preprocess(images, dtype=dtype, pin_memory=pin_memory)
    default_model, default_proc, default_norm = _onevision_defaults()
    proc = processing or default_proc
    normalizer = default_norm if processing is None else PixelNormalizer(proc)
    return pixel_values(images, model or default_model, proc, normalizer, dtype, pin_memory)
