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

from .errors import ModelLoadError
from .models.llava_onevision import LlavaOnevision
from .weight_names import canonical_name

# Present in checkpoints, never used on the feature path (REFERENCE.md section 2).
_IGNORED = re.compile(r"^(vision\.post_layernorm\.|vision\.head\.|lm\.layers\.\d+\.self_attn\.rotary_emb\.)")


def _destinations(model: LlavaOnevision) -> dict[str, tuple[torch.Tensor, slice | None]]:
    """Canonical tensor name -> (parameter, row slice of it or None for the whole)."""
    cfg = model.cfg
    dest: dict[str, tuple[torch.Tensor, slice | None]] = {}
    tower = model.vision_tower
    e = cfg.vision.hidden_size
    dest["vision.embeddings.patch_embedding.weight"] = (tower.patch_weight, None)
    dest["vision.embeddings.patch_embedding.bias"] = (tower.patch_bias, None)
    dest["vision.embeddings.position_embedding.weight"] = (tower.position_embedding, None)
    for i, layer in enumerate(tower.layers):
        pre = f"vision.encoder.layers.{i}."
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            rows = slice(j * e, (j + 1) * e)
            dest[pre + f"self_attn.{proj}.weight"] = (layer.qkv_weight, rows)
            dest[pre + f"self_attn.{proj}.bias"] = (layer.qkv_bias, rows)
        for name, param in (
            ("layer_norm1.weight", layer.layer_norm1_weight), ("layer_norm1.bias", layer.layer_norm1_bias),
            ("layer_norm2.weight", layer.layer_norm2_weight), ("layer_norm2.bias", layer.layer_norm2_bias),
            ("self_attn.out_proj.weight", layer.out_weight), ("self_attn.out_proj.bias", layer.out_bias),
            ("mlp.fc1.weight", layer.fc1_weight), ("mlp.fc1.bias", layer.fc1_bias),
            ("mlp.fc2.weight", layer.fc2_weight), ("mlp.fc2.bias", layer.fc2_bias),
        ):
            dest[pre + name] = (param, None)
    dest["projector.linear_1.weight"] = (model.projector_w1, None)
    dest["projector.linear_2.weight"] = (model.projector_w2, None)
    if cfg.projector_bias:
        dest["projector.linear_1.bias"] = (model.projector_b1, None)
        dest["projector.linear_2.bias"] = (model.projector_b2, None)
    dest["image_newline"] = (model.image_newline, None)

    lm, t = model.language_model, cfg.text
    q, kv, inter = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, t.intermediate_size
    dest["lm.embed_tokens.weight"] = (lm.embed_tokens, None)
    dest["lm.norm.weight"] = (lm.norm, None)
    if not t.tie_word_embeddings:
        dest["lm_head.weight"] = (lm.lm_head, None)
    for i, layer in enumerate(lm.layers):
        pre = f"lm.layers.{i}."
        for proj, rows in (("q_proj", slice(0, q)), ("k_proj", slice(q, q + kv)), ("v_proj", slice(q + kv, q + 2 * kv))):
            dest[pre + f"self_attn.{proj}.weight"] = (layer.qkv_weight, rows)
            dest[pre + f"self_attn.{proj}.bias"] = (layer.qkv_bias, rows)
        dest[pre + "self_attn.o_proj.weight"] = (layer.o_weight, None)
        dest[pre + "mlp.gate_proj.weight"] = (layer.gate_up_weight, slice(0, inter))
        dest[pre + "mlp.up_proj.weight"] = (layer.gate_up_weight, slice(inter, 2 * inter))
        dest[pre + "mlp.down_proj.weight"] = (layer.down_weight, None)
        dest[pre + "input_layernorm.weight"] = (layer.input_layernorm, None)
        dest[pre + "post_attention_layernorm.weight"] = (layer.post_attention_layernorm, None)
    return dest


def _skippable(canon: str, model: LlavaOnevision) -> bool:
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
def load_weights(model: LlavaOnevision, tensors: Iterable[tuple[str, str, Callable[[], torch.Tensor]]]) -> None:
    """Fill every parameter of ``model`` (already on its device and dtype) from (where, name, read) triples."""
    dest = _destinations(model)
    loaded: set[str] = set()
    unexpected: list[str] = []
    for where, key, read in tensors:
        canon = canonical_name(key)
        if canon is None or canon not in dest:
            if canon is None or not _skippable(canon, model):
                unexpected.append(key)
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
