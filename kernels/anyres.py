"""Image and video tiling on the device: uint8 RGB in, the processor's uint8 384x384 tiles out.

Each function equals ``ovfast.preprocess`` (Pillow BICUBIC, bit for bit) with the tiles in CHW
order, ready for ``patch_embed`` (which folds the normalisation in):

* ``anyres_tile``: one image alone in its prompt (docs/reference-behaviour.md section 3.1): tile 0 is the image
  squashed to tile x tile; tiles 1.. are the row-major crops of the (grid_h * tile, grid_w * tile)
  canvas holding the image resized to (new_h, new_w), centred, padded with ``pad_value``;
* ``pad_square_tile``: one of several images (section 3.2): centred on a square of ``fill``,
  then squashed to one tile;
* ``squash_tiles``: video frames (section 3.3), each squashed to one tile.

All resizes of a call run as two launches (``pillow_resize``): one per separable pass.
Exact: tests compare with PIL.Image.resize and with ``ovfast.preprocess``.
"""
from __future__ import annotations

import torch

from ovfast.inputs.anyres import centred_padding

from ._runtime import check_tensor
from .pillow_resize import Resize, resize_into_tiles


def _check_image(name: str, image: torch.Tensor) -> tuple[int, int]:
    check_tensor(name, image, ndim=3, dtypes=(torch.uint8,))
    h, w, c = image.shape
    if c != 3 or h < 1 or w < 1:
        raise ValueError(f"{name} must be a non-empty (H, W, 3) RGB image, got shape {tuple(image.shape)}")
    return h, w


def _tiles(n: int, tile: int, device: torch.device) -> torch.Tensor:
    if tile < 1:
        raise ValueError(f"tile must be positive, got {tile}")
    return torch.empty((n, 3, tile, tile), dtype=torch.uint8, device=device)  # every byte is written


def anyres_tile(image: torch.Tensor, grid_h: int, grid_w: int, new_h: int, new_w: int, tile: int = 384,
                pad_value: int = 0) -> torch.Tensor:
    """image (H, W, 3) uint8 -> (1 + grid_h * grid_w, 3, tile, tile) uint8: base tile, then the canvas crops."""
    h, w = _check_image("image", image)
    canvas_h, canvas_w = grid_h * tile, grid_w * tile
    if not (0 < new_h <= canvas_h and 0 < new_w <= canvas_w):
        raise ValueError(f"resized image {new_h}x{new_w} does not fit the {canvas_h}x{canvas_w} canvas")
    if not 0 <= pad_value <= 255:
        raise ValueError(f"pad_value must be a byte, got {pad_value}")
    top, _ = centred_padding(new_h, canvas_h)
    left, _ = centred_padding(new_w, canvas_w)
    jobs = [
        Resize(0, h, w, tile, tile, first_tile=0),
        Resize(0, h, w, new_h, new_w, first_tile=1, canvas=(canvas_h, canvas_w), offset=(top, left),
               canvas_fill=pad_value),
    ]
    return resize_into_tiles(image.contiguous().view(-1), jobs, _tiles(1 + grid_h * grid_w, tile, image.device))


def pad_square_tile(image: torch.Tensor, tile: int = 384, fill: tuple[int, int, int] = (127, 127, 127)) -> torch.Tensor:
    """image (H, W, 3) uint8 -> (1, 3, tile, tile) uint8: centred on a ``fill`` square, then squashed."""
    h, w = _check_image("image", image)
    if len(fill) != 3 or not all(0 <= v <= 255 for v in fill):
        raise ValueError(f"fill must be three bytes, got {fill}")
    job = Resize(0, h, w, tile, tile, first_tile=0, square=True, square_fill=tuple(int(v) for v in fill))
    return resize_into_tiles(image.contiguous().view(-1), [job], _tiles(1, tile, image.device))


def squash_tiles(frames: torch.Tensor | list[torch.Tensor], tile: int = 384) -> torch.Tensor:
    """frames (F, H, W, 3) uint8, or a list of (H, W, 3) uint8 frames of any sizes -> (F, 3, tile, tile) uint8."""
    if isinstance(frames, torch.Tensor):
        check_tensor("frames", frames, ndim=4, dtypes=(torch.uint8,))
        sizes = [_check_image("frames[0]", frames[0])] * frames.shape[0] if frames.shape[0] else []
        src = frames.contiguous().view(-1)  # (F * H * W * 3,)
    else:
        sizes = [_check_image(f"frames[{i}]", f) for i, f in enumerate(frames)]
        # Frames of different sizes: gathered into one buffer, so each pass stays one launch.
        src = torch.cat([f.contiguous().view(-1) for f in frames]) if frames else None
    if not sizes:
        raise ValueError("no frames to tile")
    jobs, offset = [], 0
    for i, (h, w) in enumerate(sizes):
        jobs.append(Resize(offset, h, w, tile, tile, first_tile=i))
        offset += h * w * 3
    return resize_into_tiles(src, jobs, _tiles(len(sizes), tile, src.device))
