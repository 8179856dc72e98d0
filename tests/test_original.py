"""The original lmms-lab checkpoints and the original LLaVA-NeXT semantics.

Each lmms-lab test checkpoint holds the same random weights as a llava-hf "twin" (same preset and
seed), so transformers on the twin, fed the original ``qwen_1_5`` prompt, is the reference for
the original semantics wherever the two implementations agree (docs/reference-behaviour.md section 11); where
they differ (unpad rounding, alpha) the tests pin the original's rule.
"""
from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoTokenizer

import ovfast
import reference as ref
from ovfast.checkpoint import original
from ovfast.checkpoint.config import ModelConfig
from ovfast.checkpoint.prompts import render_qwen_1_5
from ovfast.checkpoint.weight_names import canonical_name
from ovfast.errors import ConfigError, PlaceholderError
from ovfast.inputs.anyres import anyres_num_tokens
from ovfast.runtime.request import SamplingParams, chat_messages
from ovfast.testing.random_checkpoint import build_checkpoint

N = 10
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def qwen_1_5(user: str) -> str:
    return f"{SYSTEM}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """{preset: (llava-hf dir, lmms-lab dir)}; tiny-mha's lmms-lab copy stores the full tower."""
    root = tmp_path_factory.mktemp("twins")
    out = {}
    for preset, kw in (("tiny", {}), ("tiny-mha", {"full_tower": True})):
        hf = build_checkpoint(root / f"{preset}-hf", preset, seed=11, dtype="float32")
        lm = build_checkpoint(root / f"{preset}-lmms", preset, seed=11, dtype="float32", layout="lmms-lab", **kw)
        out[preset] = (str(hf), str(lm))
    return out


@pytest.fixture(scope="module")
def engines(twins):
    return {p: ovfast.load(lm, max_seq_len=8192, dtype="float32") for p, (_, lm) in twins.items()}


@pytest.fixture(params=["tiny", "tiny-mha"])
def twin(request, twins, engines):
    hf, lm = twins[request.param]
    return hf, lm, engines[request.param]


# --- config.json and tensor names -----------------------------------------------------------------

def _lmms_7b_config(**over) -> dict:
    return {
        "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "vocab_size": 152064, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "tie_word_embeddings": False, "use_sliding_window": False, "hidden_act": "silu",
        "image_aspect_ratio": "anyres_max_9", "image_grid_pinpoints": "(1x1),...,(6x6)",
        "mm_hidden_size": 1152, "mm_newline_position": "one_token", "mm_patch_merge_type": "spatial_unpad",
        "mm_projector_type": "mlp2x_gelu", "mm_spatial_pool_mode": "bilinear", "mm_vision_select_layer": -2,
        "mm_vision_tower": "google/siglip-so400m-patch14-384", **over,
    }


def test_lmms_lab_config_reads_as_the_llava_hf_one(tmp_path):
    cfg = ModelConfig.from_dict(original.hf_config(_lmms_7b_config(), tmp_path, 151646, 151647))
    assert original.family(_lmms_7b_config()) == "lmms-lab"
    assert (cfg.vision.num_layers, cfg.vision_feature_layer, cfg.vision_layers_used) == (26, -1, 26)
    assert (cfg.vision.hidden_size, cfg.vision.num_heads, cfg.vision.grid, cfg.vision.gelu_approximate) == (1152, 16, 27, "tanh")
    assert (cfg.text.hidden_size, cfg.text.num_kv_heads, cfg.text.vocab_size, cfg.text.rope_theta) == (3584, 4, 152064, 1e6)
    assert cfg.grid_pinpoints == tuple((h * 384, w * 384) for h in range(1, 7) for w in range(1, 7))
    assert (cfg.max_num_patches, cfg.projector_gelu, cfg.projector_bias) == (9, "none", True)
    assert (cfg.image_token_id, cfg.video_token_id) == (151646, 151647)
    listed = original.hf_config(_lmms_7b_config(image_grid_pinpoints=[[384, 768], [768, 384]]), tmp_path, 1, 2)
    assert listed["image_grid_pinpoints"] == [[384, 768], [768, 384]]
    for model_type in ("llava_qwen", "qwen2"):
        original.hf_config(_lmms_7b_config(model_type=model_type), tmp_path, 1, 2)


@pytest.mark.parametrize("override,needle", [
    ({"mm_projector_type": "linear"}, "mm_projector_type"),
    ({"mm_vision_tower": "openai/clip-vit-large-patch14"}, "neither a built-in tower"),
    ({"mm_newline_position": "grid"}, "mm_newline_position"),
    ({"mm_spatial_pool_mode": "average"}, "pooling"),
    ({"image_aspect_ratio": "pad"}, "image_aspect_ratio"),
    ({"mm_patch_merge_type": "flat"}, "mm_patch_merge_type"),
    ({"model_type": "mistral"}, "model_type"),
    ({"mm_hidden_size": 1024}, "mm_hidden_size"),
    ({"image_grid_pinpoints": "six by six"}, "image_grid_pinpoints"),
])
def test_lmms_lab_config_errors_name_the_field(tmp_path, override, needle):
    with pytest.raises(ConfigError, match=needle):
        original.hf_config(_lmms_7b_config(**override), tmp_path, 1, 2)


def test_local_tower_directory_and_non_siglip_tower(tmp_path):
    tower = tmp_path / "clip"
    tower.mkdir()
    (tower / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": {"model_type": "clip_vision_model"}}))
    with pytest.raises(ConfigError, match="SigLIP"):
        original.hf_config(_lmms_7b_config(mm_vision_tower=str(tower)), tmp_path, 1, 2)
    (tower / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model", "hidden_size": 1152,
                                                   "num_hidden_layers": 5, "num_attention_heads": 16}))
    vision = original.hf_config(_lmms_7b_config(mm_vision_tower="clip"), tmp_path, 1, 2)["vision_config"]  # relative
    assert vision["num_hidden_layers"] == 4 and vision["patch_size"] == 16  # SiglipVisionConfig's default patch


def test_lmms_lab_tensor_names():
    assert canonical_name("model.vision_tower.vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight") == \
        "vision.encoder.layers.3.mlp.fc1.weight"
    assert canonical_name("model.mm_projector.0.weight") == "projector.linear_1.weight"
    assert canonical_name("model.mm_projector.2.bias") == "projector.linear_2.bias"
    assert canonical_name("model.layers.7.self_attn.q_proj.bias") == "lm.layers.7.self_attn.q_proj.bias"
    assert canonical_name("model.embed_tokens.weight") == "lm.embed_tokens.weight"
    assert canonical_name("model.image_newline") == "image_newline"
    # the llava-hf and transformers names still win over the lmms-lab catch-all
    assert canonical_name("model.language_model.norm.weight") == "lm.norm.weight"
    assert canonical_name("model.multi_modal_projector.linear_2.weight") == "projector.linear_2.weight"


def test_unpad_truncation_counts():
    """docs/reference-behaviour.md section 11 row 4: sizes where int() and int(round(., 7)) give different token counts."""
    pins = [(h * 384, w * 384) for h in range(1, 7) for w in range(1, 7)]
    for (h, w), (hf, orig) in {(820, 738): (4084, 3974), (750, 1750): (7641, 7533), (47, 423): (1114, 1004),
                               (369, 820): (2403, 2349)}.items():
        assert anyres_num_tokens(h, w, pins) == hf
        assert anyres_num_tokens(h, w, pins, truncate=True) == orig
    assert anyres_num_tokens(300, 400, pins) == anyres_num_tokens(300, 400, pins, truncate=True)


# --- loading and the original semantics -----------------------------------------------------------

def test_family_semantics_and_placeholders(twin):
    hf, lm, engine = twin
    info = engine.info()
    assert (info["family"], info["semantics"]) == ("lmms-lab", "original")
    vocab = AutoTokenizer.from_pretrained(hf)
    assert engine.model_config.image_token_id == vocab.convert_tokens_to_ids("<image>")
    assert engine.model_config.video_token_id == vocab.convert_tokens_to_ids("<video>")
    assert vocab.convert_tokens_to_ids("<|im_end|>") in engine.eos_ids
    hf_engine = ovfast.load(hf, max_seq_len=2048, dtype="float32")
    assert (hf_engine.info()["family"], hf_engine.info()["semantics"]) == ("llava-hf", "transformers")
    with pytest.raises(ConfigError, match="semantics"):
        ovfast.load(lm, semantics="llava")


def test_full_tower_checkpoint_skips_the_last_layer(twins, engines):
    n = engines["tiny-mha"].model_config.vision.num_layers
    skipped = engines["tiny-mha"].info()["skipped_tensors"]
    assert any(f"encoder.layers.{n}." in s for s in skipped)
    assert not any(f"encoder.layers.{n}." in s for s in engines["tiny"].info()["skipped_tensors"])


def test_prompt_tokens_are_the_rendered_qwen_1_5(twin):
    hf, _, engine = twin
    pic = ref.synthetic_image(200, 300, seed=1)
    req = engine.requests.prepare(pic, "What is it?", True, SamplingParams.make())
    expected = ref.inputs(hf, [pic], qwen_1_5("<image>\nWhat is it?"), chat=False)["input_ids"][0].tolist()
    assert req.input_ids == expected
    # the caller's markers stay where they are
    req = engine.requests.prepare(pic, "Look: <image> what is it?", True, SamplingParams.make())
    assert req.input_ids == ref.inputs(hf, [pic], qwen_1_5("Look: <image> what is it?"), chat=False)["input_ids"][0].tolist()


@pytest.mark.parametrize("case", ["text", "image", "two_images", "video", "image_and_video"])
def test_greedy_equals_transformers_on_the_twin_with_the_original_prompt(twin, case):
    hf, _, engine = twin
    pics = {"image": [ref.synthetic_image(300, 200, seed=2)],
            "two_images": [ref.synthetic_image(150, 260, seed=3), ref.synthetic_image(240, 100, seed=4)],
            "image_and_video": [ref.synthetic_image(120, 90, seed=5)]}.get(case, [])
    videos = [ref.video_frames(3, 100, 140, seed=6)] if "video" in case else []
    markers = "<image>\n" * len(pics) + "<video>\n" * len(videos)
    prompt = qwen_1_5(markers + "Describe.")
    expected = ref.greedy(hf, pics, prompt, N, videos=videos, chat=False)
    items = pics + [ovfast.Video(v) for v in videos]
    assert engine.complete(items, "Describe.", max_new_tokens=N).token_ids == expected
    with torch.no_grad():  # every prompt position, not only the greedy path
        want = ref.model(hf)(**ref.inputs(hf, pics, prompt, videos, chat=False)).logits[0]
    torch.testing.assert_close(engine.logits(items, "Describe."), want, rtol=1e-4, atol=1e-4)


def test_multi_turn_messages_and_system_prompt(twin):
    hf, _, engine = twin
    pic = ref.synthetic_image(90, 120, seed=7)
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image", "image": pic}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": "And its colour?"},
    ]
    prompt = ("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n"
              "<|im_start|>assistant\nA square.<|im_end|>\n<|im_start|>user\nAnd its colour?<|im_end|>\n"
              "<|im_start|>assistant\n")
    conversation, _ = chat_messages(messages)
    assert render_qwen_1_5(conversation) == prompt
    assert engine.chat(messages, max_new_tokens=N).token_ids == ref.greedy(hf, [pic], prompt, N, chat=False)


def test_unpad_truncation_in_the_engine(twin):
    """369x820 packs 2349 feature rows under the original semantics, 2403 under transformers'."""
    hf, lm, engine = twin
    pic = ref.synthetic_image(369, 820, seed=8)
    orig = engine.requests.prepare(pic, "Q", True, SamplingParams.make())
    assert orig.items[0].num_tokens == 2349
    logits = engine.logits(pic, "Q")  # the packed features fill exactly the placeholder rows
    assert logits.shape[0] == len(orig.input_ids) and torch.isfinite(logits).all()
    hf_semantics = ovfast.load(lm, semantics="transformers", max_seq_len=4096, dtype="float32")
    assert hf_semantics.requests.prepare(pic, "Q", True, SamplingParams.make()).items[0].num_tokens == 2403


def test_alpha_is_dropped_not_composited(twin):
    _, lm, engine = twin
    rgba = np.random.default_rng(9).integers(0, 256, (80, 100, 4), dtype=np.uint8)
    image = PIL.Image.fromarray(rgba, "RGBA")
    assert torch.equal(engine.logits(image, "Q"), engine.logits(np.asarray(image.convert("RGB")), "Q"))
    assert torch.equal(engine.logits(image, "Q"), engine.logits(np.ascontiguousarray(rgba[..., :3]), "Q"))
    hf_semantics = ovfast.load(lm, semantics="transformers", max_seq_len=4096, dtype="float32")
    white = PIL.Image.alpha_composite(PIL.Image.new("RGBA", image.size, (255,) * 4), image).convert("RGB")
    assert torch.equal(hf_semantics.logits(image, "Q"), hf_semantics.logits(np.asarray(white), "Q"))
    assert not torch.equal(hf_semantics.logits(image, "Q"), hf_semantics.logits(np.asarray(image.convert("RGB")), "Q"))


def test_transformers_semantics_on_lmms_lab_equals_the_llava_hf_twin(twins):
    hf, lm = twins["tiny"]
    a = ovfast.load(lm, semantics="transformers", max_seq_len=4096, dtype="float32")
    b = ovfast.load(hf, max_seq_len=4096, dtype="float32")
    pic = ref.synthetic_image(210, 330, seed=10)
    assert a.complete(pic, "Describe.", max_new_tokens=N).token_ids == b.complete(pic, "Describe.", max_new_tokens=N).token_ids
    assert torch.equal(a.logits(None, "Hello"), b.logits(None, "Hello"))


def test_original_semantics_on_llava_hf(twins, engines):
    hf, _ = twins["tiny"]
    engine = ovfast.load(hf, semantics="original", max_seq_len=4096, dtype="float32")
    pic = ref.synthetic_image(110, 170, seed=12)
    assert engine.info()["semantics"] == "original"
    assert engine.complete(pic, "Describe.", max_new_tokens=N).token_ids == \
        engines["tiny"].complete(pic, "Describe.", max_new_tokens=N).token_ids


def test_marker_errors_leave_the_engine_working(twin):
    _, _, engine = twin
    pic = ref.synthetic_image(50, 60, seed=13)
    with pytest.raises(PlaceholderError, match="2 <image>/<video> markers but 1"):
        engine.complete(pic, "<image> and <image>", max_new_tokens=2)
    with pytest.raises(PlaceholderError, match="0 <image>/<video> markers but 1"):
        engine.complete(pic, qwen_1_5("no marker"), chat=False, max_new_tokens=2)
    assert len(engine.complete(pic, "fine", max_new_tokens=2).token_ids) == 2
    assert engine.stats()["free_slots"] == engine.max_batch_size


def test_no_free_placeholder_ids_is_a_config_error(tmp_path):
    path = build_checkpoint(tmp_path / "full", "tiny", layout="lmms-lab", text=dict(vocab_size=400))
    with pytest.raises(ConfigError, match="no free ids"):
        ovfast.load(path)
