"""Loading: weight namings, shards, dtypes, templates, configs, errors, and the static KV cache."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import reference as ref
import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaOnevisionConfig

import ovfast
from ovfast.checkpoint.config import ModelConfig
from ovfast.testing.random_checkpoint import build_config


def _small(path, **kw):
    return ovfast.load(path, max_seq_len=2048, max_batch_size=1, **kw)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same random weights written under both namings, single-file and sharded."""
    root = tmp_path_factory.mktemp("layouts")
    return {
        "llava-hf": ovfast.build_checkpoint(root / "a", "tiny", seed=7),
        "transformers5": ovfast.build_checkpoint(root / "b", "tiny", seed=7, layout="transformers5", max_shard_bytes=60_000),
    }


def test_both_weight_namings_load_the_same_model(layouts):
    image = ref.synthetic_image(200, 300, seed=1)
    a = _small(layouts["llava-hf"]).logits([image], "hi")
    b = _small(layouts["transformers5"]).logits([image], "hi")
    assert torch.equal(a, b)
    assert (layouts["transformers5"] / "model.safetensors.index.json").is_file()


def test_fp16_weights_cast_exactly(layouts):
    engine = _small(layouts["llava-hf"])
    stored = load_file(layouts["llava-hf"] / "model.safetensors")
    w = stored["language_model.model.layers.1.mlp.down_proj.weight"]
    assert w.dtype == torch.float16
    assert torch.equal(engine.model.language_model.layers[1].down_weight, w.float())
    q = stored["vision_tower.vision_model.encoder.layers.0.self_attn.k_proj.weight"]
    e = engine.model_config.vision.hidden_size
    assert torch.equal(engine.model.vision_tower.layers[0].qkv_weight[e : 2 * e], q.float())
    # Tied head: lm_head is embed_tokens, and no lm_head tensor is stored.
    lm = engine.model.language_model
    assert lm.lm_head is lm.embed_tokens
    assert not any("lm_head" in k for k in stored)


def test_dtypes_and_default_device(layouts):
    engine = _small(layouts["llava-hf"])
    assert engine.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if engine.device.type == "cpu":
        assert engine.dtype == torch.float32
    for name, dtype in [("bf16", torch.bfloat16), ("float16", torch.float16), (torch.float32, torch.float32)]:
        e = _small(layouts["llava-hf"], dtype=name)
        assert e.dtype == dtype and e.model.language_model.embed_tokens.dtype == dtype
    with pytest.raises(ovfast.ConfigError, match="dtype"):
        _small(layouts["llava-hf"], dtype="int8")


def test_kv_cache_is_allocated_once_and_images_encoded_once(layouts, monkeypatch):
    # (the vision and prefix caches off: this counts the encodings requests need)
    engine = ovfast.load(layouts["llava-hf"], max_seq_len=3000, max_batch_size=3, encoder_cache_tokens=0,
                         prefix_caching=False)
    cfg = engine.model_config.text
    bs = engine.cache.block_size  # pages for 3 sequences of 3000 (+1 written ahead), and the null page
    assert engine.cache.k.shape == (cfg.num_layers, -(-3 * 3001 // bs) + 1, bs, cfg.num_kv_heads, cfg.head_dim)
    ptrs = (engine.cache.k.data_ptr(), engine.cache.v.data_ptr())
    calls = []
    real = engine.model.encode_tiles
    monkeypatch.setattr(engine.model, "encode_tiles", lambda *a, **k: calls.append(1) or real(*a, **k))
    image = ref.synthetic_image(300, 200, seed=2)
    engine.complete(image, "hi", max_new_tokens=8)
    engine.complete_many([(image, "a"), (None, "b"), (image, "c"), (image, "d")], max_new_tokens=8)
    assert len(calls) == 4  # once per request with media, never during decoding
    assert (engine.cache.k.data_ptr(), engine.cache.v.data_ptr()) == ptrs


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_chat_template_sources(layouts, tmp_path):
    """processor_config.json, chat_template.json, chat_template.jinja, then tokenizer_config.json."""
    src = layouts["llava-hf"]
    base = _small(src)
    expected = base.complete(None, "hello", max_new_tokens=4).token_ids
    d = _copy(src, tmp_path / "jinja")
    template = json.loads((d / "chat_template.json").read_text())["chat_template"]
    (d / "chat_template.json").unlink()
    (d / "chat_template.jinja").write_text(template)
    assert _small(d).complete(None, "hello", max_new_tokens=4).token_ids == expected
    (d / "chat_template.jinja").unlink()
    # Only the tokenizer's ChatML template is left: it adds a system prompt.
    fallback = _small(d)
    assert fallback.requests.template.render([{"role": "user", "content": "x"}]).startswith("<|im_start|>system")
    cfg = json.loads((d / "processor_config.json").read_text())
    cfg["chat_template"] = template
    (d / "processor_config.json").write_text(json.dumps(cfg))
    assert _small(d).complete(None, "hello", max_new_tokens=4).token_ids == expected


def test_missing_unexpected_and_misshapen_tensors(layouts, tmp_path):
    src = layouts["llava-hf"]
    tensors = load_file(src / "model.safetensors")
    cases = {
        "missing": ({k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}, "lacks 1 tensors"),
        "unexpected": ({**tensors, "language_model.model.extra.weight": torch.zeros(2)}, "does not know"),
        "misshapen": ({**tensors, "image_newline": torch.zeros(5, dtype=torch.float16)}, "has shape"),
    }
    for name, (sd, message) in cases.items():
        d = _copy(src, tmp_path / name)
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ovfast.ModelLoadError, match=message):
            _small(d)


def test_ignorable_tensors_are_ignored(layouts, tmp_path):
    """A raw SigLIP's extra layer and head, and a stored tied head, are skipped as transformers skips them."""
    src = layouts["llava-hf"]
    tensors = load_file(src / "model.safetensors")
    extra = {
        "vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight": torch.zeros(3),
        "vision_tower.vision_model.head.probe": torch.zeros(3),
        "language_model.lm_head.weight": torch.zeros(3),
    }
    d = _copy(src, tmp_path / "extra")
    save_file({**tensors, **extra}, str(d / "model.safetensors"), metadata={"format": "pt"})
    image = ref.synthetic_image(100, 100, seed=3)
    assert torch.equal(_small(d).logits([image], "x"), _small(src).logits([image], "x"))


def test_checkpoint_errors(tmp_path, monkeypatch):
    with pytest.raises(ovfast.ModelLoadError, match="config.json"):
        ovfast.load(tmp_path)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ovfast.ModelLoadError, match="is a file"):
        ovfast.load(tmp_path / "f.txt")
    with pytest.raises(ovfast.ModelLoadError, match="neither a local directory"):
        ovfast.load("not/a/hub/id")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ovfast.ModelLoadError, match="local directory in the Hugging Face layout"):
        ovfast.load("llava-hf/definitely-not-downloaded-here")


@pytest.mark.parametrize(
    "patch,message",
    [
        ({"model_type": "llava"}, "llava_onevision"),
        ({"text_config": {"model_type": "llama"}}, "Qwen2"),
        ({"text_config": {"use_sliding_window": True, "layer_types": ["sliding_attention"]}}, "sliding"),
        ({"text_config": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}}, "rope type"),
        ({"vision_feature_select_strategy": "default"}, "full"),
        ({"projector_hidden_act": "relu"}, "projector_hidden_act"),
    ],
)
def test_unsupported_configs_are_refused(patch, message):
    cfg = build_config("tiny")
    for k, v in patch.items():
        if isinstance(v, dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    with pytest.raises(ovfast.ConfigError, match=message):
        ModelConfig.from_dict(cfg)


@pytest.mark.parametrize(
    "preset,expected",
    [
        ("0.5b", dict(hidden=896, layers=24, heads=14, kv=2, hd=64, inter=4864, vocab=152000, tie=True)),
        ("7b", dict(hidden=3584, layers=28, heads=28, kv=4, hd=128, inter=18944, vocab=152128, tie=False)),
        ("72b", dict(hidden=8192, layers=80, heads=64, kv=8, hd=128, inter=29568, vocab=152128, tie=False)),
    ],
)
def test_real_size_configs(preset, expected):
    raw = build_config(preset)
    cfg = ModelConfig.from_dict(raw)
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.head_dim, t.intermediate_size, t.vocab_size,
            t.tie_word_embeddings) == tuple(expected.values())
    assert t.rope_theta == 1e6 and t.rms_norm_eps == 1e-6
    assert (v.hidden_size, v.num_layers, v.num_heads, v.intermediate_size, v.grid) == (1152, 26, 16, 4304, 27)
    assert (cfg.image_token_id, cfg.video_token_id) == (151646, 151647)
    assert cfg.vision_layers_used == 26 and len(cfg.grid_pinpoints) == 36
    hf = LlavaOnevisionConfig(**{k: v for k, v in raw.items() if k != "ovfast_random_weights"})
    assert hf.text_config.hidden_size == t.hidden_size and hf.vision_config.num_hidden_layers == 26


def test_config_defaults_follow_transformers():
    """A config.json holding only what differs from the defaults reads as transformers reads it."""
    cfg = ModelConfig.from_dict({"model_type": "llava_onevision", "text_config": {"model_type": "qwen2"}})
    hf = LlavaOnevisionConfig()
    assert cfg.vision.hidden_size == hf.vision_config.hidden_size == 1152
    assert cfg.vision.num_layers == hf.vision_config.num_hidden_layers == 26
    assert cfg.text.hidden_size == hf.text_config.hidden_size
    assert cfg.text.rope_theta == hf.text_config.rope_parameters["rope_theta"]
    assert cfg.image_token_id == hf.image_token_id and cfg.projector_gelu == "none"


def test_kernels_subpackage_is_not_top_level():
    import ovfast.kernels

    assert ovfast.kernels.__name__ == "ovfast.kernels"
    code = "import importlib.util, sys; s = importlib.util.find_spec('kernels'); print(s.origin if s else None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/").stdout.strip()
    assert "ovfast" not in out


def test_transformers_loads_every_tensor_the_builder_writes(checkpoint_dirs):
    """The random checkpoints are real Hugging Face checkpoints: transformers loads each stored tensor."""
    import glob

    from safetensors import safe_open

    from ovfast.checkpoint.weight_names import LAYOUTS, canonical_name

    to_hf5 = LAYOUTS["transformers5"]
    for name, path in checkpoint_dirs.items():
        state = ref.model(path).state_dict()
        n = 0
        for f in glob.glob(f"{path}/*.safetensors"):
            with safe_open(f, "pt") as handle:
                for key in handle.keys():
                    canon = canonical_name(key)
                    prefix = next(p for p in to_hf5 if canon.startswith(p))
                    hf_key = to_hf5[prefix] + canon[len(prefix):]
                    assert torch.equal(state[hf_key], handle.get_tensor(key).float()), (name, key)
                    n += 1
        assert n >= 60


def test_checkpoint_saved_by_newest_transformers_loads(layouts, tmp_path):
    """transformers >= 5.24 saves a model built from its config as ``vision_tower.embeddings...``
    (no ``vision_model.`` level) beside ``vision_tower.post_layernorm``; a vision head may ride along.
    ovfast loads it, skips what the feature path never reads (and says so), and matches transformers."""
    from safetensors import safe_open
    from transformers import LlavaOnevisionForConditionalGeneration

    src = layouts["llava-hf"]
    torch.manual_seed(11)
    hf = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig.from_pretrained(src)).eval()
    out = _copy(src, tmp_path / "saved")
    (out / "model.safetensors").unlink()
    hf.save_pretrained(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("vision_tower.embeddings.") for k in keys) and not any("vision_model" in k for k in keys)
    tensors = load_file(out / "model.safetensors")
    tensors["vision_tower.head.probe"] = torch.randn(4)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    engine = _small(out, dtype="float32")
    skipped = engine.info()["skipped_tensors"]
    assert "vision_tower.head.probe" in skipped and "vision_tower.post_layernorm.weight" in skipped
    image = ref.synthetic_image(150, 220, seed=5)
    ids = ref.greedy(str(out), [image], "What is it?", 6)
    assert engine.complete([image], "What is it?", max_new_tokens=6).token_ids == ids
    unknown = {**tensors, "vision_tower.not_a_module.weight": torch.zeros(2)}
    save_file(unknown, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ovfast.ModelLoadError, match="does not know"):
        _small(out)
