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
from .weight_names import canonical_name

# Present in checkpoints, never used on the feature path (REFERENCE.md section 2).
_IGNORED = re.compile(r"^(vision\.post_layernorm\.|vision\.head\.|lm\.layers\.\d+\.self_attn\.rotary_emb\.)")


def _skippable(canon: str, model: torch.nn.Module) -> bool:
    if _IGNORED.match(canon):
        return True
    if canon == "lm_head.weight" and model.cfg.text.tie_word_embeddings:
        return True  # tied: transformers uses embed_tokens and ignores a stored head
    m = re.match(r"^vision\.encoder\.layers\.(\d+)\.", canon)
    return bool(m) and int(m.group(1)) >= len(model.vision_tower.layers)  # layers past the feature layer


def safetensors_tensors(files: list[Path]) -> Iterator[tuple[str, str, Callable[[], torch.Tensor]]]:
    """(where, name, read) for every tensor of the files; ``read`` loads that one tensor only."""
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:
            raise ModelLoadError(f"cannot read weights file {f}: {e}") from e
        with handle:
            for key in handle.keys():
                yield f.name, key, functools.partial(handle.get_tensor, key)


def mapping_tensors(state: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, str, Callable[[], torch.Tensor]]]:
    """The same for in-memory tensors (a transformers state_dict, or ``random_checkpoint.random_state``)."""
    for key, tensor in state.items():
        yield "state dict", key, (lambda t=tensor: t)


@torch.no_grad()
def load_weights(model: torch.nn.Module, tensors: Iterable[tuple[str, str, Callable[[], torch.Tensor]]]) -> list[str]:
    """Fill every parameter of ``model`` (already on its device and dtype) from (where, name, read) triples.

    Returns the names of the tensors skipped because the model has them but the feature path
    never reads them (vision head, post-layernorm, tower layers past the feature layer, a tied
    head). Unknown tensors raise.

    ``model`` names its parameters itself (``LlavaOnevision.weight_destinations``), so this module
    needs no model code.
    """
    dest = model.weight_destinations()
    loaded: set[str] = set()
    unexpected: list[str] = []
    skipped: list[str] = []
    for where, key, read in tensors:
        canon = canonical_name(key)
        if canon is None or canon not in dest:
            if canon is None or not _skippable(canon, model):
                unexpected.append(key)
            else:
                skipped.append(key)
            continue
        param, rows = dest[canon]
        target = param if rows is None else param[rows]
        tensor = read()
        if tuple(tensor.shape) != tuple(target.shape):
            raise ModelLoadError(
                f"{where}: {key} has shape {tuple(tensor.shape)}, config.json implies {tuple(target.shape)}"
            )
        target.copy_(tensor)  # casts (e.g. fp16 on disk -> bf16) and moves to the device
        loaded.add(canon)
    if unexpected:
        raise ModelLoadError(
            f"the checkpoint has {len(unexpected)} tensors ovfast does not know, e.g. {unexpected[:3]}; "
            "is it a LLaVA-OneVision checkpoint in the Hugging Face layout?"
        )
    missing = sorted(set(dest) - loaded)
    if missing:
        raise ModelLoadError(f"the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    return skipped
