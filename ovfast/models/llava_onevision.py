"""LLaVA-OneVision: SigLIP tower -> projector -> packed features -> Qwen2 (docs/reference-behaviour.md sections 5-7).

Packing turns each item's projected tiles into the token rows its placeholders receive:
  * single image (anyres): base tile, then the tile grid as one map, unpadded, downscaled when
    over anyres_max_9, with a newline vector ending every row;
  * one of several images: the tile's 729 rows and one newline;
  * video: every frame pooled 27x27 -> 14x14 with bilinear interpolation, one newline at the end.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..checkpoint.config import ModelConfig
from ..distributed import ShardPlan, TensorParallel
from .qwen2 import Qwen2ForCausalLM
from .siglip import SiglipVisionTower


class LlavaOnevision(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: ShardPlan | None = None, tp: TensorParallel | None = None):
        super().__init__()
        self.cfg = cfg
        d, e = cfg.text.hidden_size, cfg.vision.hidden_size
        self.vision_tower = SiglipVisionTower(cfg.vision, cfg.vision_layers_used)
        self.projector_w1 = nn.Parameter(torch.empty(d, e))
        self.projector_w2 = nn.Parameter(torch.empty(d, d))
        self.projector_b1 = nn.Parameter(torch.empty(d)) if cfg.projector_bias else None
        self.projector_b2 = nn.Parameter(torch.empty(d)) if cfg.projector_bias else None
        self.image_newline = nn.Parameter(torch.empty(d))
        self.language_model = Qwen2ForCausalLM(cfg.text, plan, tp)  # rank 0's share under tensor parallelism

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

    def pack_anyres(self, feats: torch.Tensor, layout: dict) -> torch.Tensor:
        """feats (1 + gh*gw, P, D) of one single image -> (num_tokens, D).

        ``layout`` is the image's ``inputs.anyres.anyres_layout``: the geometry that counted its
        placeholders and cut its tiles also crops and downscales its features.
        """
        g = self.cfg.vision.grid
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
        side = math.ceil(g / 2)  # 27 -> 14, as inputs.anyres.pooled_grid counts it
        pooled = ops.bilinear_resize(feats.view(f, g, g, d), side, side)
        return torch.cat((pooled.reshape(-1, d), self.image_newline.to(feats.dtype)[None]))

    def prompt_gemm_weights(self) -> list[torch.Tensor]:
        """The weights of a prompt's large GEMMs: the vision tower's layers first (nothing else reads
        them), then the decoder's (whose decode step reads them too), for a backend that keeps a
        GEMM-friendly copy (``ops.cpu_native.pack_weights``)."""
        vision = [w for x in self.vision_tower.layers for w in (x.qkv_weight, x.out_weight, x.fc1_weight, x.fc2_weight)]
        text = [w for x in self.language_model.layers for w in (x.qkv_weight, x.o_weight, x.gate_up_weight, x.down_weight)]
        return vision + text

    def weight_destinations(self) -> dict[str, tuple[torch.Tensor, slice | None, tuple | None]]:
        """Canonical tensor name (``checkpoint.weight_names``) -> (parameter, row slice of it or None,
        index into the checkpoint tensor or None); the decoder's come from ``Qwen2ForCausalLM``."""
        cfg = self.cfg
        dest: dict[str, tuple[torch.Tensor, slice | None]] = {}
        tower = self.vision_tower
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
        dest["projector.linear_1.weight"] = (self.projector_w1, None)
        dest["projector.linear_2.weight"] = (self.projector_w2, None)
        if cfg.projector_bias:
            dest["projector.linear_1.bias"] = (self.projector_b1, None)
            dest["projector.linear_2.bias"] = (self.projector_b2, None)
        dest["image_newline"] = (self.image_newline, None)

        dest = {name: (param, rows, None) for name, (param, rows) in dest.items()}
        dest.update(self.language_model.weight_destinations())
        return dest
