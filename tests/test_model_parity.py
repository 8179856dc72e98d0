"""Vision features, projected/packed features and prefill logits against transformers (fp32).

Both test checkpoints run every case: GQA with tied embeddings, and MHA with an untied head.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ovfast
import reference as ref

# (h, w): small (one 384 canvas), wide (2x... grid with row unpadding), and one big enough for the
# anyres_max_9 bilinear downscale (1080x1920: 75x135 kept, downscaled to 60x108).
SINGLE_SIZES = [(50, 60), (333, 1001), (1080, 1920)]


def _close(actual, expected, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("size", SINGLE_SIZES)
def test_single_image_features(ckpt, size):
    path, engine = ckpt
    image = ref.synthetic_image(*size, seed=sum(size))
    x = ref.inputs(path, [image], "hi")
    with torch.no_grad():
        expected = ref.model(path).model.get_image_features(
            x["pixel_values"], x["image_sizes"], batch_num_images=x["batch_num_images"]
        ).pooler_output
    (ours,) = engine.encode_media(image)
    assert ours.shape == expected[0].shape
    _close(ours, expected[0])


def test_vision_tower_last_layer_without_post_layernorm(ckpt):
    """The raw tower output equals transformers' hidden_states[-1], not its post-layernormed output."""
    path, engine = ckpt
    x = ref.inputs(path, [ref.synthetic_image(200, 300, seed=3)], "hi")
    pixels = x["pixel_values"][0, :2]
    with torch.no_grad():
        out = ref.model(path).model.vision_tower(pixels, output_hidden_states=True)
        ours = engine.model.vision_tower(pixels)
    _close(ours, out.hidden_states[-1])
    assert not torch.allclose(ours, out.last_hidden_state, atol=1e-3)


def test_projector_is_erf_gelu(ckpt):
    path, engine = ckpt
    feats = torch.randn(3, 729, engine.model_config.vision.hidden_size) * 3  # wide range: erf vs tanh differ
    with torch.no_grad():
        expected = ref.model(path).model.multi_modal_projector(feats)
        m = engine.model
        ours = ovfast.ops.projector(feats, m.projector_w1, m.projector_b1, m.projector_w2, m.projector_b2)
        tanh = ovfast.ops.projector(feats, m.projector_w1, m.projector_b1, m.projector_w2, m.projector_b2, "tanh")
    _close(ours, expected)
    assert not torch.allclose(tanh, expected, rtol=1e-4, atol=1e-5)


def test_multi_image_features(ckpt):
    path, engine = ckpt
    images = [ref.synthetic_image(300, 500, seed=1), ref.synthetic_image(640, 480, seed=2), ref.synthetic_image(90, 90, 3)]
    x = ref.inputs(path, images, "compare")
    with torch.no_grad():
        expected = ref.model(path).model.get_image_features(
            x["pixel_values"], x["image_sizes"], batch_num_images=x["batch_num_images"]
        ).pooler_output
    ours = engine.encode_media(images)
    assert [t.shape[0] for t in ours] == [730, 730, 730]
    for a, b in zip(ours, expected):
        _close(a, b)


def test_video_features(ckpt):
    path, engine = ckpt
    frames = ref.video_frames(3, 240, 320, seed=5)
    with torch.no_grad():
        expected = ref.model(path).model.get_video_features(ref.video_pixels(path, frames)).pooler_output[0]
    (ours,) = engine.encode_media(ovfast.Video(frames))
    assert ours.shape[0] == 3 * 196 + 1
    _close(ours, expected)


CASES = {
    "text": lambda: dict(images=[], prompt="Write one sentence about the sea."),
    "small_image": lambda: dict(images=[ref.synthetic_image(50, 60, seed=11)], prompt="What is shown in this image?"),
    "wide_image": lambda: dict(images=[ref.synthetic_image(333, 1001, seed=12)], prompt="Describe it."),
    "two_images": lambda: dict(images=[ref.synthetic_image(300, 500, 13), ref.synthetic_image(500, 300, 14)],
                               prompt="What differs?"),
    "video": lambda: dict(images=[], videos=[ref.video_frames(2, 180, 320, seed=15)], prompt="What happens?"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_logits(ckpt, case):
    path, engine = ckpt
    c = CASES[case]()
    x = ref.inputs(path, c["images"], c["prompt"], c.get("videos", ()))
    with torch.no_grad():
        expected = ref.model(path)(**x).logits[0]
    items = c["images"] + [ovfast.Video(v) for v in c.get("videos", ())]
    ours = engine.logits(items, c["prompt"])
    assert ours.shape == expected.shape  # same prompt length and the padded vocabulary
    _close(ours, expected, rtol=1e-4, atol=1e-4)


def test_prompt_ids_match_processor(ckpt):
    """Placeholder expansion and tokenisation give transformers' input_ids exactly."""
    path, engine = ckpt
    for images, prompt in [
        ([ref.synthetic_image(480, 640, 1)], "What is shown in this image?"),
        ([ref.synthetic_image(820, 738, 2)], "Ünïcödé, emoji 🙂 and 中文 text."),
        ([ref.synthetic_image(64, 64, 3), ref.synthetic_image(70, 30, 4)], "two"),
        ([], "plain text only\nwith a newline"),
    ]:
        expected = ref.inputs(path, images, prompt)["input_ids"][0].tolist()
        req = engine.requests.prepare(images, prompt, True, ovfast.runtime.request.SamplingParams.make())
        assert req.input_ids == expected


def test_bf16_engine_close_to_fp32_reference(checkpoint_dirs):
    """bf16 on the CPU: logits within bf16 tolerance of the fp32 reference."""
    path = checkpoint_dirs["tiny-mha"]
    engine = ovfast.load(path, dtype="bfloat16", max_seq_len=4096, max_batch_size=1)
    image = ref.synthetic_image(300, 400, seed=21)
    x = ref.inputs(path, [image], "hi")
    with torch.no_grad():
        expected = ref.model(path)(**x).logits[0]
    ours = engine.logits([image], "hi")
    err = (ours - expected).abs().max() / expected.abs().max()
    assert err < 5e-2, err
    assert np.corrcoef(ours[-1].numpy(), expected[-1].numpy())[0, 1] > 0.99
