"""``ovfast convert SRC DST``: an original lmms-lab checkpoint rewritten in the llava-hf layout.

The result loads in transformers (``LlavaOnevisionForConditionalGeneration``), vLLM and ovfast:
config.json translated by the same function the engine uses (``checkpoint.original.hf_config``),
the tensors renamed, the tokenizer with ``<image>`` / ``<video>`` added as special tokens (at the
first free ids, the rows the engine uses for them too), the processor files and the chat
template. The weights keep their values and dtype (unless ``dtype``): fed the original prompt,
transformers then gives the original's greedy tokens.

Tensors stream one at a time into shards of at most ``max_shard_bytes``, so converting 72B needs
one shard's worth of memory, not the model's 145 GB.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from tokenizers import AddedToken

from ..checkpoint import original
from ..checkpoint.config import ModelConfig
from ..checkpoint.files import open_checkpoint
from ..checkpoint.hf_files import (added_tokens_decoder, output_dir, remove_weights, save_safetensors, write_json,
                                   write_processor_files)
from ..checkpoint.prompts import IMAGE_MARKER, VIDEO_MARKER
from ..checkpoint.tokenizer import Tokenizer
from ..checkpoint.weight_names import canonical_name, disk_name
from ..checkpoint.weights import feature_path_skips, safetensors_tensors
from ..errors import ConfigError, ModelLoadError
from ..terminal.progress import progress

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None,
            max_shard_bytes: int = 5 << 30, overwrite: bool = False) -> Path:
    """Write the llava-hf layout of the lmms-lab checkpoint ``src`` (local directory or Hub id) to ``dst``."""
    if dtype is not None and dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r}: choose from {sorted(_DTYPES)} (default: keep the checkpoint's)")
    ckpt = open_checkpoint(src)
    if original.family(ckpt.config) != original.LMMS_LAB:
        raise ConfigError(f"{ckpt.path} is already in the llava-hf layout (config.json is a LlavaOnevisionConfig)")
    out = output_dir(dst, overwrite)

    tokenizer = Tokenizer.from_checkpoint(ckpt)
    image_id, video_id = tokenizer.vocab_size, tokenizer.vocab_size + 1
    if tokenizer.token_id(IMAGE_MARKER) is not None or tokenizer.token_id(VIDEO_MARKER) is not None:
        raise ConfigError("the tokenizer already has <image>/<video> tokens; is this checkpoint converted already?")
    hf = original.hf_config(ckpt.config, ckpt.path, image_id, video_id)
    cfg = ModelConfig.from_dict(hf)
    rows = cfg.text.vocab_size
    # The placeholder rows are never looked up (features overwrite them): pad only when they are missing.
    new_rows = rows if video_id < rows else -(-(video_id + 1) // 64) * 64
    hf["text_config"]["vocab_size"] = new_rows
    if dtype is not None:
        hf["torch_dtype"] = hf["text_config"]["torch_dtype"] = dtype
    if "ovfast_random_weights" in ckpt.config:
        hf["ovfast_random_weights"] = ckpt.config["ovfast_random_weights"]

    _write_weights(ckpt.weight_files, out, cfg, rows, new_rows, _DTYPES.get(dtype), max_shard_bytes)
    write_json(out / "config.json", hf)
    _write_tokenizer(tokenizer, ckpt.tokenizer_config, out, image_id, video_id)
    im_end = tokenizer.token_id("<|im_end|>")
    eos = ckpt.generation_config.get("eos_token_id", ckpt.config.get("eos_token_id"))
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if im_end is not None and im_end not in eos:
        eos.append(im_end)  # the original stops at <|im_end|> (the qwen_1_5 separator)
    generation = {k: v for k, v in ckpt.generation_config.items() if k != "transformers_version"}
    write_json(out / "generation_config.json", {**generation, "eos_token_id": eos[0] if len(eos) == 1 else eos})
    write_processor_files(out, hf)
    return out


def _write_tokenizer(tokenizer: Tokenizer, tokenizer_config: dict, out: Path, image_id: int, video_id: int) -> None:
    backend = tokenizer.backend_copy()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (IMAGE_MARKER, VIDEO_MARKER)])
    got = (backend.token_to_id(IMAGE_MARKER), backend.token_to_id(VIDEO_MARKER))
    if got != (image_id, video_id):  # pragma: no cover - add_special_tokens appends after the last id
        raise ModelLoadError(f"the tokenizer put <image>/<video> at {got}, expected {(image_id, video_id)}")
    backend.save(str(out / "tokenizer.json"))
    config = dict(tokenizer_config)
    # Every added token, not only the two new ones: the source's tokenizer_config.json may have no
    # added_tokens_decoder at all (transformers 5 saves none), and one listing just <image>/<video>
    # would make transformers split <|im_start|>.
    config["added_tokens_decoder"] = added_tokens_decoder(json.loads(backend.to_str()))
    extra = list(config.get("additional_special_tokens") or [])
    config["additional_special_tokens"] = extra + [t for t in (IMAGE_MARKER, VIDEO_MARKER) if t not in extra]
    config["processor_class"] = "LlavaOnevisionProcessor"
    write_json(out / "tokenizer_config.json", config)


def _write_weights(files: list[Path], out: Path, cfg: ModelConfig, rows: int, new_rows: int,
                   dtype: torch.dtype | None, max_shard_bytes: int) -> None:
    """Rename and re-shard, one tensor in memory at a time plus the shard being filled."""
    tmp = out / ".ovfast-convert"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shards: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    size = 0
    total = 0

    def flush() -> None:
        nonlocal pending, size
        if pending:
            save_safetensors(pending, tmp / f"{len(shards)}.safetensors")
            shards.append(list(pending))
            pending, size = {}, 0

    unknown = []
    for _, key, read in progress(safetensors_tensors(files), desc="converting weights", unit=" tensors"):
        canon = canonical_name(key)
        if canon is None:
            unknown.append(key)
            continue
        if feature_path_skips(canon, cfg) and not canon.startswith("vision.post_layernorm."):
            continue  # tower layers past the feature layer, the vision head, a tied head: not in a llava-hf file
        tensor = read()
        if dtype is not None:
            tensor = tensor.to(dtype)
        if canon in ("lm.embed_tokens.weight", "lm_head.weight") and new_rows > rows:
            # Rows for the added tokens: the mean embedding (never looked up; keeps their logits ordinary).
            tensor = torch.cat([tensor, tensor.float().mean(0, keepdim=True).to(tensor.dtype).expand(new_rows - rows, -1)])
        nbytes = tensor.numel() * tensor.element_size()
        if pending and size + nbytes > max_shard_bytes:
            flush()
        pending[disk_name(canon, "llava-hf")] = tensor.contiguous()
        size += nbytes
        total += nbytes
    if unknown:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(f"the checkpoint has {len(unknown)} tensors ovfast does not know, e.g. {unknown[:3]}")
    flush()
    remove_weights(out)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for i, (name, keys) in enumerate(zip(names, shards)):
        (tmp / f"{i}.safetensors").replace(out / name)
        weight_map.update(dict.fromkeys(keys, name))
    tmp.rmdir()
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
