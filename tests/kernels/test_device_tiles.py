"""ovfast.inputs.device_tiles (the engine's device-side preprocessing) against the CPU path of ovfast.preprocess."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from vision_checks import DEVICE, assert_exact

from ovfast.checkpoint.config import ModelConfig
from ovfast.errors import ConfigError
from ovfast.inputs import processing
from ovfast.inputs.device_tiles import device_tiles, pixel_affine
from ovfast.testing.random_checkpoint import build_config

OV = (ModelConfig.from_dict(build_config("tiny")), processing.ProcessingConfig())
# A 70 px tile with 14 px patches (5x5 grid) and pinpoints of 70 px multiples: nothing assumes 384.
SMALL = (ModelConfig.from_dict(build_config("tiny", vision=dict(image_size=70, patch_size=14))),
         processing.ProcessingConfig(tile=70))


def _image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _chw(item: processing.VisualItem) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(item.tiles.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("config", [OV, SMALL], ids=["384px", "70px"])
@pytest.mark.parametrize("h,w", [(480, 640), (45, 300), (9, 4)])
def test_images_equal_the_cpu_tiles(config, h, w):
    model, proc = config
    img = _image(h, w, seed=h + w)
    on_device = torch.from_numpy(img).to(DEVICE)
    assert_exact(device_tiles(on_device, "image", model, proc).cpu(), _chw(processing.anyres_tiles(img, model, proc)))
    assert_exact(device_tiles(on_device, "image_multi", model, proc).cpu(),
                 _chw(processing.padded_square_tile(img, model, proc)))


@pytest.mark.parametrize("config", [OV, SMALL], ids=["384px", "70px"])
def test_video_equals_the_cpu_tiles(config):
    model, proc = config
    frames = [_image(90, 160, seed=i) for i in range(4)]
    want = _chw(processing.video_tiles(frames, model, proc))
    stacked = torch.from_numpy(np.stack(frames)).to(DEVICE)
    assert_exact(device_tiles(stacked, "video", model, proc).cpu(), want)


def test_pixel_affine_matches_the_normaliser_to_a_few_ulps():
    """x * scale + shift (fp32) against PixelNormalizer's exact table, for every byte value: the two
    roundings of the affine differ from the table's (x * rescale - mean) / std by a few ulps of
    the larger term (so near 0, after cancellation, by more of the result's own)."""
    for proc in (processing.ProcessingConfig(), processing.ProcessingConfig(mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28)),
                 processing.ProcessingConfig(do_normalize=False)):
        values = torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1).expand(1, 1, 256, 3).contiguous()
        table = processing.PixelNormalizer(proc)(values)[0, :, 0, :]  # (3, 256)
        scale, shift = pixel_affine(proc, torch.device("cpu"))
        product = torch.arange(256).float()[None, :] * scale[:, None]
        affine = product + shift[:, None]
        bound = 4 * torch.finfo(torch.float32).eps * (product.abs() + shift.abs()[:, None])
        assert bool(((affine - table).abs() <= bound).all())


def test_other_resampling_filters_are_refused():
    model, _ = OV
    with pytest.raises(ConfigError, match="BICUBIC"):
        device_tiles(torch.zeros(4, 4, 3, dtype=torch.uint8), "image", model, processing.ProcessingConfig(resample=2))
