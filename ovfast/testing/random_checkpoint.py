"""Random-weight LLaVA-OneVision checkpoints in the exact Hugging Face layout.

Tests, benchmarks and the offline demo need a model but cannot download one. ``build_checkpoint``
writes config.json, safetensors weights (single file or sharded with an index), tokenizer.json,
tokenizer_config.json, preprocessor and processor configs, the chat template and
generation_config.json, laid out as the llava-hf repositories are, so transformers loads the
directory as its reference. The weights are random: the model's answers mean nothing. config.json
carries an ``ovfast_random_weights`` entry so every tool can say so.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..checkpoint.hf_files import (added_token_entry, output_dir, remove_weights, save_safetensors, write_json,
                                   write_processor_files)
from ..checkpoint.random_weights import random_tensor, tensor_specs
from ..checkpoint.weight_names import LAYOUTS, disk_name
from ..terminal.progress import progress
from .random_tokenizer import QWEN2_TOKENIZER_CONFIG, SPECIAL_TOKENS, build_tokenizer

_QWEN2_SPECIALS = SPECIAL_TOKENS[:3]  # <|endoftext|>, <|im_start|>, <|im_end|>: what Qwen2's own tokenizer adds

# A plain-text ChatML template for tokenizer_config.json, as Qwen2-Instruct's tokenizer carries one
# (with a default system prompt). Processors ignore it; it is there so loaders must pick the right one.
_TOKENIZER_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    text: dict
    vision: dict
    bpe_vocab: int  # BPE entries before the five special tokens
    vocab_size: int  # rows of embed_tokens / lm_head (padded past the tokenizer, as llava-hf does)
    description: str
    vision_extra: dict = field(default_factory=dict)


_REAL_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16)

PRESETS: dict[str, Preset] = {
    # GQA (6 query heads over 2 kv heads), tied head; every width deliberately not a power of two.
    "tiny": Preset(
        text=dict(hidden_size=48, intermediate_size=88, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, tie_word_embeddings=True),
        vision=dict(hidden_size=36, intermediate_size=60, num_hidden_layers=2, num_attention_heads=3),
        bpe_vocab=397, vocab_size=416, description="tiny test model: GQA, tied embeddings",
    ),
    # Plain multi-head attention, untied head, three vision layers.
    "tiny-mha": Preset(
        text=dict(hidden_size=40, intermediate_size=72, num_hidden_layers=3, num_attention_heads=5,
                  num_key_value_heads=5, tie_word_embeddings=False),
        vision=dict(hidden_size=24, intermediate_size=52, num_hidden_layers=3, num_attention_heads=2),
        bpe_vocab=397, vocab_size=410, description="tiny test model: MHA, untied head",
    ),
    "0.5b": Preset(
        text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, tie_word_embeddings=True),
        vision=_REAL_VISION, bpe_vocab=151643, vocab_size=152000,
        description="llava-onevision-qwen2-0.5b-ov shapes",
    ),
    "7b": Preset(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, tie_word_embeddings=False),
        vision=_REAL_VISION, bpe_vocab=151643, vocab_size=152128,
        description="llava-onevision-qwen2-7b-ov shapes",
    ),
    "72b": Preset(
        text=dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, tie_word_embeddings=False),
        vision=_REAL_VISION, bpe_vocab=151643, vocab_size=152128,
        description="llava-onevision-qwen2-72b-ov shapes",
    ),
}

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def build_config(preset: str = "tiny", *, text: dict | None = None, vision: dict | None = None,
                 extra: dict | None = None) -> dict:
    """The config.json dictionary of a preset, with optional field overrides.

    ``text`` and ``vision`` override fields of the sub-configs, ``extra`` top-level fields.
    The grid pinpoints follow the tile size: every (h, w) from 1 to 6 tiles a side.
    """
    p = PRESETS[preset]
    special = {t: p.bpe_vocab + i for i, t in enumerate(SPECIAL_TOKENS)}
    text_cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "bos_token_id": special["<|endoftext|>"],
        "eos_token_id": special["<|im_end|>"],
        "max_position_embeddings": 32768,
        "max_window_layers": p.text["num_hidden_layers"],
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "vocab_size": p.vocab_size,
        "torch_dtype": "bfloat16",
        **p.text,
        **(text or {}),
    }
    vision_cfg = {
        "model_type": "siglip_vision_model",
        "image_size": 384,
        "patch_size": 14,
        "vision_use_head": False,
        **p.vision,
        **(vision or {}),
    }
    tile = vision_cfg["image_size"]
    return {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "model_type": "llava_onevision",
        "image_grid_pinpoints": [[h * tile, w * tile] for h in range(1, 7) for w in range(1, 7)],
        "image_token_index": special["<image>"],
        "video_token_index": special["<video>"],
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "text_config": text_cfg,
        "tie_word_embeddings": bool(text_cfg["tie_word_embeddings"]),
        "torch_dtype": "float16",
        "use_image_newline_parameter": True,
        "vision_aspect_ratio": "anyres_max_9",
        "vision_config": vision_cfg,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "ovfast_random_weights": {"preset": preset, "description": p.description},
        **(extra or {}),
    }


def random_state(config: dict, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16, device="cpu") -> dict[str, torch.Tensor]:
    """Random weights for ``config`` as an in-memory state dict (transformers 5.x names), made on ``device``.

    For ``ovfast.load(dir, weights=...)`` where writing the checkpoint would be too slow or too big
    (the 7B and 72B shapes): latency does not depend on the weights' values.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    return {disk_name(name, "transformers5"): random_tensor(shape, kind, dtype, gen)
            for name, shape, kind in tensor_specs(config)}


def build_checkpoint(
    out_dir: str | Path,
    preset: str = "tiny",
    *,
    seed: int = 0,
    dtype: str = "float16",
    layout: str = "llava-hf",
    max_shard_bytes: int = 4 << 30,
    template_file: str = "json",
    text: dict | None = None,
    vision: dict | None = None,
    extra: dict | None = None,
    weights: bool = True,
    full_tower: bool = False,
    vocab_files: bool = False,
    overwrite: bool = True,
) -> Path:
    """Write a random-weight checkpoint directory and return its path.

    ``layout`` is "llava-hf" (the names on the Hub, saved by transformers 4.45), "transformers5",
    or "lmms-lab": the original LLaVA-NeXT repository (its config.json, tensor names, a tokenizer
    without <image>/<video>, no chat template), holding the same random weights as the llava-hf
    checkpoint of the same preset and seed. lmms-lab options: ``full_tower`` also stores the
    tower's last layer (the original deletes it at load), ``vocab_files`` writes vocab.json +
    merges.txt instead of tokenizer.json. ``template_file`` is "json" (chat_template.json, as on the Hub) or "jinja".
    Weights larger than ``max_shard_bytes`` are split into shards with an index file.
    ``weights=False`` writes everything but the weights (the 72B shapes do not fit a disk).
    ``overwrite=False`` refuses a directory that already holds files (``ovfast build-checkpoint``
    without ``--force``); overwriting removes the directory's old weights first.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {sorted(LAYOUTS)}")
    out = output_dir(out_dir, overwrite)
    remove_weights(out)  # an old checkpoint's shards or index would be loaded instead of, or with, these
    config = build_config(preset, text=text, vision=vision, extra=extra)
    config["ovfast_random_weights"]["seed"] = seed  # a checkpoint without weights makes them from it
    p = PRESETS[preset]
    special = {t: p.bpe_vocab + i for i, t in enumerate(SPECIAL_TOKENS)}
    write_json(out / "generation_config.json", {
        "bos_token_id": special["<|endoftext|>"], "eos_token_id": special["<|im_end|>"], "transformers_version": "4.45.0",
    })
    extra_layers = 0
    if layout == "lmms-lab":
        write_json(out / "config.json", lmms_lab_config(config, _vision_tower(out, config, preset)))
        _write_lmms_lab_processing_files(out, config, p.bpe_vocab, vocab_files)
        extra_layers = int(full_tower)
    else:
        write_json(out / "config.json", config)
        _write_processing_files(out, config, p.bpe_vocab, template_file)
    if weights:
        _write_weights(out, config, seed, _DTYPES[dtype], layout, max_shard_bytes, extra_layers)
    return out


def lmms_lab_config(config: dict, vision_tower: str) -> dict:
    """The original LLaVA-NeXT config.json (``LlavaQwenForCausalLM``) of a llava-hf style ``config``:
    Qwen2 fields at the top level, the tower named by ``mm_vision_tower``, the ``mm_*`` fields of the
    lmms-lab OneVision repositories."""
    text = {k: v for k, v in config["text_config"].items() if k not in ("architectures", "model_type")}
    return {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava",
        **text,
        "image_aspect_ratio": config["vision_aspect_ratio"],
        "image_crop_resolution": None,
        "image_grid_pinpoints": config["image_grid_pinpoints"],
        "image_split_resolution": None,
        "mm_hidden_size": config["vision_config"]["hidden_size"],
        "mm_newline_position": "one_token",
        "mm_patch_merge_type": "spatial_unpad",
        "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None,
        "mm_spatial_pool_mode": "bilinear",
        "mm_spatial_pool_stride": 2,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": vision_tower,
        "tokenizer_model_max_length": 32768,
        "tokenizer_padding_side": "right",
        "use_mm_proj": True,
        "vision_tower_pretrained": None,
        "ovfast_random_weights": config["ovfast_random_weights"],
    }


def _vision_tower(out: Path, config: dict, preset: str) -> str:
    """``mm_vision_tower`` of an lmms-lab checkpoint: the built-in SigLIP id at the real shapes,
    else a local tower directory (a SiglipConfig config.json counting the full tower, one layer
    more than the checkpoint runs), as the original code accepts."""
    v = config["vision_config"]
    if PRESETS[preset].vision is _REAL_VISION and v["num_hidden_layers"] == _REAL_VISION["num_hidden_layers"]:
        return "google/siglip-so400m-patch14-384"
    tower = out / "siglip_tower"
    tower.mkdir(exist_ok=True)
    full = {k: val for k, val in v.items() if k != "vision_use_head"}
    full.update(num_hidden_layers=v["num_hidden_layers"] + 1, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    write_json(tower / "config.json", {
        "architectures": ["SiglipModel"], "model_type": "siglip",
        "text_config": {"model_type": "siglip_text_model"}, "vision_config": full,
    })
    return str(tower.resolve())


def _write_weights(out: Path, config: dict, seed: int, dtype: torch.dtype, layout: str, max_shard_bytes: int,
                   extra_layers: int = 0) -> None:
    specs = tensor_specs(config)
    if extra_layers:  # after everything else, so the other tensors equal the llava-hf checkpoint's
        more = {**config, "vision_config": {**config["vision_config"],
                                            "num_hidden_layers": config["vision_config"]["num_hidden_layers"] + extra_layers}}
        have = {name for name, _, _ in specs}
        specs += [spec for spec in tensor_specs(more) if spec[0] not in have]
    nbytes = [math.prod(shape) * dtype.itemsize for _, shape, _ in specs]
    shards: list[list[int]] = [[]]
    size = 0
    for i, n in enumerate(nbytes):
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    bar = progress(desc="writing random weights", total=sum(nbytes), unit="B", unit_scale=True)
    for k, members in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for i in members:
            name, shape, kind = specs[i]
            tensors[disk_name(name, layout)] = random_tensor(shape, kind, dtype, gen)
            weight_map[disk_name(name, layout)] = fname
            bar.update(nbytes[i])
        save_safetensors(tensors, out / fname)
        del tensors
    bar.close()
    if len(shards) > 1:
        write_json(out / "model.safetensors.index.json", {
            "metadata": {"total_size": sum(nbytes)}, "weight_map": weight_map,
        })


def _tokenizer_config(bpe_vocab: int, specials: tuple[str, ...], processor: bool) -> dict:
    """Qwen2's tokenizer_config.json, with the special tokens after the BPE vocabulary (``processor``:
    as a llava-hf repository saves it, left padding and the processor's class)."""
    return {
        **QWEN2_TOKENIZER_CONFIG,
        "added_tokens_decoder": {str(bpe_vocab + i): added_token_entry(t) for i, t in enumerate(specials)},
        "chat_template": _TOKENIZER_CHAT_TEMPLATE,
        **({"padding_side": "left", "processor_class": "LlavaOnevisionProcessor"} if processor else {}),
    }


def _write_processing_files(out: Path, config: dict, bpe_vocab: int, template_file: str) -> None:
    build_tokenizer(bpe_vocab).save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", _tokenizer_config(bpe_vocab, SPECIAL_TOKENS, processor=True))
    write_processor_files(out, config, template_file)


def _write_lmms_lab_processing_files(out: Path, config: dict, bpe_vocab: int, vocab_files: bool) -> None:
    """What an lmms-lab repository holds beside its weights: Qwen2's tokenizer (no <image>/<video>
    tokens, the text model's chat template) and a SigLIP preprocessor_config.json."""
    tok = json.loads(build_tokenizer(bpe_vocab).to_str())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] in _QWEN2_SPECIALS]
    tokenizer = Tokenizer.from_str(json.dumps(tok))
    tokenizer_config = _tokenizer_config(bpe_vocab, _QWEN2_SPECIALS, processor=False)
    if vocab_files:
        from .random_tokenizer import write_vocab_merges

        write_vocab_merges(tokenizer, out)
    else:
        tokenizer.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", tokenizer_config)
    tile = config["vision_config"]["image_size"]
    write_json(out / "preprocessor_config.json", {
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 3,
        "rescale_factor": 1 / 255, "size": {"height": tile, "width": tile},
    })
