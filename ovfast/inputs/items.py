"""From request items to tiles and normalised pixel values, natively when ovfast._C is built.

``tile_item`` is what the request builder runs for each image or video: the native path
(csrc/, through native.py) by default, the pure-Python path (processing.py) as its fallback and
test oracle; both give the same uint8 tiles. ``pixel_values`` adds the normalisation into one
contiguous, optionally pinned, (N, 3, T, T) buffer: it is ``ovfast.preprocess`` and
``Engine.preprocess``.
"""
from __future__ import annotations

import functools

import PIL.Image
import torch

from . import anyres, native
from .config import ModelConfig
from .errors import UnsupportedInputError
from .media import Pixels, Video, as_items, composite, decode
from .processing import (
    PixelNormalizer, ProcessingConfig, VisualItem, anyres_tiles, padded_square_tile, video_tiles,
)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def decode_item(item) -> Pixels | Video:
    """An image decoded to its pixels; a video stays as it is (its frames decode when tiled)."""
    return item if isinstance(item, Video) else decode(item)


def tile_item(item: Pixels | Video, n_images: int, model: ModelConfig, proc: ProcessingConfig) -> VisualItem:
    """Tiles of one item with the engine's semantics: a lone image is anyres, one of several a
    padded square, a video one squashed tile per frame."""
    fast = proc.resample == PIL.Image.Resampling.BICUBIC and native.enabled()  # csrc/ has BICUBIC only
    if isinstance(item, Video):
        frames = item.pixel_frames()
        return native.video_tiles(frames, model, proc) if fast else video_tiles([composite(f) for f in frames], model, proc)
    if n_images > 1:
        return native.padded_square_tile(item, model, proc) if fast else padded_square_tile(composite(item), model, proc)
    return native.anyres_tiles(item, model, proc) if fast else anyres_tiles(composite(item), model, proc)


def untiled_item(item: Pixels | Video, n_images: int, model: ModelConfig) -> VisualItem:
    """An item for tiling on the device (``ovfast.device_tiles``): its RGB pixels, counted, not tiled."""
    rgb = native.to_rgb if native.enabled() else composite
    g = model.vision.grid
    if isinstance(item, Video):
        frames = [rgb(f) for f in item.pixel_frames()]
        return VisualItem("video", None, anyres.video_num_tokens(len(frames), g), rgb=frames)
    image = rgb(item)
    if n_images > 1:
        return VisualItem("image_multi", None, anyres.multi_image_num_tokens(g), rgb=[image])
    h, w = image.shape[:2]
    tokens = anyres.anyres_num_tokens(h, w, model.grid_pinpoints, model.vision.image_size, g, model.max_num_patches)
    return VisualItem("image", None, tokens, (h, w), rgb=[image])


def pixel_values(images, model: ModelConfig, proc: ProcessingConfig, normalizer: PixelNormalizer,
                 dtype: torch.dtype = torch.float32, pin_memory: bool = False) -> list[torch.Tensor]:
    """Normalised pixels per item, views of one contiguous (N, 3, T, T) buffer in item order."""
    if dtype not in _DTYPES:
        raise UnsupportedInputError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, not {dtype}")
    items = as_items(images)
    n_images = sum(not isinstance(x, Video) for x in items)
    visual = [tile_item(decode_item(x), n_images, model, proc) for x in items]
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
