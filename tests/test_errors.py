"""Bad input raises a typed ovfast error naming the problem; the same engine then serves correctly."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
import reference as ref
import torch

import ovfast

GOOD_IMAGE = ref.synthetic_image(120, 160, seed=42)


@pytest.fixture(scope="module")
def engine(checkpoint_dirs):
    # A small context so the length check is easy to reach; two images at most.
    return ovfast.load(checkpoint_dirs["tiny"], max_seq_len=4096, max_images=2, max_video_frames=3, max_batch_size=2)


@pytest.fixture(scope="module")
def baseline(engine):
    return engine.complete(GOOD_IMAGE, "What is shown?", max_new_tokens=6).token_ids


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _truncated_png(tmp_path):
    path = tmp_path / "truncated.png"
    path.write_bytes(_png_bytes(ref.synthetic_image(64, 64, seed=1))[:300])
    return str(path)


BAD_REQUESTS = {
    "missing file": (lambda tmp: dict(images="/nonexistent/photo.jpg"), ovfast.ImageReadError, "does not exist"),
    "garbage bytes": (lambda tmp: dict(images=b"definitely not an image"), ovfast.ImageReadError, "not an image"),
    "truncated file": (lambda tmp: dict(images=_truncated_png(tmp)), ovfast.ImageReadError, "truncated"),
    "bad data uri": (lambda tmp: dict(images="data:image/png;base64,@@@"), ovfast.ImageReadError, "base64"),
    "unsupported type": (lambda tmp: dict(images=12345), ovfast.UnsupportedInputError, "int"),
    "float array": (lambda tmp: dict(images=np.zeros((8, 8, 3), np.float32)), ovfast.UnsupportedInputError, "uint8"),
    "bad array shape": (lambda tmp: dict(images=np.zeros((8, 8, 2), np.uint8)), ovfast.UnsupportedInputError, "(H, W"),
    "zero-size image": (lambda tmp: dict(images=np.zeros((0, 8, 3), np.uint8)), ovfast.ImageReadError, "zero size"),
    "url": (lambda tmp: dict(images="https://example.com/a.jpg"), ovfast.UnsupportedInputError, "URL"),
    "too few placeholders": (
        lambda tmp: dict(images=[GOOD_IMAGE], prompt="no placeholder here", chat=False),
        ovfast.PlaceholderError, "0 <image>"),
    "too many placeholders": (
        lambda tmp: dict(images=[GOOD_IMAGE], prompt="<image><image> two", chat=False), ovfast.PlaceholderError, "2 <image>"),
    "video placeholder for an image": (
        lambda tmp: dict(images=[GOOD_IMAGE], prompt="<video> what?", chat=False), ovfast.PlaceholderError, "1 <video>"),
    "placeholder in a chat prompt": (
        lambda tmp: dict(images=[GOOD_IMAGE], prompt="<image> what?"), ovfast.PlaceholderError, "chat=False"),
    "prompt not a string": (lambda tmp: dict(prompt=["a"]), ovfast.UnsupportedInputError, "prompt"),
    "empty video": (lambda tmp: dict(images=ovfast.Video([])), ovfast.EmptyVideoError, "no frames"),
    "missing video file": (lambda tmp: dict(images=ovfast.Video("clip.mp4")), ovfast.VideoReadError, "does not exist"),
    "not a video": (lambda tmp: dict(images=ovfast.Video(b"not a video at all")), ovfast.VideoReadError, "video"),
    "bad video frame": (
        lambda tmp: dict(images=ovfast.Video([GOOD_IMAGE, b"junk"])), ovfast.ImageReadError, "frame 1"),
    "too many images": (lambda tmp: dict(images=[GOOD_IMAGE] * 3), ovfast.TooManyImagesError, "at most 2"),
    "too many frames": (
        lambda tmp: dict(images=ovfast.Video(np.zeros((4, 32, 32, 3), np.uint8))), ovfast.TooManyImagesError, "frames"),
    "context overflow": (lambda tmp: dict(max_new_tokens=3000), ovfast.ContextLengthError, "context of 4096"),
    "huge image overflow": (
        lambda tmp: dict(images=np.zeros((1153, 946, 3), np.uint8)), ovfast.ContextLengthError, "context of 4096"),
    "max_new_tokens 0": (lambda tmp: dict(max_new_tokens=0), ovfast.GenerationParamsError, "max_new_tokens"),
    "negative temperature": (lambda tmp: dict(temperature=-1.0), ovfast.GenerationParamsError, "temperature"),
    "top_p zero": (lambda tmp: dict(top_p=0.0), ovfast.GenerationParamsError, "top_p"),
    "float top_k": (lambda tmp: dict(top_k=2.5), ovfast.GenerationParamsError, "top_k"),
    "empty stop": (lambda tmp: dict(stop=[""]), ovfast.GenerationParamsError, "stop"),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_input_raises_typed_error_then_engine_still_works(engine, baseline, tmp_path, name):
    make, error, words = BAD_REQUESTS[name]
    kw = dict(images=GOOD_IMAGE, prompt="What is shown?", max_new_tokens=6)
    with pytest.raises(error, match=re.escape(words)) as info:  # some inputs (Video([])) fail as they are built
        kw.update(make(tmp_path))
        engine.complete(kw.pop("images"), kw.pop("prompt"), **kw)
    assert isinstance(info.value, ovfast.OvfastError)
    assert engine.complete(GOOD_IMAGE, "What is shown?", max_new_tokens=6).token_ids == baseline


def test_bad_request_in_a_batch_names_its_index(engine, baseline):
    with pytest.raises(ovfast.ImageReadError, match="request 1"):
        engine.complete_many([(GOOD_IMAGE, "What is shown?"), (b"junk", "x")], max_new_tokens=6)
    with pytest.raises(ovfast.UnsupportedInputError, match="request 0"):
        engine.complete_many([GOOD_IMAGE], max_new_tokens=6)
    with pytest.raises(ovfast.UnsupportedInputError, match="overrides"):
        engine.complete_many([(None, "x", {"max_tokens": 3})])
    out = engine.complete_many([(GOOD_IMAGE, "What is shown?"), (None, "x")], max_new_tokens=6)
    assert out[0].token_ids == baseline


def test_stream_rejects_bad_input_at_the_call(engine, baseline):
    with pytest.raises(ovfast.ImageReadError):
        engine.stream(b"junk", "x")
    assert engine.complete(GOOD_IMAGE, "What is shown?", max_new_tokens=6).token_ids == baseline


def test_abandoned_stream_releases_the_engine(engine, baseline):
    it = engine.stream(GOOD_IMAGE, "What is shown?", max_new_tokens=6)
    next(it)
    del it  # garbage-collected generator: its finally releases the engine
    assert engine.complete(GOOD_IMAGE, "What is shown?", max_new_tokens=6).token_ids == baseline


def test_errors_inside_the_model_leave_the_engine_usable(engine, baseline, monkeypatch):
    """A failure halfway through generation (e.g. out of memory) propagates and nothing stays reserved."""
    calls = {"n": 0}
    real = engine.runner.decode.step

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device failure")
        return real(*a, **k)

    monkeypatch.setattr(engine.runner.decode, "step", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        engine.complete_many([(GOOD_IMAGE, "What is shown?"), (None, "y")], max_new_tokens=6)
    monkeypatch.undo()
    assert engine.complete(GOOD_IMAGE, "What is shown?", max_new_tokens=6).token_ids == baseline
    stats = engine.stats()  # nothing stays reserved
    assert stats["running"] == stats["waiting"] == 0 and stats["free_slots"] == engine.max_batch_size
    assert not engine.runner.decode.active.any()  # no row keeps advancing


def test_error_types_are_catchable_as_builtin_kinds():
    assert issubclass(ovfast.InputError, ValueError)
    assert issubclass(ovfast.UnsupportedInputError, TypeError)
    assert issubclass(ovfast.ImageReadError, ovfast.InputError)
    assert issubclass(ovfast.ModelLoadError, ovfast.OvfastError)


def test_tensor_inputs_accepted(engine, baseline):
    arr = np.array(GOOD_IMAGE)
    chw = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    assert engine.complete(chw, "What is shown?", max_new_tokens=6).token_ids == baseline
    assert engine.complete(torch.from_numpy(arr), "What is shown?", max_new_tokens=6).token_ids == baseline
    assert engine.complete(arr, "What is shown?", max_new_tokens=6).token_ids == baseline
    assert engine.complete(_png_bytes(GOOD_IMAGE), "What is shown?", max_new_tokens=6).token_ids == baseline
