"""Streaming safetensors weights into an ovfast model.

Each checkpoint tensor is read on its own (safetensors memory-maps the file) and copied straight
into its destination parameter, cast to the model's dtype on the model's device, so host memory
never holds a second copy of the model. q/k/v and gate/up land in row slices of fused parameters.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ModelLoadError
from ..terminal.progress import progress
from .random_weights import random_tensors
from .weight_names import canonical_name

# Present in checkpoints, never used on the feature path (docs/reference-behaviour.md section 2).
_IGNORED = re.compile(r"^(vision\.post_layernorm\.|vision\.head\.|lm\.layers\.\d+\.self_attn\.rotary_emb\.)")


def feature_path_skips(canon: str, cfg) -> bool:
    """True for a tensor the model has but the feature path never reads (``cfg``: a ``ModelConfig``):
    the vision head and post-layernorm, tower layers past the feature layer, a tied head."""
    if _IGNORED.match(canon):
        return True
    if canon == "lm_head.weight" and cfg.text.tie_word_embeddings:
        return True  # tied: transformers uses embed_tokens and ignores a stored head
    m = re.match(r"^vision\.encoder\.layers\.(\d+)\.", canon)
    return bool(m) and int(m.group(1)) >= cfg.vision_layers_used


def safetensors_tensors(files: list[Path]) -> Iterator[tuple[str, str, Callable[..., torch.Tensor]]]:
    """(where, name, read) for every tensor of the files; ``read(index=None)`` loads that one tensor
    only, or only ``index`` of it (a tuple of slices: a tensor-parallel rank's share)."""
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:
            raise ModelLoadError(f"cannot read weights file {f}: {e}") from e
        with handle:
            for key in handle.keys():
                yield f.name, key, functools.partial(_read_slice, handle, key)


def _read_slice(handle, key: str, index: tuple | None = None) -> torch.Tensor:
    return handle.get_tensor(key) if index is None else handle.get_slice(key)[index]


def checkpoint_tensors(ckpt, device) -> Iterator[tuple[str, str, Callable[..., torch.Tensor]]]:
    """The tensors of a checkpoint: its safetensors files, or, for a random-weight checkpoint
    written without them, random ones made on ``device`` (``random_weights``)."""
    if ckpt.weight_files:
        return safetensors_tensors(ckpt.weight_files)
    if ckpt.random_weights is None:
        raise ModelLoadError(f"{ckpt.path} has no safetensors weights")
    if "text_config" not in ckpt.config:
        raise ModelLoadError(f"{ckpt.path}: random weights are made for the llava-hf layout only; this config has none")
    return random_tensors(ckpt.config, seed=ckpt.random_weights.get("seed", 0), device=device)


def mapping_tensors(state: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, str, Callable[..., torch.Tensor]]]:
    """The same for in-memory tensors (a transformers state_dict, or ``random_checkpoint.random_state``)."""
    for key, tensor in state.items():
        yield "state dict", key, (lambda index=None, t=tensor: t if index is None else t[index])


@torch.no_grad()
def load_weights(destinations: dict, tensors: Iterable[tuple[str, str, Callable[..., torch.Tensor]]],
                 skip: Callable[[str], bool]) -> list[str]:
    """Fill every destination from (where, name, read) triples.

    ``destinations`` maps canonical names to (parameter already on its device and dtype, row
    slice of it or None, index into the checkpoint tensor or None): the model names them itself
    (``LlavaOnevision.weight_destinations``), so this module needs no model code. Tensors with
    no destination for which ``skip(canonical name)`` holds are skipped unread (the feature path
    never reads them, or another rank holds them) and their names returned; unknown tensors raise.
    """
    loaded: set[str] = set()
    unexpected: list[str] = []
    skipped: list[str] = []
    # One destination per checkpoint tensor that is read (fused parameters are filled in row slices).
    with progress(desc="loading weights", total=len(destinations), unit=" tensors") as bar:
        for where, key, read in tensors:
            canon = canonical_name(key)
            if canon is None or canon not in destinations:
                if canon is None or not skip(canon):
                    unexpected.append(key)
                else:
                    skipped.append(key)
                continue
            param, rows, index = destinations[canon]
            target = param if rows is None else param[rows]
            tensor = read(index)
            if tuple(tensor.shape) != tuple(target.shape):
                part = "" if index is None else " (this rank's slice)"
                raise ModelLoadError(
                    f"{where}: {key} has shape {tuple(tensor.shape)}{part}, config.json implies {tuple(target.shape)}"
                )
            target.copy_(tensor)  # casts (e.g. fp16 on disk -> bf16) and moves to the device
            loaded.add(canon)
            bar.update()
    if unexpected:
        raise ModelLoadError(
            f"the checkpoint has {len(unexpected)} tensors ovfast does not know, e.g. {unexpected[:3]}; "
            "is it a LLaVA-OneVision checkpoint in the Hugging Face layout?"
        )
    missing = sorted(set(destinations) - loaded)
    if missing:
        raise ModelLoadError(f"the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    return skipped
