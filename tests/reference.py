"""transformers as the reference for the tests: its model, processor inputs and greedy generation.

The processor-side helpers live in ``ovfast.testing.hf_reference`` (``ovfast bench`` uses them too).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from transformers import LlavaOnevisionForConditionalGeneration

from ovfast.testing.hf_reference import inputs, processor, video_pixels  # noqa: F401
from ovfast.tools.demo import synthetic_image  # noqa: F401  (tests use ref.synthetic_image)


@functools.lru_cache(maxsize=None)
def model(ckpt: str, dtype: torch.dtype = torch.float32) -> LlavaOnevisionForConditionalGeneration:
    return LlavaOnevisionForConditionalGeneration.from_pretrained(ckpt, dtype=dtype).eval()


def greedy(ckpt: str, images: list, prompt: str, max_new_tokens: int, videos=(), chat: bool = True) -> list[int]:
    m = model(ckpt)
    x = inputs(ckpt, images, prompt, videos, chat)
    n = x["input_ids"].shape[1]
    with torch.no_grad():
        out = m.generate(**x, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, n:].tolist()


def video_frames(n: int, height: int, width: int, seed: int) -> list[np.ndarray]:
    return [np.asarray(synthetic_image(height, width, seed * 100 + i)) for i in range(n)]
