"""Image and video preprocessing: RGB uint8 in, uint8 384x384 tiles out (docs/reference-behaviour.md section 3).

Resizing is Pillow's BICUBIC, as transformers' PIL backend (``LlavaOnevisionImageProcessorPil``)
does it, so the tiles are bit-identical to what that processor resizes. Tiles stay uint8 until
they reach the model's device, where ``PixelNormalizer`` turns them into normalised pixels with
a 256-entry table per channel that reproduces the processor's float arithmetic exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from ..checkpoint.config import ModelConfig
from ..errors import ConfigError
from . import anyres


@dataclass(frozen=True)
class ProcessingConfig:
    """The parts of preprocessor_config.json the model depends on."""

    tile: int = 384
    resample: int = PIL.Image.Resampling.BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_dict(cls, d: dict, model: ModelConfig) -> "ProcessingConfig":
        size = d.get("size", {"height": model.vision.image_size, "width": model.vision.image_size})
        tile = size.get("height", size.get("shortest_edge"))
        if tile != size.get("width", tile) or tile != model.vision.image_size:
            raise ConfigError(f"preprocessor size {size} does not match the vision tower's {model.vision.image_size}px input")
        pins = d.get("image_grid_pinpoints")
        if pins is not None and tuple(tuple(p) for p in pins) != model.grid_pinpoints:
            raise ConfigError("image_grid_pinpoints differ between preprocessor_config.json and config.json")
        mean, std = d.get("image_mean", cls.mean), d.get("image_std", cls.std)
        mean = tuple(mean) if isinstance(mean, (list, tuple)) else (mean,) * 3
        std = tuple(std) if isinstance(std, (list, tuple)) else (std,) * 3
        if d.get("resample", 3) not in (0, 1, 2, 3, 4, 5):
            raise ConfigError(f"unknown resample filter {d.get('resample')!r}")
        return cls(
            tile=int(tile),
            resample=int(d.get("resample", 3)),
            do_rescale=bool(d.get("do_rescale", True)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            do_normalize=bool(d.get("do_normalize", True)),
            mean=mean,
            std=std,
        )

    @property
    def pad_fill(self) -> tuple[int, int, int]:
        """Pad colour of several-image squares: the mean colour, int(0.5 * 255) = 127 for OneVision."""
        return tuple(int(m * 255) for m in self.mean)


@dataclass
class VisualItem:
    """One image or video of a request, tiled (or to be tiled on the device) and counted."""

    kind: str  # "image" (alone in its prompt: anyres), "image_multi" (one of several: padded square), "video"
    tiles: np.ndarray | None  # (n, tile, tile, 3) uint8; None when the device tiles ``rgb``
    num_tokens: int
    image_size: tuple[int, int] | None = None  # (h, w) of an anyres image
    rgb: list[np.ndarray] | None = None  # device tiling: the (H, W, 3) uint8 image, or a video's frames
    layout: dict | None = None  # an anyres image's ``anyres.anyres_layout``: the model packs its features by it
    key: bytes = b""  # identity of its content and of everything that shapes its tokens (``media_key``)


def resize(rgb: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Pillow resize of an (H, W, 3) uint8 array (Pillow returns an exact copy when the size is unchanged)."""
    return np.asarray(PIL.Image.fromarray(rgb).resize((width, height), resample=resample))


def anyres_geometry(h: int, w: int, model: ModelConfig, proc: ProcessingConfig) -> tuple[dict, tuple[int, int], tuple[int, int]]:
    """(anyres layout, resized (new_h, new_w), its (top, left) on the canvas) of an h x w image."""
    layout = anyres.image_layout(h, w, model, proc.tile)
    canvas_h, canvas_w = layout["canvas"]
    new_h, new_w = anyres.fit_in_canvas(h, w, canvas_h, canvas_w)
    top, _ = anyres.centred_padding(new_h, canvas_h)
    left, _ = anyres.centred_padding(new_w, canvas_w)
    return layout, (new_h, new_w), (top, left)


def anyres_tiles(rgb: np.ndarray, model: ModelConfig, proc: ProcessingConfig) -> VisualItem:
    """A single image: the base tile (whole image squashed) then the canvas tiles, row-major."""
    h, w = rgb.shape[:2]
    t = proc.tile
    layout, (new_h, new_w), (top, left) = anyres_geometry(h, w, model, proc)
    canvas_h, canvas_w = layout["canvas"]
    grid_h, grid_w = layout["grid"]
    tiles = np.zeros((1 + grid_h * grid_w, t, t, 3), dtype=np.uint8)
    tiles[0] = resize(rgb, t, t, proc.resample)
    canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)
    canvas[top : top + new_h, left : left + new_w] = resize(rgb, new_h, new_w, proc.resample)
    tiles[1:] = canvas.reshape(grid_h, t, grid_w, t, 3).transpose(0, 2, 1, 3, 4).reshape(-1, t, t, 3)
    return VisualItem("image", tiles, layout["num_tokens"], (h, w), layout=layout)


def square_offsets(h: int, w: int) -> tuple[int, int, int]:
    """(side, top, left) of an h x w image centred on its padded square."""
    side = max(h, w)
    return side, anyres.centred_padding(h, side)[0], anyres.centred_padding(w, side)[0]


def padded_square_tile(rgb: np.ndarray, model: ModelConfig, proc: ProcessingConfig) -> VisualItem:
    """One of several images: centred on a square of the mean colour, then squashed to one tile."""
    h, w = rgb.shape[:2]
    if h != w:
        side, top, left = square_offsets(h, w)
        square = np.empty((side, side, 3), dtype=np.uint8)
        square[:] = proc.pad_fill
        square[top : top + h, left : left + w] = rgb
        rgb = square
    tiles = resize(rgb, proc.tile, proc.tile, proc.resample)[None].copy()  # Pillow's buffer is read-only
    return VisualItem("image_multi", tiles, anyres.multi_image_num_tokens(model.vision.grid))


def video_tiles(frames: list[np.ndarray], model: ModelConfig, proc: ProcessingConfig) -> VisualItem:
    """A video: every frame squashed to one tile (aspect ratio not kept, no padding)."""
    tiles = np.stack([resize(f, proc.tile, proc.tile, proc.resample) for f in frames])
    return VisualItem("video", tiles, anyres.video_num_tokens(len(frames), model.vision.grid))


class PixelNormalizer:
    """uint8 tiles (N, T, T, 3) -> normalised pixels (N, 3, T, T) on the tiles' device.

    The table holds, for each channel and byte value, exactly what the PIL processor computes:
    float32(float64(x) * rescale_factor), then (x - mean) / std in float32.
    """

    def __init__(self, proc: ProcessingConfig):
        x = np.arange(256, dtype=np.float64)
        x = (x * proc.rescale_factor).astype(np.float32) if proc.do_rescale else x.astype(np.float32)
        if proc.do_normalize:
            mean = np.asarray(proc.mean, dtype=np.float32)[:, None]
            std = np.asarray(proc.std, dtype=np.float32)[:, None]
            table = (x[None, :] - mean) / std
        else:
            table = np.broadcast_to(x, (3, 256))
        self._table = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))  # (3, 256)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def table(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (3, 256) table in ``dtype``: what the float32 result rounds to (round to nearest even)."""
        return self._table.to(dtype)

    def __call__(self, tiles: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        table = self._on_device.get(tiles.device)
        if table is None:
            table = self._on_device[tiles.device] = self._table.to(tiles.device)
        n, t_h, t_w, _ = tiles.shape
        out = torch.empty((n, 3, t_h, t_w), dtype=dtype, device=tiles.device)
        for c in range(3):  # one channel at a time keeps the int64 index small
            out[:, c] = table[c][tiles[..., c].long()]
        return out
