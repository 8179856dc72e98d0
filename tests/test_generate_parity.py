"""Greedy generation token for token against transformers' generate (fp32, random weights)."""
from __future__ import annotations

import pytest

import ovfast
import reference as ref

N = 12  # new tokens per case: enough to run the decode loop over the static cache


def _ours(engine, images, prompt, videos=(), **kw):
    items = list(images) + [ovfast.Video(v) for v in videos]
    return engine.complete(items, prompt, max_new_tokens=N, **kw)


@pytest.mark.parametrize(
    "images,prompt",
    [
        ([], "Tell me a story about a lighthouse."),
        ([(64, 48)], "What is shown in this image?"),  # small: one 384 canvas
        ([(300, 1200)], "Describe the panorama."),  # wide: 1x3 grid, rows unpadded
        ([(1080, 1920)], "Describe it."),  # big: unpadded 75x135 map downscaled to 60x108
        ([(300, 500), (480, 320)], "What differs between the two pictures?"),  # several images: 730 each
    ],
    ids=["text", "small", "wide", "huge", "two_images"],
)
def test_greedy_matches_transformers(ckpt, images, prompt):
    path, engine = ckpt
    pics = [ref.synthetic_image(h, w, seed=h + w) for h, w in images]
    expected = ref.greedy(path, pics, prompt, N)
    got = _ours(engine, pics, prompt)
    assert got.token_ids == expected
    assert got.prompt_tokens == ref.inputs(path, pics, prompt)["input_ids"].shape[1]


def test_greedy_video_matches_transformers(ckpt):
    path, engine = ckpt
    frames = ref.video_frames(3, 200, 300, seed=7)
    expected = ref.greedy(path, [], "What happens in the video?", N, videos=[frames])
    assert _ours(engine, [], "What happens in the video?", videos=[frames]).token_ids == expected


def test_greedy_image_and_video_together(ckpt):
    path, engine = ckpt
    pic = ref.synthetic_image(200, 260, seed=8)
    frames = ref.video_frames(2, 120, 160, seed=9)
    expected = ref.greedy(path, [pic], "Relate the two.", N, videos=[frames])
    assert _ours(engine, [pic], "Relate the two.", videos=[frames]).token_ids == expected


def test_chat_false_prompt_used_verbatim(ckpt):
    path, engine = ckpt
    pic = ref.synthetic_image(100, 200, seed=10)
    prompt = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    expected = ref.greedy(path, [pic], prompt, N, chat=False)
    assert _ours(engine, [pic], prompt, chat=False).token_ids == expected


def test_complete_many_equals_one_at_a_time(ckpt):
    """Batched decoding through the shared cache, with slot refills, changes no greedy token."""
    path, engine = ckpt
    requests = [
        ([ref.synthetic_image(120, 90, 1)], "First?"),
        (None, "A text-only question, somewhat longer than the others."),
        ([ref.synthetic_image(200, 640, 2), ref.synthetic_image(300, 300, 3)], "Two images."),
        (ovfast.Video(ref.video_frames(2, 90, 120, 4)), "Video."),
        ([ref.synthetic_image(500, 400, 5)], "Fifth request: more than the four cache slots."),
        (None, "Short."),
    ]
    alone = [engine.complete(im, p, max_new_tokens=N) for im, p in requests]
    # Different lengths make sequences finish while others continue and free slots refill.
    together = engine.complete_many(requests, max_new_tokens=N)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.text for c in together] == [c.text for c in alone]
    assert [c.prompt_tokens for c in together] == [c.prompt_tokens for c in alone]


def test_complete_many_sequences_ending_while_others_continue(ckpt):
    """Requests of different lengths: each finished slot is refilled while the others decode on."""
    path, engine = ckpt
    prompts = ["one", "two words", "three little words", "a somewhat longer prompt of several words",
               "fifth", "the sixth and last prompt"]
    lengths = [3, N, 1, 7, 5, 9]
    outs = engine.complete_many([(None, p, {"max_new_tokens": n}) for p, n in zip(prompts, lengths)])
    for p, n, c in zip(prompts, lengths, outs):
        assert c.token_ids == ref.greedy(path, [], p, n)
        assert c.finish_reason == "length" and len(c.token_ids) == n


def test_other_geometry_and_feature_layer(tmp_path):
    """Nothing is tied to 384 px tiles or the last layer: a 70 px tile (odd 5x5 grid, pooled to 3x3),
    pinpoints of 70 px multiples and vision_feature_layer -2 match transformers too."""
    path = str(ovfast.build_checkpoint(tmp_path / "geo", "tiny-mha", dtype="float32",
                                       vision=dict(image_size=70, patch_size=14),
                                       extra=dict(vision_feature_layer=-2)))
    engine = ovfast.load(path, max_seq_len=2048, max_batch_size=2)
    cases = [
        ([ref.synthetic_image(50, 60, 1)], [], "small"),
        ([ref.synthetic_image(1000, 900, 2)], [], "big: 6x6 tiles downscaled past anyres_max_9"),
        ([ref.synthetic_image(80, 60, 3), ref.synthetic_image(60, 90, 4)], [], "two"),
        ([], [ref.video_frames(3, 40, 70, 5)], "video"),
    ]
    for images, videos, prompt in cases:
        expected = ref.greedy(path, images, prompt, N, videos=videos)
        assert _ours(engine, images, prompt, videos=videos).token_ids == expected, prompt
