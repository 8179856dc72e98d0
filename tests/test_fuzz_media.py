"""Fuzzing the media entry points: random and mutated bytes end in a result or a typed error.

The cases run in a child process under a hard timeout, so a hang or a crash in a decoder (or in
ovfast._C) fails the test instead of stalling or killing the test run. Each case goes through
``ovfast.preprocess`` (decode, native tiles, normalisation) as an image, or through
``ovfast.Video(...).rgb_frames()`` as a video; the child reports every outcome.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np

TIME_BOUND_S = 300  # all cases together; about 30 s on 2 busy cores
IMAGE_FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "BMP"]


def _image_seeds() -> list[bytes]:
    from ovfast.tools.demo import synthetic_image

    out = []
    for i, fmt in enumerate(IMAGE_FORMATS):
        buf = io.BytesIO()
        im = synthetic_image(40 + 7 * i, 56, seed=i, mode="RGBA" if fmt in ("PNG", "WEBP") else "RGB")
        im.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


def _video_seeds(tmp: str) -> list[bytes]:
    import av
    from test_video_files import FORMATS, encode

    out = []
    for name, codec, fmt, pix in FORMATS:
        if codec in av.codecs_available and fmt != "h264":
            out.append(open(encode(os.path.join(tmp, name), codec, fmt, pix, n=12), "rb").read())
    return out


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    kind = rng.integers(0, 5)
    if kind == 0:  # flip bytes
        for i in rng.integers(0, len(b), size=int(rng.integers(1, 20))):
            b[i] = int(rng.integers(0, 256))
    elif kind == 1:  # truncate
        b = b[: int(rng.integers(1, len(b)))]
    elif kind == 2:  # overwrite a run with zeros or 0xff
        i = int(rng.integers(0, len(b)))
        b[i : i + int(rng.integers(1, 64))] = bytes([0xFF if rng.random() < 0.5 else 0]) * len(b[i : i + 64])
    elif kind == 3:  # insert random bytes
        i = int(rng.integers(0, len(b)))
        b[i:i] = rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes()
    else:  # header fields: corrupt the first 64 bytes (sizes, magic numbers)
        for i in rng.integers(0, min(64, len(b)), size=4):
            b[i] = int(rng.integers(0, 256))
    return bytes(b)


def _child(tmp: str, seed: int, n_images: int, n_videos: int) -> None:
    import ovfast

    rng = np.random.default_rng(seed)
    images, videos = _image_seeds(), _video_seeds(tmp)
    cases = [("image", _mutate(images[i % len(images)], rng)) for i in range(n_images)]
    cases += [("video", _mutate(videos[i % len(videos)], rng)) for i in range(n_videos)]
    cases += [(kind, rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes())
              for kind in ("image", "video") for _ in range(10)]
    cases += [("video", images[0]), ("image", videos[0])]
    outcomes = []
    for kind, data in cases:
        try:
            if kind == "image":
                ovfast.preprocess(data)
            else:
                ovfast.Video(data, num_frames=4).rgb_frames()
            outcomes.append("ok")
        except ovfast.OvfastError as e:
            outcomes.append(type(e).__name__)
        except Exception as e:  # noqa: BLE001 - the point: report anything untyped
            outcomes.append(f"UNTYPED {kind} {type(e).__name__}: {e}")
    print(json.dumps(outcomes))


def test_random_and_mutated_media_end_in_a_result_or_a_typed_error(tmp_path):
    cmd = [sys.executable, __file__, str(tmp_path), "7", "160", "60"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIME_BOUND_S, env=env)
    assert done.returncode == 0, f"the fuzz child died (exit {done.returncode}):\n{done.stderr[-3000:]}"
    outcomes = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(outcomes) == 160 + 60 + 20 + 2
    untyped = [o for o in outcomes if o.startswith("UNTYPED")]
    assert not untyped, untyped[:10]
    # The mutations must exercise both ends: some inputs still decode, many are rejected.
    assert outcomes.count("ok") > 10 and len(set(outcomes)) > 2


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
