"""Preprocessing on the model's device: uint8 pixels in, uint8 tiles and the folded normalisation out.

The GPU twin of ``ovfast.preprocess``: a request's pixels go to the device once, as uint8, the
Triton kernels of ``ovfast.kernels.anyres`` cut them into tiles (Pillow BICUBIC, bit for bit),
and ``patch_embed`` applies the normalisation as a per-channel ``x * scale + shift`` while it
gathers the patches. The CPU path (``processing`` tiles, ``PixelNormalizer`` table) stays the
bit-exact reference; ``x * scale + shift`` in fp32 can differ from the table by a few ulps of
the larger term (nothing after the cast to bf16).
"""
from __future__ import annotations

import PIL.Image
import torch

from ..checkpoint.config import ModelConfig
from ..errors import ConfigError
from . import anyres
from .processing import ProcessingConfig


def device_tiles(pixels: torch.Tensor | list[torch.Tensor], kind: str, model: ModelConfig,
                 proc: ProcessingConfig) -> torch.Tensor:
    """uint8 tiles (n, 3, T, T) on ``pixels``' device for one visual item.

    ``pixels``: an (H, W, 3) uint8 image for ``kind`` "image" (alone in its prompt: anyres) or
    "image_multi" (one of several: padded square); for "video", its frames as an (F, H, W, 3)
    uint8 tensor or a list of (H, W, 3) ones. Equal to the ``tiles`` of
    ``processing.anyres_tiles`` / ``padded_square_tile`` / ``video_tiles``, permuted to CHW.
    """
    from .. import kernels  # Triton is imported only when device tiling is used

    if proc.resample != PIL.Image.Resampling.BICUBIC:
        raise ConfigError(f"device tiling implements Pillow's BICUBIC only, not resample={proc.resample}; "
                          "use ovfast.preprocess for this checkpoint")
    if kind == "video":
        return kernels.squash_tiles(pixels, proc.tile)
    if kind == "image_multi":
        return kernels.pad_square_tile(pixels, proc.tile, proc.pad_fill)
    if kind != "image":
        raise ValueError(f"unknown item kind {kind!r}; expected 'image', 'image_multi' or 'video'")
    h, w = pixels.shape[:2]
    layout = anyres.image_layout(h, w, model, proc.tile)
    new_h, new_w = anyres.fit_in_canvas(h, w, *layout["canvas"])
    return kernels.anyres_tile(pixels, *layout["grid"], new_h, new_w, tile=proc.tile, pad_value=0)


def pixel_affine(proc: ProcessingConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (3,) scale and shift with uint8 x * scale + shift = the processor's normalised pixels (to a few ulps)."""
    rescale = proc.rescale_factor if proc.do_rescale else 1.0
    mean, std = (proc.mean, proc.std) if proc.do_normalize else ((0.0,) * 3, (1.0,) * 3)
    # (x * rescale - mean) / std == x * (rescale / std) + (-mean / std)
    scale = [rescale / s for s in std]
    shift = [-m / s for m, s in zip(mean, std)]
    return (torch.tensor(scale, dtype=torch.float32, device=device),
            torch.tensor(shift, dtype=torch.float32, device=device))
