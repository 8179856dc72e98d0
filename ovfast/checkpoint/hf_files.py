"""Writing checkpoint files, shared by the random-checkpoint builder and ``ovfast convert``.

Both write what the llava-hf repositories hold: preprocessor_config.json (image processor),
video_preprocessor_config.json, processor_config.json and the chat template (what transformers'
LlavaOnevisionProcessor loads beside the weights), and both refuse the same output directories
and write weights with the same file mode.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ModelLoadError
from .prompts import LLAVA_OV_CHAT_TEMPLATE


def output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """``path`` created if need be; ModelLoadError if it already holds files and not ``overwrite``
    (a checkpoint written over another would silently replace a model)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ModelLoadError(f"{out} is a file; pass a directory to write the checkpoint into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ModelLoadError(f"{out} exists and is not empty (pass overwrite=True / --force to replace its files)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def remove_weights(out: Path) -> None:
    """Delete ``out``'s safetensors weights and index, so none of an old checkpoint mixes with a new one."""
    for old in list(out.glob("model*.safetensors")) + [out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)


def save_safetensors(tensors: dict, path: Path) -> None:
    """``safetensors.torch.save_file``, leaving the file with the mode the process umask gives any other file.

    safetensors creates its file 0600 (owner only), so a service running as another user could not
    read the converted or built checkpoint."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


_TOKEN_FLAGS = ("lstrip", "normalized", "rstrip", "single_word", "special")


def added_token_entry(content: str) -> dict:
    """A special token's ``added_tokens_decoder`` entry in tokenizer_config.json."""
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def added_tokens_decoder(tokenizer_json: dict) -> dict:
    """tokenizer_config.json's ``added_tokens_decoder`` for every added token of a tokenizer.json.

    transformers takes the added tokens from this entry when it is present: one missing a token
    (say <|im_start|>) leaves that token to the BPE model, which splits it into pieces."""
    return {str(t["id"]): {"content": t["content"], **{k: bool(t.get(k, False)) for k in _TOKEN_FLAGS}}
            for t in sorted(tokenizer_json.get("added_tokens", []), key=lambda t: t["id"])}


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
