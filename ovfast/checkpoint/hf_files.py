"""Writing the llava-hf processor files: what transformers' LlavaOnevisionProcessor loads beside the weights.

Shared by the random-checkpoint builder and ``ovfast convert``, so both write what the llava-hf
repositories hold: preprocessor_config.json (image processor), video_preprocessor_config.json,
processor_config.json and the chat template.
"""
from __future__ import annotations

import json
from pathlib import Path

from .prompts import LLAVA_OV_CHAT_TEMPLATE


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def added_token_entry(content: str) -> dict:
    """A special token's ``added_tokens_decoder`` entry in tokenizer_config.json."""
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def write_processor_files(out: Path, config: dict, template_file: str = "json") -> None:
    """The processor files for a llava-hf ``config`` (its tile size and pinpoints). ``template_file``:
    "json" (chat_template.json, as on the Hub) or "jinja" (chat_template.jinja)."""
    if template_file not in ("json", "jinja"):
        raise ValueError(f"template_file must be 'json' or 'jinja', not {template_file!r}")
    vision = config["vision_config"]
    tile, grid = vision["image_size"], vision["image_size"] // vision["patch_size"]
    common = {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3,
        "rescale_factor": 1 / 255, "size": {"height": tile, "width": tile},
        "processor_class": "LlavaOnevisionProcessor",
    }
    write_json(out / "preprocessor_config.json", {
        **common, "do_pad": True, "image_grid_pinpoints": config["image_grid_pinpoints"],
        "image_processor_type": "LlavaOnevisionImageProcessor",
    })
    write_json(out / "video_preprocessor_config.json", {**common, "video_processor_type": "LlavaOnevisionVideoProcessor"})
    write_json(out / "processor_config.json", {
        "num_image_tokens": grid * grid, "processor_class": "LlavaOnevisionProcessor", "vision_feature_select_strategy": "full",
    })
    if template_file == "json":
        write_json(out / "chat_template.json", {"chat_template": LLAVA_OV_CHAT_TEMPLATE})
    else:
        (out / "chat_template.jinja").write_text(LLAVA_OV_CHAT_TEMPLATE, encoding="utf-8")
