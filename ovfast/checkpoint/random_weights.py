"""Random weights for a checkpoint that has none on disk: every tensor its config implies, made
on the device that will hold it.

``build_checkpoint(dir, "72b", weights=False)`` writes a checkpoint without weights (145 GB would
fit no disk here); config.json's ``ovfast_random_weights`` marker says so, and loading such a
directory fills the model with random values instead (``checkpoint_tensors``). Each tensor comes
from its own generator, seeded by its name, so every tensor-parallel rank makes the same tensor
and keeps its slice: the ranks together hold one consistent model. Latency does not depend on
the values; answers are noise.
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, Iterator

import torch

from .weight_names import disk_name


def tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(canonical name, shape, init kind) of every tensor a checkpoint of this config stores."""
    t, v = config["text_config"], config["vision_config"]
    D, V, I = t["hidden_size"], t["vocab_size"], t["intermediate_size"]
    hd = t.get("head_dim") or D // t["num_attention_heads"]
    q_out, kv_out = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    E, P, F = v["hidden_size"], v["patch_size"], v["intermediate_size"]
    grid = v["image_size"] // P
    specs = [
        ("vision.embeddings.patch_embedding.weight", (E, 3, P, P), "weight"),
        ("vision.embeddings.patch_embedding.bias", (E,), "bias"),
        ("vision.embeddings.position_embedding.weight", (grid * grid, E), "weight"),
    ]
    for i in range(v["num_hidden_layers"]):
        pre = f"vision.encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            specs += [(pre + ln + ".weight", (E,), "norm"), (pre + ln + ".bias", (E,), "bias")]
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += [(pre + f"self_attn.{proj}.weight", (E, E), "weight"), (pre + f"self_attn.{proj}.bias", (E,), "bias")]
        specs += [
            (pre + "mlp.fc1.weight", (F, E), "weight"), (pre + "mlp.fc1.bias", (F,), "bias"),
            (pre + "mlp.fc2.weight", (E, F), "weight"), (pre + "mlp.fc2.bias", (E,), "bias"),
        ]
    specs += [("vision.post_layernorm.weight", (E,), "norm"), ("vision.post_layernorm.bias", (E,), "bias")]
    specs += [
        ("projector.linear_1.weight", (D, E), "weight"), ("projector.linear_1.bias", (D,), "bias"),
        ("projector.linear_2.weight", (D, D), "weight"), ("projector.linear_2.bias", (D,), "bias"),
        ("image_newline", (D,), "embedding"),
        ("lm.embed_tokens.weight", (V, D), "embedding"),
    ]
    for i in range(t["num_hidden_layers"]):
        pre = f"lm.layers.{i}."
        specs += [
            (pre + "input_layernorm.weight", (D,), "norm"),
            (pre + "self_attn.q_proj.weight", (q_out, D), "weight"), (pre + "self_attn.q_proj.bias", (q_out,), "bias"),
            (pre + "self_attn.k_proj.weight", (kv_out, D), "weight"), (pre + "self_attn.k_proj.bias", (kv_out,), "bias"),
            (pre + "self_attn.v_proj.weight", (kv_out, D), "weight"), (pre + "self_attn.v_proj.bias", (kv_out,), "bias"),
            (pre + "self_attn.o_proj.weight", (D, q_out), "weight"),
            (pre + "post_attention_layernorm.weight", (D,), "norm"),
            (pre + "mlp.gate_proj.weight", (I, D), "weight"),
            (pre + "mlp.up_proj.weight", (I, D), "weight"),
            (pre + "mlp.down_proj.weight", (D, I), "weight"),
        ]
    specs.append(("lm.norm.weight", (D,), "norm"))
    if not config["tie_word_embeddings"]:
        specs.append(("lm_head.weight", (V, D), "embedding"))
    return specs


def random_tensor(shape, kind: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen, dtype=torch.float32, device=gen.device)
    if kind == "norm":  # around 1, so the RMSNorm / LayerNorm weight multiply is exercised
        x = 1.0 + 0.1 * x
    elif kind == "bias":
        x = 0.02 * x
    elif kind == "embedding":  # wide logits: random models should not sit on argmax ties
        x = x / math.sqrt(shape[-1])
    else:  # 1/sqrt(fan_in): every layer moves the residual stream, so answers vary with the input
        x = x / math.sqrt(math.prod(shape[1:]))
    return x.to(dtype)


def random_tensors(config: dict, *, seed: int = 0, device="cpu") -> Iterator[tuple[str, str, Callable[..., torch.Tensor]]]:
    """(where, name, read) for every tensor of ``config`` (transformers 5.x names), like
    ``weights.safetensors_tensors``: ``read(index=None)`` makes that tensor (fp32, on ``device``)
    and returns it, or only ``index`` of it."""
    for name, shape, kind in tensor_specs(config):
        def read(index=None, shape=shape, kind=kind, name=name):
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            x = random_tensor(shape, kind, torch.float32, gen)
            return x if index is None else x[index]

        yield "random weights", disk_name(name, "transformers5"), read
