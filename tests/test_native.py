"""The native preprocessing (ovfast._C) against Pillow, transformers' PIL processor and the Python path.

Every pixel test runs on both paths: the native one (the default) and the pure-Python fallback
(``native.disabled()``), and both must give transformers' pixel values bit for bit.
"""
from __future__ import annotations

import io
import random
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import pytest
import reference as ref
import torch

import ovfast
from ovfast.inputs import native
from ovfast.inputs.media import Pixels, composite
from ovfast.inputs.resample import horizontal_first

pytestmark = pytest.mark.skipif(ovfast.inputs.native._C is None, reason="ovfast._C is not built")
C = ovfast.inputs.native._C

# (h, w): 1x1 and the extreme strips, docs/reference-behaviour.md section 12's unpad edge cases, the worked
# example, the radar image, the largest token count, the downscale canvases and a 12 MP photo.
SIZES = [
    (1, 1), (13, 2000), (2000, 13), (820, 738), (750, 1750), (47, 423), (49, 1323), (369, 820), (375, 1375),
    (423, 47), (480, 640), (640, 480), (899, 1024), (1153, 946), (1080, 1920), (2000, 500), (500, 2000), (13, 9),
    (384, 384), (3000, 200), (2, 3), (3000, 4000),
]


@pytest.fixture(params=["native", "python"])
def path(request):
    """Run the test on the native path, then on the pure-Python fallback."""
    if request.param == "python":
        with native.disabled():
            yield request.param
    else:
        yield request.param


def _pillow(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    return np.asarray(PIL.Image.fromarray(img).resize((out_w, out_h), PIL.Image.Resampling.BICUBIC))


def _resize(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    out = np.empty((out_h, out_w, 3), np.uint8)
    C.resize(img, out, horizontal_first(*img.shape[:2], out_h, out_w))
    return out


@pytest.mark.parametrize("size", [(1, 1, 384, 384), (13, 2000, 384, 384), (2000, 13, 384, 384), (480, 640, 576, 768),
                                  (3000, 4000, 1728, 2304), (4000, 3000, 384, 384), (7, 5, 2304, 100), (384, 384, 384, 384)])
def test_resize_bit_identical_to_pillow(size):
    h, w, oh, ow = size
    img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    assert np.array_equal(_resize(img, oh, ow), _pillow(img, oh, ow))


def test_resize_random_sizes_both_pass_orders():
    rng, r = np.random.default_rng(2), random.Random(2)
    orders = set()
    for _ in range(80):
        h, w, oh, ow = (r.randint(1, 400) for _ in range(4))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        assert np.array_equal(_resize(img, oh, ow), _pillow(img, oh, ow)), (h, w, oh, ow)
        orders.add(horizontal_first(h, w, oh, ow))
    assert orders == {True, False} or PIL.__version__ < "13"


@pytest.mark.parametrize("rule", ["pil", "numpy"])
def test_alpha_composite_every_value(rule):
    """Every (value, alpha) pair, against media.composite (PIL.alpha_composite / NumPy float64)."""
    c, a = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    rgba = np.ascontiguousarray(np.stack([c, 255 - c, c // 3 + 7, a], -1))
    p = Pixels(rgba, rule)
    assert np.array_equal(C.to_rgb(rgba, 0 if rule == "pil" else 1), composite(p))


def test_grey_to_rgb():
    grey = np.random.default_rng(0).integers(0, 256, (37, 53, 1), dtype=np.uint8)
    assert np.array_equal(C.to_rgb(grey, 0), np.repeat(grey, 3, axis=-1))


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_pixel_values_bit_identical_to_transformers(tiny, path, size):
    ckpt, engine = tiny
    image = ref.synthetic_image(*size, seed=size[0] * 3 + size[1])
    expected = ref.processor(ckpt).image_processor(image, return_tensors="pt")["pixel_values"][0]
    (ours,) = ovfast.preprocess(image)  # LLaVA-OneVision's default settings, which the tiny checkpoint shares
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    assert torch.equal(ours, expected)
    (via_engine,) = engine.preprocess(image)
    assert torch.equal(via_engine, expected)


KINDS = {
    "rgba": lambda im: (im.convert("RGBA"), im.convert("RGBA")),
    "transparent": lambda im: (ref.synthetic_image(im.height, im.width, seed=5, mode="RGBA"),) * 2,
    "grey": lambda im: (im.convert("L"),) * 2,
    "palette": lambda im: (im.convert("P"),) * 2,
    "palette-transparency": lambda im: (_palette_with_transparency(im),) * 2,
    "grey-alpha": lambda im: (im.convert("LA"),) * 2,
    "cmyk": lambda im: (im.convert("CMYK"),) * 2,
    "numpy-rgba": lambda im: (np.asarray(ref.synthetic_image(im.height, im.width, seed=6, mode="RGBA")),) * 2,
    "numpy-grey": lambda im: (np.asarray(im.convert("L")), im.convert("L")),
    "tensor-chw": lambda im: (torch.from_numpy(np.array(im)).permute(2, 0, 1), im),
}


def _palette_with_transparency(im):
    p = im.convert("P")
    p.info["transparency"] = 3
    return p


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_input_kinds_bit_identical_to_transformers(tiny, path, kind):
    ckpt, _ = tiny
    ours_input, hf_input = KINDS[kind](ref.synthetic_image(211, 333, seed=4))
    expected = ref.processor(ckpt).image_processor(hf_input, return_tensors="pt")["pixel_values"][0]
    (ours,) = ovfast.preprocess(ours_input)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_encoded_formats_match_transformers_on_the_decoded_image(tiny, path, fmt):
    """Bytes of each format decode as Pillow decodes them; an animated GIF gives its first frame."""
    ckpt, _ = tiny
    frames = [ref.synthetic_image(120, 170, seed=s, mode="RGBA" if fmt in ("PNG", "WEBP") else "RGB") for s in (1, 2)]
    buf = io.BytesIO()
    if fmt == "GIF":
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    else:
        frames[0].save(buf, format=fmt)
    data = buf.getvalue()
    expected = ref.processor(ckpt).image_processor(PIL.Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"][0]
    (ours,) = ovfast.preprocess(data)
    assert torch.equal(ours, expected)


def test_several_images_padded_squares(tiny, path):
    ckpt, _ = tiny
    images = [ref.synthetic_image(h, w, seed=h) for h, w in [(300, 500), (500, 300), (256, 256), (17, 400), (1, 9)]]
    expected = ref.processor(ckpt).image_processor([images], return_tensors="pt")["pixel_values"]
    ours = ovfast.preprocess(images)
    for i, px in enumerate(ours):
        assert px.shape == (1, 3, 384, 384) and torch.equal(px, expected[i])


def test_video_frames_are_pillow_squashes(tiny, path):
    ckpt, _ = tiny
    frames = ref.video_frames(4, 270, 480, seed=3) + [np.asarray(ref.synthetic_image(1000, 30, seed=1))]
    (ours,) = ovfast.preprocess(ovfast.Video(frames))
    assert torch.equal(ours, ref.video_pixels(ckpt, frames)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_the_rounded_float32(path, dtype):
    items = [ref.synthetic_image(500, 700, seed=8), ovfast.Video(ref.video_frames(2, 90, 120, seed=1))]
    full = ovfast.preprocess(items)
    half = ovfast.preprocess(items, dtype=dtype)
    for f, h in zip(full, half):
        assert h.dtype == dtype and torch.equal(h, f.to(dtype))


def test_one_contiguous_buffer_in_item_order():
    items = [ref.synthetic_image(480, 640, seed=1), ovfast.Video(ref.video_frames(3, 60, 80, seed=2))]
    out = ovfast.preprocess(items)
    assert [x.shape[0] for x in out] == [5, 3]
    assert out[1].data_ptr() == out[0].data_ptr() + out[0].numel() * out[0].element_size()
    assert all(x.is_contiguous() for x in out)


def test_both_paths_agree_on_uint8_tiles(tiny):
    _, engine = tiny
    images = [ref.synthetic_image(333, 777, seed=9), np.asarray(ref.synthetic_image(50, 60, seed=1, mode="RGBA"))]
    params = ovfast.runtime.request.SamplingParams.make()
    for items in (images[:1], images, [ovfast.Video(ref.video_frames(2, 40, 90, seed=5))]):
        fast = engine.requests.prepare(items, "", True, params).items
        with native.disabled():
            slow = engine.requests.prepare(items, "", True, params).items
        for a, b in zip(fast, slow):
            assert (a.kind, a.num_tokens, a.image_size) == (b.kind, b.num_tokens, b.image_size)
            assert np.array_equal(a.tiles, b.tiles)


def test_engine_uses_the_native_path(tiny, monkeypatch):
    _, engine = tiny
    calls = []
    real = native.anyres_tiles
    monkeypatch.setattr(native, "anyres_tiles", lambda *a: calls.append(1) or real(*a))
    engine.complete(ref.synthetic_image(64, 64, seed=1), "What?", max_new_tokens=2)
    assert calls == [1]


def test_thread_counts_and_concurrent_callers_agree():
    image = ref.synthetic_image(1080, 1920, seed=2)
    expected = ovfast.preprocess(image)[0]
    before = C.num_threads()
    try:
        for n in (1, 3):
            C.set_num_threads(n)
            assert C.num_threads() == n
            assert torch.equal(ovfast.preprocess(image)[0], expected)
        C.set_num_threads(2)
        images = [ref.synthetic_image(300 + 40 * i, 500, seed=i) for i in range(6)]
        alone = [ovfast.preprocess(im)[0] for im in images]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda im: ovfast.preprocess(im)[0], images))
        assert all(torch.equal(a, b) for a, b in zip(alone, together))
    finally:
        C.set_num_threads(before)


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    image = ref.synthetic_image(90, 160, seed=3)
    expected = ovfast.preprocess(image)[0]
    monkeypatch.setattr(native, "_C", None)
    monkeypatch.setattr(native, "_import_error", ImportError("no compiler"), raising=False)
    monkeypatch.setattr(native, "_warned", False)
    with pytest.warns(UserWarning, match="pure-Python"):
        assert torch.equal(ovfast.preprocess(image)[0], expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(ovfast.preprocess(image)[0], expected)


def test_bad_dtype_is_a_typed_error():
    with pytest.raises(ovfast.UnsupportedInputError, match="dtype"):
        ovfast.preprocess(ref.synthetic_image(10, 10, seed=1), dtype=torch.int32)


def _u8(*shape):
    return np.zeros(shape, np.uint8)


BAD_CALLS = {
    "float image": (lambda: C.resize(np.zeros((4, 4, 3), np.float32), _u8(2, 2, 3), True), "'src'.*1-byte"),
    "int8 image": (lambda: C.resize(np.zeros((4, 4, 3), np.int8), _u8(2, 2, 3), True), "'src'.*uint8"),
    "two channels": (lambda: C.resize(_u8(4, 4, 2), _u8(2, 2, 3), True), "'src'.*dimension 2 must be 3"),
    "strided": (lambda: C.resize(_u8(8, 8, 3)[::2], _u8(2, 2, 3), True), "'src'.*C-contiguous"),
    "zero size": (lambda: C.resize(_u8(0, 4, 3), _u8(2, 2, 3), True), r"'src'.*\[1, 2\^24\]"),
    "read-only out": (lambda: C.resize(_u8(4, 4, 3), np.broadcast_to(_u8(1, 1, 3), (2, 2, 3)), True), "'out'"),
    "not a buffer": (lambda: C.resize([1, 2, 3], _u8(2, 2, 3), True), "'src'.*buffer"),
    "2-D image": (lambda: C.to_rgb(_u8(4, 4), 0), "'src'.*3 dimensions"),
    "five channels": (lambda: C.to_rgb(_u8(4, 4, 5), 0), "'src'.*1, 3 or 4 channels"),
    "alpha rule": (lambda: C.to_rgb(_u8(4, 4, 4), 7), "'alpha'"),
    "grid": (lambda: C.anyres_tiles(_u8(4, 4, 3), _u8(5, 8, 8, 3), 3, 4, 4, 0, 0, True, True), "'grid_w'"),
    "outside canvas": (lambda: C.anyres_tiles(_u8(4, 4, 3), _u8(5, 8, 8, 3), 2, 12, 4, 6, 0, True, True), "canvas"),
    "square": (lambda: C.padded_square_tile(_u8(4, 6, 3), _u8(8, 8, 3), (1, 2, 3), 6, 3, 0, True), "square"),
    "fill": (lambda: C.padded_square_tile(_u8(4, 6, 3), _u8(8, 8, 3), (1, 2, 300), 6, 1, 0, True), "'fill'"),
    "frame list": (lambda: C.squash_frames([_u8(4, 4, 3), "x"], _u8(2, 8, 8, 3), [True, True]), r"'frames\[1\]'"),
    "frame count": (lambda: C.squash_frames([_u8(4, 4, 3)], _u8(2, 8, 8, 3), [True]), "'out'.*dimension 0 must be 1"),
    "table width": (lambda: C.normalize(_u8(1, 4, 4, 3), np.zeros((3, 256), np.float64), np.zeros((1, 3, 4, 4))), "'table'"),
    "out dtype": (lambda: C.normalize(_u8(1, 4, 4, 3), np.zeros((3, 256), np.float32),
                                      np.zeros((1, 3, 4, 4), np.float16)), "'out'.*4-byte"),
    "threads": (lambda: C.set_num_threads(0), "'n'"),
    "huge": (lambda: C.resize(np.lib.stride_tricks.as_strided(_u8(1), (1 << 25, 1, 3), (0, 0, 0)), _u8(2, 2, 3), True),
             r"\[1, 2\^24\]"),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_arguments_raise_value_errors(name):
    call, match = BAD_CALLS[name]
    with pytest.raises(ValueError, match=match):
        call()


def test_gil_is_released_during_the_work():
    """A Python thread keeps running while a large resize runs natively."""
    img = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    ticks, done = [], threading.Event()

    def tick():
        while not done.is_set():
            ticks.append(1)

    t = threading.Thread(target=tick)
    before_threads = C.num_threads()
    C.set_num_threads(1)  # leave a core to the ticking thread
    t.start()
    try:
        before = len(ticks)
        _resize(img, 1728, 2304)
        during = len(ticks) - before
    finally:
        done.set()
        t.join()
        C.set_num_threads(before_threads)
    assert during > 100
