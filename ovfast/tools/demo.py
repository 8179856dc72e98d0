"""The offline demo: an image, a two-image and a video request on whatever model is at hand.

With no model given and none cached, it builds the tiny random-weight checkpoint (once, cached),
so it runs on a fresh machine without network. Answers of random weights are noise, and the
demo says so next to every answer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..api import DEFAULT_MODEL
from ..inputs.media import Video
from ..runtime.engine import Engine, load
from ..settings import environment
from ..testing.random_checkpoint import build_checkpoint


def cache_dir() -> Path:
    return environment.cache_dir()


def synthetic_image(height: int, width: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A deterministic picture of gradients and ellipses (pure noise images all look alike to a model)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    c = rng.uniform(0, 1, (3, 3))
    arr = np.stack([(c[i, 0] * 255 * x / width + c[i, 1] * 255 * y / height + c[i, 2] * 80) % 256 for i in range(3)], -1)
    im = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(2, width // 2 + 3)), y0 + int(rng.integers(2, height // 2 + 3))]
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    if mode == "RGBA":
        alpha = Image.fromarray(((x * 7 + y * 3) % 256).astype(np.uint8))
        im = im.convert("RGBA")
        im.putalpha(alpha)
    elif mode != "RGB":
        im = im.convert(mode)
    return im


def demo_model() -> str:
    """The default checkpoint if it is already in the local Hub cache, else the tiny random one."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(DEFAULT_MODEL, local_files_only=True)
    except Exception:
        path = cache_dir() / "tiny-random"
        if not (path / "model.safetensors").is_file():
            build_checkpoint(path, "tiny")
        return str(path)


def run_demo(model: str | None = None, max_new_tokens: int = 24, engine: Engine | None = None, out=print) -> None:
    engine = engine or load(model or demo_model())
    label = " [random weights: the answer is noise]" if engine.random_weights else ""
    out(f"model: {engine.checkpoint.path}  device: {engine.device}  dtype: {str(engine.dtype).removeprefix('torch.')}")
    requests = [
        ("one image", synthetic_image(480, 640, seed=1), "What is shown in this image?"),
        ("two images", [synthetic_image(360, 480, 2), synthetic_image(512, 384, 3)], "What differs between these pictures?"),
        ("video", Video([np.asarray(synthetic_image(240, 320, 10 + i)) for i in range(8)]), "What happens in this video?"),
    ]
    for name, images, prompt in requests:
        c = engine.complete(images, prompt, max_new_tokens=max_new_tokens)
        t = c.timings
        out(f"\n== {name}: {prompt}{label}")
        out(repr(c.text))
        out(f"   {c.prompt_tokens} prompt tokens, {len(c.token_ids)} generated ({c.finish_reason}); "
            f"preprocess {t.preprocess_ms:.1f} ms, vision {t.vision_ms:.1f} ms, prefill {t.prefill_ms:.1f} ms, "
            f"decode {t.decode_ms:.1f} ms ({t.decode_tokens_per_s:.1f} tokens/s)")
