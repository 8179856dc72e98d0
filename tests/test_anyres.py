"""Token counts and AnyRes geometry against the golden values of docs/reference-behaviour.md and transformers' processor."""
from __future__ import annotations

import random

import pytest

from ovfast.checkpoint.config import DEFAULT_PINPOINTS
from ovfast.inputs import anyres

# docs/reference-behaviour.md section 6.3 (h x w -> patches, tokens) and the section 12 unpad rounding edge cases.
GOLDEN = {
    (100, 100): (2, 1485), (336, 336): (2, 1485), (384, 384): (2, 1485),
    (480, 640): (5, 2929), (640, 480): (5, 2943), (427, 640): (5, 2709), (768, 1024): (7, 4725),
    (720, 1280): (9, 5967), (899, 1024): (10, 6551), (1024, 899): (10, 6561), (1080, 1920): (16, 7269),
    (2000, 500): (13, 7371), (500, 2000): (13, 7249), (3000, 4000): (31, 7309), (1153, 946): (13, 8765),
    (820, 738): (None, 4084), (750, 1750): (None, 7641), (47, 423): (None, 1114), (49, 1323): (None, 1274),
    (369, 820): (None, 2403), (375, 1375): (None, 3456), (423, 47): (None, 1161),
}


@pytest.mark.parametrize("size", sorted(GOLDEN), ids=[f"{h}x{w}" for h, w in sorted(GOLDEN)])
def test_golden_token_counts(size):
    patches, tokens = GOLDEN[size]
    layout = anyres.anyres_layout(*size, DEFAULT_PINPOINTS, 384, 27, 9)
    assert layout["num_tokens"] == tokens
    if patches is not None:
        gh, gw = layout["grid"]
        assert 1 + gh * gw == patches


def test_worked_example_640x480():
    layout = anyres.anyres_layout(480, 640, DEFAULT_PINPOINTS, 384, 27, 9)
    assert layout["canvas"] == (768, 768)
    assert anyres.fit_in_canvas(480, 640, 768, 768) == (576, 768)
    assert layout["crop"] == (7, 47, 0, 54)  # rows 7..46 kept
    assert layout["downscale"] is None


def test_downscale_1080x1920():
    layout = anyres.anyres_layout(1080, 1920, DEFAULT_PINPOINTS, 384, 27, 9)
    r0, r1, c0, c1 = layout["crop"]
    assert (r1 - r0, c1 - c0) == (75, 135)
    assert layout["downscale"] == (60, 108)


def test_multi_image_and_video_counts():
    assert anyres.multi_image_num_tokens(27) == 730
    assert [anyres.video_num_tokens(f) for f in (8, 16, 32)] == [1569, 3137, 6273]
    assert anyres.pooled_grid(27) == 14


def test_counts_match_transformers_processor_on_random_sizes():
    """Placeholder count equals transformers' _get_number_of_features for 3,000 random sizes."""
    from transformers import LlavaOnevisionProcessor

    class _Counter(LlavaOnevisionProcessor):  # only the counting methods are used
        def __init__(self):
            self.num_image_tokens = 729
            self.vision_aspect_ratio = "anyres_max_9"
            self.image_processor = type("IP", (), {"image_grid_pinpoints": [list(p) for p in DEFAULT_PINPOINTS]})()

    counter = _Counter()
    rng = random.Random(0)
    sizes = [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(2000)]
    sizes += [(rng.randint(1, 400), rng.randint(1, 2500)) for _ in range(1000)]
    for h, w in sizes:
        assert anyres.anyres_num_tokens(h, w, DEFAULT_PINPOINTS) == counter._get_number_of_features(h, w, 384, 384), (h, w)
