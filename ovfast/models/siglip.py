"""SigLIP vision tower, truncated at the layer LLaVA-OneVision reads (docs/reference-behaviour.md section 4).

Pre-LN encoder layers with fused q/k/v; the feature is the last used layer's output, *before*
the post-layernorm, which is never applied. Parameter names follow transformers', with the
q/k/v projections fused at load time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..checkpoint.config import VisionConfig


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        e, f = cfg.hidden_size, cfg.intermediate_size
        self.cfg = cfg
        self.layer_norm1_weight = nn.Parameter(torch.empty(e))
        self.layer_norm1_bias = nn.Parameter(torch.empty(e))
        self.qkv_weight = nn.Parameter(torch.empty(3 * e, e))
        self.qkv_bias = nn.Parameter(torch.empty(3 * e))
        self.out_weight = nn.Parameter(torch.empty(e, e))
        self.out_bias = nn.Parameter(torch.empty(e))
        self.layer_norm2_weight = nn.Parameter(torch.empty(e))
        self.layer_norm2_bias = nn.Parameter(torch.empty(e))
        self.fc1_weight = nn.Parameter(torch.empty(f, e))
        self.fc1_bias = nn.Parameter(torch.empty(f))
        self.fc2_weight = nn.Parameter(torch.empty(e, f))
        self.fc2_bias = nn.Parameter(torch.empty(e))

    def forward(self, h: torch.Tensor, cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
        """h (T, E) packed tiles -> (T, E)."""
        cfg = self.cfg
        x = F.layer_norm(h, (cfg.hidden_size,), self.layer_norm1_weight, self.layer_norm1_bias, cfg.layer_norm_eps)
        qkv = ops.linear(x, self.qkv_weight, self.qkv_bias).view(h.shape[0], 3, cfg.num_heads, cfg.head_dim)
        q, k, v = qkv.unbind(1)  # each (T, H, hd)
        attn = ops.attention_prefill(q, k, v, cu_seqlens, seq_len, causal=False, scale=cfg.head_dim**-0.5)
        h = h + ops.linear(attn.reshape(h.shape), self.out_weight, self.out_bias)
        x = F.layer_norm(h, (cfg.hidden_size,), self.layer_norm2_weight, self.layer_norm2_bias, cfg.layer_norm_eps)
        x = ops.linear_gelu(x, self.fc1_weight, self.fc1_bias, approximate=cfg.gelu_approximate)
        return h + ops.linear(x, self.fc2_weight, self.fc2_bias)


class SiglipVisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig, num_layers: int):
        super().__init__()
        self.cfg = cfg
        p, e = cfg.patch_size, cfg.hidden_size
        self.patch_weight = nn.Parameter(torch.empty(e, cfg.num_channels, p, p))
        self.patch_bias = nn.Parameter(torch.empty(e))
        self.position_embedding = nn.Parameter(torch.empty(cfg.num_positions, e))
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(num_layers))

    def forward(self, pixels: torch.Tensor, scale: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        """pixels (N, 3, S, S) -> features (N, P, E) of the last layer kept.

        Float pixels are normalised already. uint8 pixels (any strides, e.g. HWC tiles permuted)
        come with the per-channel fp32 ``scale`` and ``shift`` that normalise them inside the
        patch embedding, so they reach the device as bytes (``device_tiles.pixel_affine``).
        """
        n = pixels.shape[0]
        if pixels.is_floating_point():
            pixels = pixels.to(self.patch_weight.dtype)
        h = ops.patch_embed(pixels, self.patch_weight, self.patch_bias, self.position_embedding, scale, shift)
        seq = h.shape[1]
        cu_seqlens = torch.arange(0, (n + 1) * seq, seq, dtype=torch.int32, device=h.device)
        h = h.reshape(n * seq, -1)
        for layer in self.layers:
            h = layer(h, cu_seqlens, seq)
        return h.view(n, seq, -1)
