"""LLaVA-OneVision: SigLIP tower -> projector -> packed features -> Qwen2 (REFERENCE.md sections 5-7).

Packing turns each item's projected tiles into the token rows its placeholders receive:
  * single image (anyres): base tile, then the tile grid as one map, unpadded, downscaled when
    over anyres_max_9, with a newline vector ending every row;
  * one of several images: the tile's 729 rows and one newline;
  * video: every frame pooled 27x27 -> 14x14 with bilinear interpolation, one newline at the end.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import anyres, ops
from ..config import ModelConfig
from .qwen2 import Qwen2ForCausalLM
from .siglip import SiglipVisionTower


class LlavaOnevision(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, e = cfg.text.hidden_size, cfg.vision.hidden_size
        self.vision_tower = SiglipVisionTower(cfg.vision, cfg.vision_layers_used)
        self.projector_w1 = nn.Parameter(torch.empty(d, e))
        self.projector_w2 = nn.Parameter(torch.empty(d, d))
        self.projector_b1 = nn.Parameter(torch.empty(d)) if cfg.projector_bias else None
        self.projector_b2 = nn.Parameter(torch.empty(d)) if cfg.projector_bias else None
        self.image_newline = nn.Parameter(torch.empty(d))
        self.language_model = Qwen2ForCausalLM(cfg.text)

    def encode_tiles(self, pixels: torch.Tensor, chunk: int = 16, scale: torch.Tensor | None = None,
                     shift: torch.Tensor | None = None) -> torch.Tensor:
        """pixels (N, 3, S, S) -> projected features (N, P, D), ``chunk`` tiles through the tower at a time.

        uint8 pixels need ``scale`` and ``shift`` (see ``SiglipVisionTower.forward``). Each
        chunk's projection is written straight into its rows of the result.
        """
        n = pixels.shape[0]
        w2 = self.projector_w2
        out = torch.empty((n, self.cfg.vision.num_positions, w2.shape[0]), dtype=w2.dtype, device=w2.device)
        for i in range(0, n, chunk):
            feats = self.vision_tower(pixels[i : i + chunk], scale, shift)
            ops.projector(feats, self.projector_w1, self.projector_b1, w2, self.projector_b2,
                          self.cfg.projector_gelu, out=out[i : i + chunk])
        return out

    def pack_anyres(self, feats: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """feats (1 + gh*gw, P, D) of one single image -> (num_tokens, D)."""
        cfg, g = self.cfg, self.cfg.vision.grid
        layout = anyres.anyres_layout(*image_size, cfg.grid_pinpoints, cfg.vision.image_size, g, cfg.max_num_patches)
        gh, gw = layout["grid"]
        d = feats.shape[-1]
        fmap = feats[1:].view(gh, gw, g, g, d).permute(0, 2, 1, 3, 4).reshape(gh * g, gw * g, d)  # (rows, cols, D)
        r0, r1, c0, c1 = layout["crop"]
        fmap = fmap[r0:r1, c0:c1]
        if layout["downscale"] is not None:
            fmap = ops.bilinear_resize(fmap[None], *layout["downscale"])[0]
        rows = fmap.shape[0]
        newline = self.image_newline.to(fmap.dtype).expand(rows, 1, d)
        grid_rows = torch.cat((fmap, newline), dim=1).reshape(-1, d)
        return torch.cat((feats[0], grid_rows))

    def pack_multi(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (1, P, D) of one image among several -> (P + 1, D)."""
        return torch.cat((feats[0], self.image_newline.to(feats.dtype)[None]))

    def pack_video(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (F, P, D) of a video's frames -> (F * 196 + 1, D)."""
        g = self.cfg.vision.grid
        f, _, d = feats.shape
        pooled = ops.bilinear_resize(feats.view(f, g, g, d), anyres.pooled_grid(g), anyres.pooled_grid(g))
        return torch.cat((pooled.reshape(-1, d), self.image_newline.to(feats.dtype)[None]))
