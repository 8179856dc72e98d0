"""Checkpoint tensor names: the on-disk layouts ovfast reads and the canonical names it uses inside.

Canonical names drop the wrappers that differ between transformers versions:
``lm.`` (the Qwen2 model), ``lm_head.``, ``projector.``, ``image_newline`` and ``vision.`` (the
SigLIP vision model). See docs/reference-behaviour.md section 2 for the layouts: llava-hf on disk, transformers
4.52+ and 5.x in memory, transformers >= 5.24 saves, and the original lmms-lab names.
"""
from __future__ import annotations

# (on-disk prefix, canonical prefix), longest first so the most specific prefix wins.
_TO_CANONICAL = (
    ("model.vision_tower.vision_tower.vision_model.", "vision."),  # lmms-lab originals (LLaVA-NeXT)
    ("model.vision_tower.vision_model.", "vision."),  # transformers 4.52-4.x in-memory names
    ("vision_tower.vision_model.", "vision."),  # llava-hf on-disk (saved with 4.45)
    ("model.vision_tower.", "vision."),  # transformers 5.x in memory
    ("vision_tower.", "vision."),  # transformers >= 5.24 save_pretrained of a model built from its config
    ("language_model.model.", "lm."),  # llava-hf on-disk
    ("model.language_model.", "lm."),  # transformers 4.52+ and 5.x
    ("language_model.lm_head.", "lm_head."),  # llava-hf on-disk
    ("lm_head.", "lm_head."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
    ("model.image_newline", "image_newline"),
    ("image_newline", "image_newline"),
    ("model.mm_projector.0.", "projector.linear_1."),  # lmms-lab: Sequential(Linear, GELU, Linear)
    ("model.mm_projector.2.", "projector.linear_2."),
    ("model.", "lm."),  # lmms-lab: the Qwen2 model itself (embed_tokens, layers, norm); last, as the catch-all
)

# Canonical prefix -> on-disk prefix, per layout the random-checkpoint builder can write.
LAYOUTS = {
    # What the llava-hf repositories on the Hub hold (saved by transformers 4.45).
    "llava-hf": {
        "vision.": "vision_tower.vision_model.",
        "lm.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
        "projector.": "multi_modal_projector.",
        "image_newline": "image_newline",
    },
    # What transformers 5.x writes with save_pretrained.
    "transformers5": {
        "vision.": "model.vision_tower.",
        "lm.": "model.language_model.",
        "lm_head.": "lm_head.",
        "projector.": "model.multi_modal_projector.",
        "image_newline": "model.image_newline",
    },
    # The original lmms-lab checkpoints (LlavaQwenForCausalLM, saved by LLaVA-NeXT).
    "lmms-lab": {
        "vision.": "model.vision_tower.vision_tower.vision_model.",
        "lm.": "model.",
        "lm_head.": "lm_head.",
        "projector.linear_1.": "model.mm_projector.0.",
        "projector.linear_2.": "model.mm_projector.2.",
        "image_newline": "model.image_newline",
    },
}


def canonical_name(name: str) -> str | None:
    """Map an on-disk tensor name to its canonical name, or None if it is not ours."""
    for disk, canon in _TO_CANONICAL:
        if name.startswith(disk):
            return canon + name[len(disk):]
    return None


def disk_name(canonical: str, layout: str) -> str:
    """The on-disk name of a canonical tensor name in one of LAYOUTS."""
    for canon, disk in LAYOUTS[layout].items():
        if canonical.startswith(canon):
            return disk + canonical[len(canon):]
    raise KeyError(canonical)
