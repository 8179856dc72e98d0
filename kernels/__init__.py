"""Triton kernels for ovfast, installed as the subpackage ``ovfast.kernels``.

This folder is mapped to ``ovfast.kernels`` by setup.py (a top-level ``kernels`` module would clash
with the PyPI package of that name). Each public function here replaces the same-named op of
``ovfast.ops`` when kernels are enabled (``ovfast.ops.backends``), takes the same arguments, and is
tested against ``ovfast.ops.<name>.reference`` under ``TRITON_INTERPRET=1`` on the CPU.
"""

# Vision kernels
# Device tiling has no ops.py twin: ovfast.inputs.device_tiles calls it, ovfast.preprocess is its oracle.
from .anyres import anyres_tile, pad_square_tile, squash_tiles

# Decoder kernels
from .attention import (
    attention_backend,
    attention_chunk,
    attention_decode,
    attention_prefill,
    preferred_block_size,
)
from .bilinear_resize import bilinear_resize
from .patch_embed import patch_embed
from .projector import projector
from .rms_norm import rms_norm
from .rope import rope
from .silu_mul import silu_mul

__all__ = [
    "anyres_tile", "attention_backend", "attention_chunk", "attention_decode", "attention_prefill", "bilinear_resize",
    "pad_square_tile", "patch_embed", "preferred_block_size", "projector", "rms_norm", "rope", "silu_mul",
    "squash_tiles",
]
