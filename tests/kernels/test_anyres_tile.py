"""ovfast.kernels' device tiling against Pillow (PIL.Image.resize) and ovfast.preprocess, bit for bit.

Under the interpreter a 2304x2304 canvas (37 tiles, the most one image makes) costs tens of
seconds, so CI runs one such case; the 4000 px sources run on the GPU marker only.
"""
from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from ovfast.kernels import anyres_tile, pad_square_tile, squash_tiles
from vision_checks import DEVICE, assert_exact

from ovfast.checkpoint.config import ModelConfig
from ovfast.inputs import anyres, processing
from ovfast.inputs.resample import horizontal_first
from ovfast.testing.random_checkpoint import build_config

MODEL = ModelConfig.from_dict(build_config("tiny"))  # 384 px tiles, the 36 OneVision pinpoints
PROC = processing.ProcessingConfig()

# (h, w): tiny (under one 14 px patch), extreme aspect ratios (1x6 and 6x1 grids), the usual
# photos, the radar test image (3x3), and 2000x2000 (the 2304x2304 canvas: 37 tiles).
SIZES = [(1, 1), (7, 5), (13, 13), (13, 2000), (2000, 13), (50, 60), (480, 640), (333, 1001), (899, 1024),
         (2000, 2000)]
GPU_SIZES = [(4000, 3000), (3000, 4000), (1080, 1920), (1153, 946), (2304, 2304), (4000, 13)]


def _image(h, w, seed=0):
    return np.random.default_rng(seed + h * 7 + w).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _on_device(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).to(DEVICE)


def _chw(tiles: np.ndarray) -> torch.Tensor:
    """The CPU path's (n, T, T, 3) tiles as the kernels lay them out: (n, 3, T, T)."""
    return torch.from_numpy(np.ascontiguousarray(tiles.transpose(0, 3, 1, 2)))


def _anyres_on_device(img: np.ndarray) -> torch.Tensor:
    h, w = img.shape[:2]
    layout = anyres.anyres_layout(h, w, MODEL.grid_pinpoints, 384, 27, 9)
    new_h, new_w = anyres.fit_in_canvas(h, w, *layout["canvas"])
    return anyres_tile(_on_device(img), *layout["grid"], new_h, new_w).cpu()


@pytest.mark.parametrize("h,w", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_anyres_tiles_equal_the_processor(h, w):
    img = _image(h, w)
    assert_exact(_anyres_on_device(img), _chw(processing.anyres_tiles(img, MODEL, PROC).tiles), f"{h}x{w}")


@pytest.mark.gpu
@pytest.mark.parametrize("h,w", GPU_SIZES, ids=[f"{h}x{w}" for h, w in GPU_SIZES])
def test_anyres_tiles_equal_the_processor_large_sources(h, w):
    img = _image(h, w)
    assert_exact(_anyres_on_device(img), _chw(processing.anyres_tiles(img, MODEL, PROC).tiles), f"{h}x{w}")


# (h, w, new_h, new_w, grid_h, grid_w, pad): explicit geometry, both of Pillow 13's pass orders
# (900x400 -> 384x171 runs the vertical pass first), a non-zero pad value.
GEOMETRIES = [(900, 400, 384, 171, 1, 1, 17), (300, 17, 384, 22, 1, 2, 255), (640, 480, 700, 500, 2, 2, 0)]


@pytest.mark.parametrize("h,w,new_h,new_w,gh,gw,pad", GEOMETRIES)
def test_canvas_matches_pillow_resize_and_padding(h, w, new_h, new_w, gh, gw, pad):
    img = _image(h, w, seed=1)
    tiles = anyres_tile(_on_device(img), gh, gw, new_h, new_w, tile=384, pad_value=pad).cpu()
    canvas = tiles[1:].view(gh, gw, 3, 384, 384).permute(0, 3, 1, 4, 2).reshape(gh * 384, gw * 384, 3)
    top, left = (gh * 384 - new_h) // 2, (gw * 384 - new_w) // 2
    resized = np.array(PIL.Image.fromarray(img).resize((new_w, new_h), PIL.Image.Resampling.BICUBIC))
    assert_exact(canvas[top : top + new_h, left : left + new_w], torch.from_numpy(resized), "canvas")
    padding = torch.ones(canvas.shape[:2], dtype=torch.bool)
    padding[top : top + new_h, left : left + new_w] = False
    assert bool((canvas[padding] == pad).all())
    base = np.asarray(PIL.Image.fromarray(img).resize((384, 384), PIL.Image.Resampling.BICUBIC))
    assert_exact(tiles[0], _chw(base[None])[0], "base")


def test_geometries_cover_both_pass_orders():
    assert {horizontal_first(h, w, nh, nw) for h, w, nh, nw, *_ in GEOMETRIES} == {True, False} or PIL.__version__ < "13"


@pytest.mark.parametrize("h,w", [(300, 500), (500, 300), (64, 64), (1, 40), (2000, 13)])
def test_padded_square_equals_the_processor(h, w):
    img = _image(h, w, seed=2)
    assert_exact(pad_square_tile(_on_device(img)).cpu(), _chw(processing.padded_square_tile(img, MODEL, PROC).tiles))


def test_padded_square_fill_per_channel():
    proc = processing.ProcessingConfig(mean=(0.2, 0.5, 0.8))
    img = _image(120, 45, seed=3)
    want = _chw(processing.padded_square_tile(img, MODEL, proc).tiles)
    assert_exact(pad_square_tile(_on_device(img), fill=proc.pad_fill).cpu(), want)


@pytest.mark.parametrize("tile", [384, 70])
def test_video_frames_equal_the_processor(tile):
    proc = processing.ProcessingConfig(tile=tile)
    frames = np.stack([_image(180, 320, seed=i) for i in range(3)])  # (F, H, W, 3)
    want = _chw(processing.video_tiles(list(frames), MODEL, proc).tiles)
    assert_exact(squash_tiles(_on_device(frames), tile).cpu(), want)


def test_video_frames_of_different_sizes():
    frames = [_image(*s, seed=4) for s in [(20, 30), (200, 100), (1, 1), (384, 384)]]
    want = _chw(processing.video_tiles(frames, MODEL, PROC).tiles)
    assert_exact(squash_tiles([_on_device(f) for f in frames]).cpu(), want)


def test_rejects_a_resized_image_larger_than_its_canvas():
    with pytest.raises(ValueError, match="does not fit"):
        anyres_tile(_on_device(_image(10, 10)), 1, 1, 385, 100)
