"""transformers as the reference: its PIL processor and model inputs for a checkpoint directory.

Used by the tests and by ``ovfast bench``; the engine never imports this module (nor
transformers). transformers' video processor needs torchvision, so video inputs are built from
the PIL image processor's own resize / rescale / normalize, which is the Pillow bicubic squash
ovfast implements (docs/reference-behaviour.md section 3.3).
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor
from transformers.image_utils import SizeDict


class _PilProcessor(LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor without the torchvision-only video processor."""

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


@functools.lru_cache(maxsize=None)
def processor(ckpt: str) -> _PilProcessor:
    path = Path(ckpt)
    template = None
    if (path / "chat_template.json").is_file():
        template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    elif (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    proc_cfg = json.loads((path / "processor_config.json").read_text())
    return _PilProcessor(
        image_processor=LlavaOnevisionImageProcessorPil.from_pretrained(ckpt),
        tokenizer=AutoTokenizer.from_pretrained(ckpt),
        num_image_tokens=proc_cfg["num_image_tokens"],
        vision_feature_select_strategy=proc_cfg["vision_feature_select_strategy"],
        chat_template=template,
    )


def video_pixels(ckpt: str, frames: list[np.ndarray]) -> torch.Tensor:
    """(1, F, 3, S, S) through the PIL processor's own resize, rescale and normalize."""
    ip = processor(ckpt).image_processor
    out = []
    for f in frames:
        chw = np.moveaxis(f, -1, 0)
        chw = ip.resize(chw, SizeDict(height=ip.size["height"], width=ip.size["width"]), resample=ip.resample)
        chw = ip.normalize(ip.rescale(chw, ip.rescale_factor), ip.image_mean, ip.image_std)
        out.append(chw)
    return torch.from_numpy(np.stack(out))[None]


def inputs(ckpt: str, images: list, prompt: str, videos: list[list[np.ndarray]] = (), chat: bool = True) -> dict:
    """The model inputs transformers builds for one conversation (images nested per sample)."""
    proc = processor(ckpt)
    if chat:
        content = [{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos) + [{"type": "text", "text": prompt}]
        text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    else:
        text = prompt
    if not videos:
        return dict(proc(text=text, images=[images] if images else None, return_tensors="pt"))
    # The processor refuses videos without its torchvision video processor: do what its __call__
    # does with its own pieces (ceil(grid/2)^2 tokens per frame plus one newline per video).
    out = {}
    image_repl = []
    if images:
        out = dict(proc.image_processor([images], return_tensors="pt"))
        image_repl = [proc.replace_image_token(out, i) for i in range(len(images))]
    per_frame = math.ceil(math.isqrt(proc.num_image_tokens) / 2) ** 2
    video_repl = ["<video>" * (len(v) * per_frame + 1) for v in videos]
    (text,), _ = proc.get_text_with_replacements([text], image_repl, video_repl)
    out.update(proc.tokenizer(text, return_tensors="pt"))
    out["pixel_values_videos"] = torch.cat([video_pixels(ckpt, v) for v in videos])
    return out
