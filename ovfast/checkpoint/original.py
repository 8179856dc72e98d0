"""The original lmms-lab checkpoints (``LlavaQwenForCausalLM``) read as a llava-hf config.

lmms-lab/llava-onevision-qwen2-{0.5b,7b,72b}-{si,ov} keep LLaVA-NeXT's config.json: Qwen2 fields
at the top level, the vision tower named by ``mm_vision_tower`` (a Hub id or a local directory)
and ``mm_*`` fields for the projector and packing. ``hf_config`` turns it into the
``LlavaOnevisionConfig`` dictionary the llava-hf conversion would write, so one parser
(``ModelConfig.from_dict``) serves both families and ``ovfast convert`` writes the same dictionary.
Everything the original decides differently at run time (prompt, unpad rounding, alpha) is the
engine's ``semantics``, not part of this translation.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from ..errors import ConfigError
from .config import _SIGLIP_DEFAULTS, ModelConfig
from .prompts import IMAGE_MARKER, VIDEO_MARKER

LMMS_LAB = "lmms-lab"
LLAVA_HF = "llava-hf"

# google/siglip-so400m-patch14-384's vision config (the full 27-layer tower), built in so that
# the common case needs no network.
SIGLIP_SO400M = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
_BUILT_IN_TOWERS = {"google/siglip-so400m-patch14-384": SIGLIP_SO400M}

# Top-level fields of an lmms-lab config.json that belong to the Qwen2 decoder.
_QWEN2_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings", "use_sliding_window",
    "sliding_window", "max_window_layers", "layer_types", "attention_dropout", "bos_token_id",
    "eos_token_id", "initializer_range", "use_cache", "torch_dtype",
)


def family(config: dict) -> str:
    """"lmms-lab" for an original LLaVA-NeXT config.json, "llava-hf" for a transformers one."""
    if "mm_vision_tower" in config or "LlavaQwenForCausalLM" in (config.get("architectures") or []):
        return LMMS_LAB
    return LLAVA_HF


SEMANTICS = ("original", "transformers")


def model_config(config: dict, checkpoint_dir: Path, tokenizer, semantics: str | None = None) -> tuple[ModelConfig, str]:
    """(the ``ModelConfig`` a checkpoint runs with, its family), for either family.

    ``semantics`` defaults by family: lmms-lab checkpoints reproduce the original LLaVA-NeXT,
    llava-hf ones transformers. Placeholder ids: the tokenizer's ``<image>`` / ``<video>`` when it
    has them (llava-hf: they must agree with config.json); otherwise (lmms-lab) the first two ids
    past the tokenizer's vocabulary, rows the embedding has but no text ever produces.
    """
    if semantics not in (None, *SEMANTICS):
        raise ConfigError(f"semantics={semantics!r}; choose 'original' (LLaVA-NeXT) or 'transformers'")
    kind = family(config)
    ids = (tokenizer.token_id(IMAGE_MARKER), tokenizer.token_id(VIDEO_MARKER))
    if kind == LMMS_LAB:
        if None in ids:
            ids = (tokenizer.vocab_size, tokenizer.vocab_size + 1)
        cfg = ModelConfig.from_dict(hf_config(config, checkpoint_dir, *ids))
        if max(ids) >= cfg.text.vocab_size:
            raise ConfigError(
                f"the tokenizer has {tokenizer.vocab_size} tokens and the embedding {cfg.text.vocab_size} rows: no free ids "
                "for the <image>/<video> placeholders (convert the checkpoint with `ovfast convert`, which adds rows)"
            )
    else:
        cfg = ModelConfig.from_dict(config)
        for token, have, want in zip((IMAGE_MARKER, VIDEO_MARKER), ids, (cfg.image_token_id, cfg.video_token_id)):
            if have != want:
                raise ConfigError(f"the tokenizer maps {token} to {have}, config.json to {want}")
    return replace(cfg, semantics=semantics or ("original" if kind == LMMS_LAB else "transformers")), kind


def hf_config(config: dict, checkpoint_dir: Path, image_token_id: int, video_token_id: int) -> dict:
    """The llava-hf ``config.json`` dictionary equivalent to an lmms-lab one.

    ``image_token_id`` / ``video_token_id`` are the ids the placeholders get (the original has
    none: it splices features in at a -200 sentinel).
    """
    model_type = config.get("model_type")
    if model_type not in ("llava", "llava_qwen", "qwen2", None):
        raise ConfigError(f"lmms-lab config.json has model_type {model_type!r}; expected llava, llava_qwen or qwen2")
    tower = config.get("mm_vision_tower") or config.get("vision_tower")
    if not tower:
        raise ConfigError("lmms-lab config.json names no vision tower (mm_vision_tower)")
    vision = tower_config(str(tower), checkpoint_dir)
    mm_hidden = config.get("mm_hidden_size", vision["hidden_size"])
    if mm_hidden != vision["hidden_size"]:
        raise ConfigError(f"mm_hidden_size {mm_hidden} differs from the vision tower's hidden_size {vision['hidden_size']}")
    # The original deletes the tower's last encoder layer at load and reads the remaining last
    # hidden state (mm_vision_select_layer is not consulted for SigLIP): one layer fewer, feature -1.
    vision = {**vision, "num_hidden_layers": int(vision["num_hidden_layers"]) - 1, "vision_use_head": False}

    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ConfigError(f"mm_projector_type {projector!r} is not supported; LLaVA-OneVision uses 'mlp2x_gelu'")
    aspect = config.get("image_aspect_ratio", "anyres_max_9")
    if not re.fullmatch(r"anyres_max_\d+", str(aspect)):
        raise ConfigError(f"image_aspect_ratio {aspect!r} is not supported; LLaVA-OneVision uses 'anyres_max_N'")
    merge = config.get("mm_patch_merge_type", "spatial_unpad")
    if "spatial_unpad" not in str(merge):
        raise ConfigError(f"mm_patch_merge_type {merge!r} is not supported; LLaVA-OneVision uses 'spatial_unpad'")
    pool_mode = config.get("mm_spatial_pool_mode", "bilinear")
    pool_stride = config.get("mm_spatial_pool_stride", 2)
    if pool_mode != "bilinear" or pool_stride != 2:
        raise ConfigError(f"video pooling {pool_mode!r} with stride {pool_stride} is not supported "
                          "(LLaVA-OneVision pools bilinearly with stride 2)")
    newline = config.get("mm_newline_position", "one_token")
    if newline != "one_token":
        raise ConfigError(f"mm_newline_position {newline!r} is not supported; LLaVA-OneVision uses 'one_token'")

    text = {k: config[k] for k in _QWEN2_FIELDS if k in config}
    text["model_type"] = "qwen2"
    text["architectures"] = ["Qwen2ForCausalLM"]
    return {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "model_type": "llava_onevision",
        "image_grid_pinpoints": pinpoints(config.get("image_grid_pinpoints"), vision["image_size"]),
        "image_token_index": image_token_id,
        "video_token_index": video_token_id,
        "projector_hidden_act": "gelu",  # nn.GELU(): the exact erf form
        "multimodal_projector_bias": True,
        "text_config": text,
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "use_image_newline_parameter": True,
        "vision_aspect_ratio": str(aspect),
        "vision_config": vision,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        **({"torch_dtype": config["torch_dtype"]} if "torch_dtype" in config else {}),
    }


def tower_config(tower: str, checkpoint_dir: Path) -> dict:
    """The full SigLIP vision config ``mm_vision_tower`` names: built in, or a local directory's config.json."""
    for candidate in (Path(tower).expanduser(), checkpoint_dir / tower):
        if (candidate / "config.json").is_file():
            try:
                d = json.loads((candidate / "config.json").read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{candidate / 'config.json'} is not valid JSON: {e}") from e
            vision = d if d.get("model_type") == "siglip_vision_model" else d.get("vision_config", d)
            kind = vision.get("model_type") or d.get("model_type") or "siglip_vision_model"
            if "siglip" not in str(kind):
                raise ConfigError(f"mm_vision_tower {tower!r} is a {kind!r} model; LLaVA-OneVision uses SigLIP")
            return {**_SIGLIP_DEFAULTS, **vision, "model_type": "siglip_vision_model"}
    if tower in _BUILT_IN_TOWERS:
        return dict(_BUILT_IN_TOWERS[tower])
    raise ConfigError(
        f"mm_vision_tower {tower!r} is neither a built-in tower ({', '.join(_BUILT_IN_TOWERS)}) nor a local "
        "directory with a SigLIP config.json"
    )


def pinpoints(value, tile: int) -> list[list[int]]:
    """``image_grid_pinpoints`` as [h, w] pixel pairs: a list, or the original's "(1x1),...,(6x6)" range string.

    The range form spans every (i, j) tile count between its first and last pair, in tiles of
    ``tile`` pixels, as the original code expands it.
    """
    if value is None:
        return [[h * tile, w * tile] for h in range(1, 7) for w in range(1, 7)]
    if isinstance(value, str):
        pairs = re.findall(r"\((\d+)x(\d+)\)", value)
        if not pairs:
            raise ConfigError(f"image_grid_pinpoints {value!r} is neither a list nor of the form '(1x1),...,(6x6)'")
        (a0, b0), (a1, b1) = [tuple(map(int, p)) for p in (pairs[0], pairs[-1])]
        return [[i * tile, j * tile] for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
    try:
        return [[int(h), int(w)] for h, w in value]
    except (TypeError, ValueError):
        raise ConfigError(f"image_grid_pinpoints {value!r} is not a list of [h, w] pairs") from None
