"""ovfast.Video on files and bytes: clips the tests encode themselves with PyAV.

Sampled frames are compared with a plain full decode of the same file (PyAV, every frame in
order), so seeking must land on exactly the frames a sequential decode gives.
"""
from __future__ import annotations

import fractions
import io
import json
import re

import av
import numpy as np
import pytest
import torch

import ovfast
import reference as ref
from ovfast.cli import main

# (name, encoder, container format, pixel format); encoders missing from this PyAV build are skipped.
FORMATS = [
    ("mpeg4.mp4", "mpeg4", "mp4", "yuv420p"),
    ("h264.mp4", "libx264", "mp4", "yuv420p"),
    ("vp9.webm", "libvpx-vp9", "webm", "yuv420p"),
    ("mjpeg.avi", "mjpeg", "avi", "yuvj420p"),
    ("ffv1.mkv", "ffv1", "matroska", "yuv420p"),
    ("raw.h264", "libx264", "h264", "yuv420p"),  # an elementary stream: no timestamps, no duration
]
N = 40


def _frame(i: int, h: int = 48, w: int = 64) -> np.ndarray:
    """Frame i: a grey level and a bar whose position both encode i."""
    arr = np.full((h, w, 3), (i * 6) % 256, np.uint8)
    arr[:, (i * 3) % (w - 4) : (i * 3) % (w - 4) + 4] = (255, 40, 0)
    return arr


def encode(path, codec: str, fmt: str, pix_fmt: str, n: int = N, pts_ms: list[int] | None = None) -> str:
    """Write n frames; pts_ms gives each frame's time in milliseconds (a variable frame rate)."""
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, pix_fmt
        s.codec_context.gop_size = 6  # several keyframes, so sampling seeks
        if pts_ms is not None:
            s.codec_context.time_base = fractions.Fraction(1, 1000)
        for i in range(n):
            f = av.VideoFrame.from_ndarray(_frame(i), format="rgb24")
            if pts_ms is not None:
                f.pts, f.time_base = pts_ms[i], fractions.Fraction(1, 1000)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


def full_decode(path: str) -> list[np.ndarray]:
    with av.open(path) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("clips")
    return {name: encode(root / name, codec, fmt, pix) for name, codec, fmt, pix in FORMATS if codec in av.codecs_available}


@pytest.mark.parametrize("name", [f[0] for f in FORMATS])
def test_uniform_sampling_matches_a_full_decode(clips, name):
    if name not in clips:
        pytest.skip("encoder not in this PyAV build")
    frames = full_decode(clips[name])
    assert len(frames) == N
    for k in (1, 5, 8, 32):
        video = ovfast.Video(clips[name], num_frames=k)
        want = np.linspace(0, N - 1, k, dtype=int).tolist()
        assert video.num_frames == k and video.frame_indices == want
        got = video.rgb_frames()
        assert all(np.array_equal(g, frames[i]) for g, i in zip(got, want)), name


def test_bytes_explicit_indices_and_default(clips):
    path = clips["h264.mp4"]
    frames = full_decode(path)
    data = open(path, "rb").read()
    video = ovfast.Video(data, indices=[39, 0, 7, 7])
    assert video.num_frames == 4
    assert all(np.array_equal(g, frames[i]) for g, i in zip(video.rgb_frames(), [39, 0, 7, 7]))
    assert ovfast.Video(path).num_frames == 32  # the default, lmms-eval's 32
    assert "32 of 40" in repr(ovfast.Video(path))


def test_fewer_frames_than_asked_gives_each_frame_once(clips):
    video = ovfast.Video(clips["vp9.webm"], num_frames=100)
    assert video.frame_indices == list(range(N))
    assert len(video.rgb_frames()) == N


def test_variable_frame_rate(tmp_path):
    steps = [30, 100, 250] * 7
    pts = np.cumsum([0] + steps[:19]).tolist()  # 20 frames at irregular times
    path = encode(tmp_path / "vfr.mp4", "libx264" if "libx264" in av.codecs_available else "mpeg4", "mp4", "yuv420p",
                  n=20, pts_ms=pts)
    frames = full_decode(path)
    video = ovfast.Video(path, num_frames=6)
    assert video.frame_indices == np.linspace(0, 19, 6, dtype=int).tolist()
    assert all(np.array_equal(g, frames[i]) for g, i in zip(video.rgb_frames(), video.frame_indices))
    # fps sampling follows the timestamps: the frame on screen at 0 s, 0.5 s, 1 s, ...
    seconds = np.asarray(pts) / 1000
    expected = sorted({int(np.searchsorted(seconds, t + 1e-9, side="right") - 1) for t in np.arange(0, seconds[-1] + 1e-9, 0.5)})
    assert ovfast.Video(path, fps=2).frame_indices == expected


def test_truncated_files(clips, tmp_path):
    """A cut stream gives the frames before the cut; a cut that loses the index is a typed error."""
    data = open(clips["ffv1.mkv"], "rb").read()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) * 2 // 3])
    video = ovfast.Video(str(cut), num_frames=N)
    frames = video.rgb_frames()
    full = full_decode(clips["ffv1.mkv"])
    assert 0 < video.num_frames < N and len(frames) == video.num_frames
    assert all(np.array_equal(g, full[i]) for g, i in zip(frames, video.frame_indices))
    mp4 = open(clips["mpeg4.mp4"], "rb").read()  # the mp4 muxer writes its index (moov) last
    with pytest.raises(ovfast.VideoReadError):
        ovfast.Video(mp4[: len(mp4) // 2]).rgb_frames()


BAD = {
    "missing": (lambda clips, tmp: ovfast.Video(str(tmp / "nope.mp4")), ovfast.VideoReadError, "does not exist"),
    "directory": (lambda clips, tmp: ovfast.Video(str(tmp)), ovfast.VideoReadError, "directory"),
    "garbage": (lambda clips, tmp: ovfast.Video(b"\x00garbage" * 50), ovfast.VideoReadError, "video"),
    "audio only": (lambda clips, tmp: ovfast.Video(_wav(tmp)), ovfast.VideoReadError, "no video stream"),
    "two selectors": (lambda clips, tmp: ovfast.Video(clips["h264.mp4"], num_frames=4, fps=1.0),
                      ovfast.UnsupportedInputError, "at most one"),
    "zero frames": (lambda clips, tmp: ovfast.Video(clips["h264.mp4"], num_frames=0), ovfast.UnsupportedInputError, "positive"),
    "bad fps": (lambda clips, tmp: ovfast.Video(clips["h264.mp4"], fps=-1), ovfast.UnsupportedInputError, "fps"),
    "index range": (lambda clips, tmp: ovfast.Video(clips["h264.mp4"], indices=[3, 40]), ovfast.UnsupportedInputError, "[40]"),
    "fps without timestamps": (lambda clips, tmp: ovfast.Video(clips["raw.h264"], fps=1.0), ovfast.UnsupportedInputError,
                               "timestamps"),
    "selector on frames": (lambda clips, tmp: ovfast.Video([_frame(0)], num_frames=2), ovfast.UnsupportedInputError, "file"),
}


def _wav(tmp) -> str:
    path = str(tmp / "tone.wav")
    with av.open(path, "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
    return path


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_videos_raise_typed_errors(clips, tmp_path, name):
    if "h264" in name and "raw.h264" not in clips:
        pytest.skip("libx264 not in this PyAV build")
    make, error, words = BAD[name]
    with pytest.raises(error, match=re.escape(words)) as info:
        make(clips, tmp_path)
    assert isinstance(info.value, ovfast.OvfastError)


def test_pixel_limit_applies_to_images_and_video_frames(clips):
    try:
        ovfast.set_max_image_pixels(1000)
        with pytest.raises(ovfast.ImageTooLargeError, match="64x48"):
            ovfast.Video(clips["mpeg4.mp4"])
        with pytest.raises(ovfast.ImageTooLargeError, match="limit"):
            ovfast.preprocess(_png_of(50, 50))
        assert ovfast.preprocess(_png_of(20, 20))[0].shape[0] == 2
    finally:
        ovfast.set_max_image_pixels(ovfast.inputs.media.PIL.Image.MAX_IMAGE_PIXELS)


def _png_of(h, w) -> bytes:
    buf = io.BytesIO()
    ref.synthetic_image(h, w, seed=1).save(buf, format="PNG")
    return buf.getvalue()


def test_video_file_pixels_are_pillow_squashes(tiny, clips):
    ckpt, _ = tiny
    video = ovfast.Video(clips["h264.mp4"], num_frames=3)
    frames = full_decode(clips["h264.mp4"])
    (ours,) = ovfast.preprocess(video)
    assert torch.equal(ours, ref.video_pixels(ckpt, [frames[i] for i in video.frame_indices])[0])


def test_engine_and_cli_on_a_video_file(tiny, clips, capsys):
    ckpt, engine = tiny
    path = clips["h264.mp4"]
    frames = full_decode(path)
    idx = np.linspace(0, N - 1, 4, dtype=int)
    expected = engine.complete(ovfast.Video([frames[i] for i in idx]), "What happens?", max_new_tokens=4)
    assert engine.complete(ovfast.Video(path, num_frames=4), "What happens?", max_new_tokens=4).token_ids == expected.token_ids
    assert main(["generate", "--model", ckpt, "--video", path, "--num-frames", "4", "What happens?",
                 "--max-new-tokens", "4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["token_ids"] == expected.token_ids and got["prompt_tokens"] == expected.prompt_tokens
