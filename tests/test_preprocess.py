"""Preprocessing against transformers' LlavaOnevisionImageProcessorPil: pixel values bit for bit."""
from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest
import reference as ref
import torch

import ovfast
from ovfast.inputs.media import to_rgb

# Sizes (h, w): the worked example, the radar test image, extreme aspect ratios, tiny images, the
# unpad rounding edge cases of docs/reference-behaviour.md section 12, the largest token count (1153x946) and
# canvases needing the anyres_max_9 downscale.
SIZES = [
    (480, 640), (640, 480), (899, 1024), (820, 738), (750, 1750), (47, 423), (49, 1323), (423, 47),
    (369, 820), (375, 1375), (1153, 946), (1080, 1920), (2000, 500), (13, 9), (1, 1), (384, 384), (3000, 200),
]


def _ours(engine, images) -> list[torch.Tensor]:
    req = engine.requests.prepare(images, "", True, ovfast.runtime.request.SamplingParams.make())
    return [engine.normalizer(torch.from_numpy(it.tiles)) for it in req.items]


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_single_image_pixels_bit_identical(tiny, size):
    path, engine = tiny
    image = ref.synthetic_image(*size, seed=size[0] * 7 + size[1])
    expected = ref.processor(path).image_processor(image, return_tensors="pt")
    (ours,) = _ours(engine, [image])
    assert ours.dtype == torch.float32
    assert torch.equal(ours, expected["pixel_values"][0])
    assert expected["image_sizes"][0].tolist() == list(size)


def test_several_images_are_padded_squares(tiny):
    path, engine = tiny
    images = [ref.synthetic_image(h, w, seed=h) for h, w in [(300, 500), (500, 300), (256, 256), (17, 400)]]
    expected = ref.processor(path).image_processor([images], return_tensors="pt")["pixel_values"]
    ours = _ours(engine, images)
    assert expected.shape[:2] == (4, 1)
    for i, px in enumerate(ours):
        assert torch.equal(px, expected[i])
    # The pad colour is int(0.5 * 255) = 127 before normalisation.
    assert engine.requests.prepare(images, "", True, ovfast.runtime.request.SamplingParams.make()).items[0].tiles[0, 0, 0].tolist() == [127] * 3


def test_video_frames_are_pil_bicubic_squashes(tiny):
    path, engine = tiny
    frames = ref.video_frames(3, 270, 480, seed=2)
    (ours,) = _ours(engine, ovfast.Video(frames))
    assert torch.equal(ours, ref.video_pixels(path, frames)[0])


def _same(x):
    return x, x


@pytest.mark.parametrize(
    "make",
    [
        lambda im: _same(im.convert("RGBA")),
        lambda im: _same(ref.synthetic_image(im.height, im.width, seed=5, mode="RGBA")),  # real transparency
        lambda im: _same(im.convert("L")),
        lambda im: _same(im.convert("P")),
        lambda im: _same(im.convert("LA")),
        lambda im: _same(np.asarray(im)),
        # transformers takes no 2-D array; a grey array means what the grey PIL image means
        lambda im: (np.asarray(im.convert("L")), im.convert("L")),
        lambda im: _same(np.asarray(ref.synthetic_image(im.height, im.width, seed=6, mode="RGBA"))),
        lambda im: _same(torch.from_numpy(np.array(im))),
    ],
    ids=["rgba-opaque", "rgba", "grey", "palette", "grey-alpha", "numpy", "numpy-grey", "numpy-rgba", "torch-hwc"],
)
def test_input_kinds_match_transformers(tiny, make):
    """Alpha composited on white, grey repeated to RGB: whatever transformers does, bit for bit."""
    path, engine = tiny
    ours_input, hf_input = make(ref.synthetic_image(200, 300, seed=4))
    expected = ref.processor(path).image_processor(hf_input, return_tensors="pt")["pixel_values"][0]
    (ours,) = _ours(engine, [ours_input])
    assert torch.equal(ours, expected)


def test_files_bytes_and_data_uris(tiny, tmp_path):
    _, engine = tiny
    image = ref.synthetic_image(150, 220, seed=9)
    path = tmp_path / "x.png"
    image.save(path)
    data = path.read_bytes()
    import base64

    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    arrays = [to_rgb(x) for x in (image, str(path), path, data, uri)]
    for a in arrays[1:]:
        assert np.array_equal(a, arrays[0])


def test_jpeg_and_exif_orientation_left_alone(tiny):
    """Like transformers, the EXIF orientation tag is not applied."""
    image = ref.synthetic_image(100, 60, seed=3)
    buf = io.BytesIO()
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90
    image.save(buf, format="JPEG", exif=exif)
    rgb = to_rgb(buf.getvalue())
    assert rgb.shape == (100, 60, 3)
