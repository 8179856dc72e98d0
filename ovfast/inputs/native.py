"""The native preprocessing, ovfast._C (csrc/), behind the signatures of the pure-Python path.

setup.py builds ``ovfast._C`` on install. Without it (no C++ compiler then), the first use warns
once and every caller takes the pure-Python twins in processing.py and media.py, which give the
same bytes, slower. ``OVFAST_NATIVE=0`` forces the Python path; ``OVFAST_PREPROCESS_THREADS``
sets the native thread count (default: the CPUs this process may run on).

Each function here checks nothing the caller has not checked: geometry comes from anyres.py and
the pass order from resample.horizontal_first, so the C++ code only executes a plan.
"""
from __future__ import annotations

import importlib
import os
import warnings
from contextlib import contextmanager

import numpy as np
import torch

from ..checkpoint.config import ModelConfig
from ..settings import environment
from . import anyres
from .media import Pixels
from .processing import ProcessingConfig, VisualItem, anyres_geometry, square_offsets
from .resample import horizontal_first

try:
    _C = importlib.import_module("ovfast._C")
except ImportError as e:  # built without a compiler: the pure-Python path takes over
    _C, _import_error = None, e

_ALPHA = {"pil": 0, "numpy": 1}
_off = not environment.native()
_warned = False


def _default_threads() -> int:
    threads = environment.preprocess_threads()
    if threads is not None:
        return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if _C is not None:
    _C.set_num_threads(_default_threads())


def enabled() -> bool:
    """Whether preprocessing runs natively; warns once when the extension is missing."""
    global _warned
    if _off:
        return False
    if _C is None and not _warned:
        _warned = True
        warnings.warn(f"ovfast._C is not built ({_import_error}); preprocessing falls back to the pure-Python "
                      "path (same output, slower). Reinstall ovfast with a C++ compiler to build it.", stacklevel=3)
    return _C is not None


@contextmanager
def disabled():
    """Run a block on the pure-Python path (tests and benchmarks compare the two)."""
    global _off
    previous, _off = _off, True
    try:
        yield
    finally:
        _off = previous


def to_rgb(pixels: Pixels) -> np.ndarray:
    """The twin of media.composite: (H, W, 3) uint8."""
    a = pixels.array
    return a if a.shape[-1] == 3 and a.flags.c_contiguous else _C.to_rgb(np.ascontiguousarray(a), _ALPHA[pixels.alpha])


def anyres_tiles(pixels: Pixels, model: ModelConfig, proc: ProcessingConfig) -> VisualItem:
    rgb = to_rgb(pixels)
    h, w = rgb.shape[:2]
    t = proc.tile
    layout, (new_h, new_w), (top, left) = anyres_geometry(h, w, model, proc)
    grid_h, grid_w = layout["grid"]
    tiles = np.empty((1 + grid_h * grid_w, t, t, 3), dtype=np.uint8)
    _C.anyres_tiles(rgb, tiles, grid_w, new_h, new_w, top, left,
                    horizontal_first(h, w, t, t), horizontal_first(h, w, new_h, new_w))
    return VisualItem("image", tiles, layout["num_tokens"], (h, w), layout=layout)


def padded_square_tile(pixels: Pixels, model: ModelConfig, proc: ProcessingConfig) -> VisualItem:
    rgb = to_rgb(pixels)
    side, top, left = square_offsets(*rgb.shape[:2])
    t = proc.tile
    tiles = np.empty((1, t, t, 3), dtype=np.uint8)
    _C.padded_square_tile(rgb, tiles[0], proc.pad_fill, side, top, left, horizontal_first(side, side, t, t))
    return VisualItem("image_multi", tiles, anyres.multi_image_num_tokens(model.vision.grid))


def video_tiles(frames: list[Pixels], model: ModelConfig, proc: ProcessingConfig) -> VisualItem:
    rgb = [to_rgb(f) for f in frames]
    t = proc.tile
    tiles = np.empty((len(rgb), t, t, 3), dtype=np.uint8)
    _C.squash_frames(rgb, tiles, [horizontal_first(*f.shape[:2], t, t) for f in rgb])
    return VisualItem("video", tiles, anyres.video_num_tokens(len(rgb), model.vision.grid))


def normalize(tiles: np.ndarray, table: torch.Tensor, out: torch.Tensor) -> None:
    """out (N, 3, T, T) = table[c, tiles (N, T, T, 3)]; ``table`` (3, 256) already in out's dtype."""
    bits = torch.int16 if out.element_size() == 2 else torch.int32
    _C.normalize(tiles, table.contiguous().view(bits).numpy(), out.view(bits).numpy())
