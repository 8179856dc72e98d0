"""``ovfast convert``: lmms-lab -> llava-hf, checked in transformers and in ovfast."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

import ovfast
import reference as ref
from ovfast.cli import main as cli
from ovfast.errors import ConfigError, ModelLoadError
from ovfast.testing.random_checkpoint import build_checkpoint
from ovfast.tools.convert import convert

N = 10
PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nDescribe.<|im_end|>\n"
          "<|im_start|>assistant\n")


def _tensors(path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("preset,kw", [("tiny", {}), ("tiny-mha", {"full_tower": True, "vocab_files": True})])
def test_convert_round_trip(tmp_path, preset, kw):
    hf = build_checkpoint(tmp_path / "hf", preset, seed=21, dtype="float32")
    lm = build_checkpoint(tmp_path / "lm", preset, seed=21, dtype="float32", layout="lmms-lab", **kw)
    out = convert(lm, tmp_path / "out", max_shard_bytes=200_000)  # several shards and an index
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert not (out / ".ovfast-convert").exists()

    # The same tensors as the llava-hf twin (the twin also keeps post_layernorm; the extra tower layer is gone).
    ours, twin = _tensors(out), _tensors(hf)
    assert sorted(ours) == sorted(twin)
    for k in twin:
        assert torch.equal(ours[k], twin[k]), k
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava_onevision" and config["vision_config"]["num_hidden_layers"] == \
        json.loads((hf / "config.json").read_text())["vision_config"]["num_hidden_layers"]
    tok, twin_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(hf)
    text = "Hello <image> world<|im_end|>\n<video> 東京 DON'T"
    assert tok(text)["input_ids"] == twin_tok(text)["input_ids"]

    # transformers on the converted checkpoint, fed the original prompt, gives the original's greedy tokens.
    pic = ref.synthetic_image(260, 190, seed=22)
    original = ovfast.load(lm, max_seq_len=4096, dtype="float32")
    expected = original.complete(pic, "Describe.", max_new_tokens=N).token_ids
    assert ref.greedy(str(out), [pic], PROMPT, N, chat=False) == expected
    converted = ovfast.load(out, max_seq_len=4096, dtype="float32")
    assert converted.info()["family"] == "llava-hf"
    assert converted.complete(pic, PROMPT, chat=False, max_new_tokens=N).token_ids == expected
    assert ovfast.load(out, semantics="original", max_seq_len=4096, dtype="float32").complete(
        pic, "Describe.", max_new_tokens=N).token_ids == expected


def test_convert_adds_rows_when_the_vocabulary_is_full(tmp_path):
    lm = build_checkpoint(tmp_path / "lm", "tiny", layout="lmms-lab", dtype="float32", text=dict(vocab_size=400))
    with pytest.raises(ConfigError, match="no free ids"):
        ovfast.load(lm)
    out = convert(lm, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 448  # 400 + 2 rounded up to a multiple of 64
    t = _tensors(out)["language_model.model.embed_tokens.weight"]
    assert t.shape[0] == 448
    torch.testing.assert_close(t[400:], t[:400].mean(0, keepdim=True).expand(48, -1))
    pic = ref.synthetic_image(100, 120, seed=23)
    ours = ovfast.load(out, max_seq_len=4096, dtype="float32").complete(pic, PROMPT, chat=False, max_new_tokens=N)
    assert ours.token_ids == ref.greedy(str(out), [pic], PROMPT, N, chat=False)


def test_convert_refusals_and_cli(tmp_path, capsys):
    hf = build_checkpoint(tmp_path / "hf", "tiny")
    with pytest.raises(ConfigError, match="already in the llava-hf layout"):
        convert(hf, tmp_path / "x")
    lm = build_checkpoint(tmp_path / "lm", "tiny", layout="lmms-lab")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="not empty"):
        convert(lm, tmp_path / "busy")
    assert cli(["convert", str(lm), str(tmp_path / "busy"), "--force", "--dtype", "bfloat16"]) == 0
    assert "wrote the llava-hf layout" in capsys.readouterr().out
    with safe_open(str(tmp_path / "busy" / "model.safetensors"), "pt") as h:
        assert all(h.get_tensor(k).dtype == torch.bfloat16 for k in h.keys())
    assert (tmp_path / "busy" / "keep.txt").is_file()
    assert cli(["convert", str(hf), str(tmp_path / "y")]) == 2


def test_convert_without_added_tokens_decoder_keeps_every_added_token(tmp_path):
    """transformers 5 saves tokenizer_config.json without added_tokens_decoder: the converted one
    must list every added token, or transformers splits <|im_start|> into BPE pieces."""
    lm = build_checkpoint(tmp_path / "lm", "tiny", layout="lmms-lab")
    config = json.loads((lm / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]
    (lm / "tokenizer_config.json").write_text(json.dumps(config))
    out = convert(lm, tmp_path / "out")
    added = {t["content"]: t["id"] for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"]}
    decoder = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {v["content"]: int(k) for k, v in decoder.items()} == added
    tok = AutoTokenizer.from_pretrained(out)
    for token in ("<|im_start|>", "<|im_end|>", "<image>"):
        assert tok(token)["input_ids"] == [added[token]], token
