"""The model's hyperparameters, read from a Hugging Face config.json without transformers.

Missing fields take the defaults transformers 5.x gives them (SiglipVisionConfig, Qwen2Config,
LlavaOnevisionConfig), so a config.json written with diffs only reads the same here as there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

# LlavaOnevisionConfig's default pinpoints: every (h, w) with h, w in 384..2304 step 384, h-major.
DEFAULT_PINPOINTS = tuple((h, w) for h in range(384, 2305, 384) for w in range(384, 2305, 384))

# The vision tower used when config.json has no vision_config at all (LlavaOnevisionConfig's sub-config default).
_OV_VISION_DEFAULTS = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "patch_size": 14,
    "image_size": 384,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
}
_SIGLIP_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
_QWEN2_DEFAULTS = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
}
_GELU_KINDS = {"gelu": "none", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    gelu_approximate: str  # "tanh" for SigLIP's gelu_pytorch_tanh

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per side: 384 // 14 = 27 (the last 6 pixel rows and columns are never seen)."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class TextConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig
    text: TextConfig
    image_token_id: int
    video_token_id: int
    grid_pinpoints: tuple[tuple[int, int], ...]
    vision_feature_layer: int  # index into hidden_states (0 = embeddings, -1 = last layer)
    max_num_patches: int  # the N of "anyres_max_N"
    projector_gelu: str  # "none" = exact erf GELU
    projector_bias: bool
    raw: dict
    # Whose reference the engine reproduces where the two disagree (docs/reference-behaviour.md section 11):
    # "transformers" (LlavaOnevisionForConditionalGeneration) or "original" (LLaVA-NeXT).
    semantics: str = "transformers"

    @property
    def vision_layers_used(self) -> int:
        """How many encoder layers run: hidden_states[k] is the output of layer k (0 is the embeddings)."""
        n = self.vision.num_layers
        k = self.vision_feature_layer
        return k if k >= 0 else n + 1 + k

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type not in (None, "llava_onevision"):
            raise ConfigError(f"config.json has model_type {model_type!r}; ovfast runs 'llava_onevision' checkpoints")
        vision = _vision_config(d.get("vision_config"))
        text = _text_config(d.get("text_config"), top_level_tie=bool(d.get("tie_word_embeddings", False)))

        layer = d.get("vision_feature_layer", -1)
        if not isinstance(layer, int):
            raise ConfigError(f"vision_feature_layer={layer!r}: only a single layer index is supported")
        if not -vision.num_layers - 1 <= layer <= vision.num_layers:
            raise ConfigError(f"vision_feature_layer={layer} is outside the {vision.num_layers}-layer tower")
        strategy = d.get("vision_feature_select_strategy", "full")
        if strategy != "full":
            raise ConfigError(
                f"vision_feature_select_strategy={strategy!r}: LLaVA-OneVision packs all "
                f"{vision.num_positions} positions ('full'); other strategies are not supported"
            )
        aspect = d.get("vision_aspect_ratio", "anyres_max_9")
        try:
            max_patches = int(str(aspect).strip("anyres_max_"))  # transformers parses it exactly this way
        except ValueError:
            raise ConfigError(f"vision_aspect_ratio={aspect!r} is not of the form 'anyres_max_N'") from None
        act = d.get("projector_hidden_act", "gelu")
        if act not in _GELU_KINDS:
            raise ConfigError(f"projector_hidden_act={act!r} is not supported (expected one of {sorted(_GELU_KINDS)})")
        pins = d.get("image_grid_pinpoints") or DEFAULT_PINPOINTS
        pinpoints = tuple((int(h), int(w)) for h, w in pins)
        for h, w in pinpoints:
            if h % vision.image_size or w % vision.image_size:
                raise ConfigError(f"grid pinpoint {h}x{w} is not a multiple of the {vision.image_size}px tile")
        return cls(
            vision=vision,
            text=text,
            image_token_id=int(d.get("image_token_index", d.get("image_token_id", 151646))),
            video_token_id=int(d.get("video_token_index", d.get("video_token_id", 151647))),
            grid_pinpoints=pinpoints,
            vision_feature_layer=layer,
            max_num_patches=max_patches,
            projector_gelu=_GELU_KINDS[act],
            projector_bias=bool(d.get("multimodal_projector_bias", True)),
            raw=d,
        )


def _vision_config(v: dict | None) -> VisionConfig:
    merged = dict(_SIGLIP_DEFAULTS)
    merged.update(_OV_VISION_DEFAULTS if v is None else v)
    act = merged["hidden_act"]
    if act not in _GELU_KINDS:
        raise ConfigError(f"vision_config.hidden_act={act!r} is not supported")
    image_size, patch_size = merged["image_size"], merged["patch_size"]
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise ConfigError("vision_config.image_size and patch_size must be single integers")
    hidden, heads = int(merged["hidden_size"]), int(merged["num_attention_heads"])
    if hidden % heads:
        raise ConfigError(f"vision hidden_size {hidden} is not divisible by {heads} heads")
    if math.isqrt((image_size // patch_size) ** 2) != image_size // patch_size:  # pragma: no cover - always square
        raise ConfigError("vision grid must be square")
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=int(merged["intermediate_size"]),
        num_layers=int(merged["num_hidden_layers"]),
        num_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=int(merged["num_channels"]),
        layer_norm_eps=float(merged["layer_norm_eps"]),
        gelu_approximate=_GELU_KINDS[act],
    )


def _text_config(t: dict | None, top_level_tie: bool) -> TextConfig:
    t = dict(t or {})
    model_type = t.get("model_type", "qwen2")
    if model_type != "qwen2":
        raise ConfigError(f"text_config.model_type={model_type!r}: ovfast runs Qwen2 decoders only")
    merged = dict(_QWEN2_DEFAULTS)
    merged.update(t)
    if merged["hidden_act"] != "silu":
        raise ConfigError(f"text_config.hidden_act={merged['hidden_act']!r}: Qwen2 uses 'silu'")
    heads = int(merged["num_attention_heads"])
    kv_heads = int(merged["num_key_value_heads"] or heads)
    if heads % kv_heads:
        raise ConfigError(f"{heads} attention heads are not a multiple of {kv_heads} key/value heads")
    head_dim = int(merged.get("head_dim") or merged["hidden_size"] // heads)
    if head_dim % 2:
        raise ConfigError(f"head_dim {head_dim} must be even for rotary embeddings")
    if merged["use_sliding_window"]:
        layer_types = merged.get("layer_types") or []
        if not layer_types or any(x != "full_attention" for x in layer_types):
            raise ConfigError("sliding-window attention is not supported (use_sliding_window is true)")
    rope = merged.get("rope_parameters") or merged.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"rope type {rope_type!r} is not supported; LLaVA-OneVision uses default RoPE")
    theta = rope.get("rope_theta", merged.get("rope_theta", 10000.0))
    return TextConfig(
        hidden_size=int(merged["hidden_size"]),
        intermediate_size=int(merged["intermediate_size"]),
        num_layers=int(merged["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=int(merged["vocab_size"]),
        rms_norm_eps=float(merged["rms_norm_eps"]),
        rope_theta=float(theta),
        max_position_embeddings=int(merged["max_position_embeddings"]),
        # transformers: the top-level flag is forced on when the text config asks for tying.
        tie_word_embeddings=bool(top_level_tie or merged["tie_word_embeddings"]),
    )
