"""The engine with the vision kernels forced on (Triton's interpreter on the CPU) against transformers.

A subset of test_generate_parity.py and test_model_parity.py: the same greedy tokens and close
prefill logits, while patch_embed (fed uint8 tiles with the normalisation folded in), the
projector and the bilinear resizes run as Triton kernels. The decoder ops have no kernels on
this branch, so dispatch keeps them in torch.
"""
from __future__ import annotations

import functools

import ovfast.kernels
import pytest
import reference as ref
import torch

import ovfast
from ovfast.ops.backends import kernel_mode

N = 12
VISION_KERNELS = ("patch_embed", "projector", "bilinear_resize")

CASES = {
    "small": ([(64, 48)], [], "What is shown in this image?"),
    "wide": ([(333, 1001)], [], "Describe the panorama."),  # 1x3 grid, rows unpadded
    "two_images": ([(300, 500), (480, 320)], [], "What differs between the two pictures?"),
    "video": ([], [(3, 200, 300)], "What happens in the video?"),  # 27x27 -> 14x14 pooling
}


@pytest.fixture(scope="module")
def small_tiles(tmp_path_factory):
    """70 px tiles (5x5 patches): a 6x6-tile image is cheap enough under the interpreter to reach
    the anyres_max_9 downscale, which 384 px tiles only reach with 16 tiles and more."""
    path = str(ovfast.build_checkpoint(tmp_path_factory.mktemp("geo") / "geo", "tiny-mha", dtype="float32",
                                       vision=dict(image_size=70, patch_size=14)))
    return path, ovfast.load(path, max_seq_len=2048, max_batch_size=1)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Force the Triton kernels and count how often each vision kernel runs."""
    calls = dict.fromkeys(VISION_KERNELS, 0)
    for name in VISION_KERNELS:
        kernel = getattr(ovfast.kernels, name)

        @functools.wraps(kernel)
        def counted(*args, _kernel=kernel, _name=name, **kwargs):
            calls[_name] += 1
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(ovfast.kernels, name, counted)
    with kernel_mode("triton"):
        yield calls


def _inputs(case):
    sizes, videos, prompt = CASES[case]
    images = [ref.synthetic_image(h, w, seed=h + w) for h, w in sizes]
    frames = [ref.video_frames(n, h, w, seed=n + h) for n, h, w in videos]
    return images, frames, prompt


@pytest.mark.parametrize("case", ["small", "two_images", "video"])
def test_greedy_matches_transformers(tiny, kernel_calls, case):
    path, engine = tiny
    engine.reset_caches()  # other tests asked about the same media: this one must run the kernels
    images, frames, prompt = _inputs(case)
    expected = ref.greedy(path, images, prompt, N, videos=frames)
    got = engine.complete(images + [ovfast.Video(f) for f in frames], prompt, max_new_tokens=N)
    assert got.token_ids == expected
    assert kernel_calls["patch_embed"] > 0 and kernel_calls["projector"] > 0
    assert kernel_calls["bilinear_resize"] == (case == "video")


def test_greedy_with_the_anyres_downscale(small_tiles, kernel_calls):
    path, engine = small_tiles
    image = ref.synthetic_image(1000, 900, seed=2)
    expected = ref.greedy(path, [image], "big", N)
    assert engine.complete([image], "big", max_new_tokens=N).token_ids == expected
    assert kernel_calls["bilinear_resize"] == 1


@pytest.mark.parametrize("case", ["wide", "video"])
def test_prefill_logits_close(ckpt, kernel_calls, case):
    """Both test checkpoints (GQA fp16 weights, MHA fp32 weights), fp32 logits to 1e-4."""
    path, engine = ckpt
    engine.reset_caches()  # other tests asked about the same media: this one must run the kernels
    images, frames, prompt = _inputs(case)
    x = ref.inputs(path, images, prompt, frames)
    with torch.no_grad():
        expected = ref.model(path)(**x).logits[0]
    ours = engine.logits(images + [ovfast.Video(f) for f in frames], prompt)
    assert kernel_calls["patch_embed"] > 0
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
