"""The tokenizer from the slow files (vocab.json + merges.txt), as the lmms-lab checkpoints ship it.

Built from a random Qwen2-style tokenizer.json exported to vocab.json, merges.txt, added_tokens.json
and tokenizer_config.json; ovfast's ids must equal the tokenizer.json tokenizer's and transformers'
Qwen2Tokenizer's on the same directory (which, in transformers 5, builds its fast tokenizer from
those files).
"""
from __future__ import annotations

import json
import random
import shutil
import unicodedata

import pytest
import tokenizers
from transformers import Qwen2Tokenizer

import ovfast
from ovfast.checkpoint.files import open_checkpoint
from ovfast.checkpoint.tokenizer import Tokenizer
from ovfast.errors import ModelLoadError
from ovfast.testing.random_checkpoint import build_checkpoint
from ovfast.testing.random_tokenizer import SPECIAL_TOKENS, build_tokenizer, write_vocab_merges

QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BPE_VOCAB = 700

TEXTS = [
    "What is shown in this image?",
    "",
    " ",
    "  leading spaces, trailing spaces   ",
    "Line one\nLine two\r\n\n\ttabbed\n\n\n   \n",
    "a  b   c    d\t\t e \u00a0f\u3000g",
    "Numbers 1234567 and 3.14159, 2024-11-25! 007 10:30",
    "Ünïcödé: café, naïve, Straße; 東京は日本の首都です。猫が好きです。 Привет, как дела?",
    "e\u0301 vs \u00e9 (NFC), \ufb01 ligature, Ａ full width",
    "emoji 🙂👍🏽👨‍👩‍👧 🇫🇷 and ⚙️",
    "DON'T WON'T IT'S I'LL WE'VE THEY'RE I'M HE'D; don't won't it's i'll we've they're",
    "DON'The I'LLBE SHE'She they'REady it'sok 'S'T'LL",  # the contraction is split off in any case
    ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
     "<|im_start|>assistant\n"),
    "text<|im_end|>glued<|endoftext|>  <|im_start|> spaced <|im_end|>\n",
    "<|im_start<|im_end|>|> <|IM_END|> <im_end>",
    "def main():\n    print(\"hello world\")\n    return 0\n",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pieces = ["the", "The", "DON'T", "'S", "'Ve", "'s", "'ll", " ", "  ", "\n", "\r\n", "\t", "1", "42", "3.5", "東京", "猫",
              "🙂", "👍🏽", "é", "e\u0301", "ß", "Привет", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "!?",
              "...", "--", "café", "x", "Qwen2", "\u00a0"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 25))) for _ in range(n)]


def _export(tok, out, specials=SPECIAL_TOKENS, config=None):
    """``tok`` (a tokenizers.Tokenizer) as the slow files in ``out``, keeping only ``specials``."""
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in specials]
    tok = type(tok).from_str(json.dumps(data))
    write_vocab_merges(tok, out, config)
    return tok


@pytest.fixture(scope="module", params=["llava-hf", "lmms-lab"])
def slow_dir(request, tmp_path_factory):
    """(directory with vocab.json + merges.txt and no tokenizer.json, the tokenizer.json tokenizer,
    its special tokens): the five llava-hf specials, or lmms-lab's three (no <image>/<video>)."""
    specials = SPECIAL_TOKENS if request.param == "llava-hf" else QWEN2_SPECIALS
    out = tmp_path_factory.mktemp(f"slow-{request.param}")
    tok = _export(build_tokenizer(BPE_VOCAB), out, specials)
    assert not (out / "tokenizer.json").exists()
    return out, tok, specials


def test_written_files_look_like_qwen2s(slow_dir):
    out, _, specials = slow_dir
    assert (out / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert sorted(vocab.values()) == list(range(BPE_VOCAB))
    added = json.loads((out / "added_tokens.json").read_text(encoding="utf-8"))
    assert added == {t: BPE_VOCAB + i for i, t in enumerate(specials)}
    decoder = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))["added_tokens_decoder"]
    assert {int(k): v["content"] for k, v in decoder.items()} == {v: k for k, v in added.items()}
    assert all(v["special"] and not v["normalized"] for v in decoder.values())


def test_ids_match_tokenizer_json_and_transformers(slow_dir):
    out, tok, _ = slow_dir
    ours = Tokenizer.from_directory(out)
    hf = Qwen2Tokenizer.from_pretrained(str(out))
    assert ours.vocab_size == tok.get_vocab_size(with_added_tokens=True) == len(hf)
    for text in TEXTS + _random_texts(200):
        ids = ours.encode(text)
        assert ids == tok.encode(text, add_special_tokens=False).ids, repr(text)
        assert ids == hf(text)["input_ids"], repr(text)
        assert ids == hf.encode(text, add_special_tokens=False), repr(text)


def test_decode_round_trips_and_skips_special_tokens(slow_dir):
    out, tok, specials = slow_dir
    ours = Tokenizer.from_directory(out)
    hf = Qwen2Tokenizer.from_pretrained(str(out))
    for text in TEXTS + _random_texts(100, seed=1):
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == _nfc(text), repr(text)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
        stripped = _nfc(text)
        for s in specials:
            stripped = stripped.replace(s, "")
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), repr(text)
        assert ours.decode(ids) == stripped, repr(text)
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 30))]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids) == tok.decode(ids, skip_special_tokens=True)


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def test_special_token_ids(slow_dir):
    out, tok, specials = slow_dir
    ours = Tokenizer.from_directory(out)
    hf = Qwen2Tokenizer.from_pretrained(str(out))
    for i, s in enumerate(specials):
        assert ours.token_id(s) == BPE_VOCAB + i == tok.token_to_id(s) == hf.convert_tokens_to_ids(s)
        assert ours.encode(f"a{s}b") == [*ours.encode("a"), BPE_VOCAB + i, *ours.encode("b")]
    assert ours.token_id("<|im_end|>") == BPE_VOCAB + 2
    assert ours.encode("<|im_end|>") == [BPE_VOCAB + 2]
    assert ours.special_tokens_map == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    if "<image>" not in specials:
        assert ours.token_id("<image>") is None


def test_added_tokens_json_without_decoder_matches_transformers(tmp_path):
    """Without added_tokens_decoder, transformers takes added_tokens.json (special when named in the config)."""
    _export(build_tokenizer(BPE_VOCAB), tmp_path, QWEN2_SPECIALS)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["added_tokens_decoder"]
    config["additional_special_tokens"] = ["<|im_start|>"]  # <|im_end|> is special as eos_token
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours = Tokenizer.from_directory(tmp_path)
    hf = Qwen2Tokenizer.from_pretrained(str(tmp_path))
    assert [ours.token_id(s) for s in QWEN2_SPECIALS] == [BPE_VOCAB, BPE_VOCAB + 1, BPE_VOCAB + 2]
    for text in TEXTS + _random_texts(50, seed=2):
        ids = ours.encode(text)
        assert ids == hf(text)["input_ids"], repr(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), repr(text)


def test_from_directory_prefers_tokenizer_json(tmp_path):
    tok = _export(build_tokenizer(BPE_VOCAB), tmp_path, QWEN2_SPECIALS)
    other = build_tokenizer(BPE_VOCAB + 50)  # a different tokenizer.json in the same directory
    other.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_directory(tmp_path).vocab_size == other.get_vocab_size(with_added_tokens=True)
    (tmp_path / "tokenizer.json").unlink()
    assert Tokenizer.from_directory(tmp_path).vocab_size == tok.get_vocab_size(with_added_tokens=True)


def test_neither_file_names_both(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json.*vocab\.json \+ merges\.txt"):
        Tokenizer.from_directory(tmp_path)
    (tmp_path / "vocab.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ModelLoadError, match=r"no merges\.txt"):
        Tokenizer.from_directory(tmp_path)


def test_open_checkpoint_without_any_tokenizer(tmp_path):
    path = build_checkpoint(tmp_path / "ckpt", preset="tiny", weights=False)
    (path / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json.*vocab\.json.*merges\.txt"):
        open_checkpoint(path, need_weights=False)


def _rewrite_config(path, edit):
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    edit(config)
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def test_added_token_id_gap_is_refused(tmp_path):
    _export(build_tokenizer(BPE_VOCAB), tmp_path, ("<|endoftext|>", "<|im_end|>"))
    # <|im_end|> declared at BPE_VOCAB + 2 with nothing at BPE_VOCAB + 1: tokenizers would put it at + 1.
    _rewrite_config(tmp_path, lambda c: c["added_tokens_decoder"].update(
        {str(BPE_VOCAB + 2): c["added_tokens_decoder"].pop(str(BPE_VOCAB + 1))}))
    with pytest.raises(ModelLoadError, match=r"'<\|im_end\|>' declared 702, would get 701"):
        Tokenizer.from_directory(tmp_path)


def test_added_token_id_inside_the_vocabulary_is_refused(tmp_path):
    _export(build_tokenizer(BPE_VOCAB), tmp_path, QWEN2_SPECIALS)
    _rewrite_config(tmp_path, lambda c: c["added_tokens_decoder"].update(
        {"5": c["added_tokens_decoder"].pop(str(BPE_VOCAB + 2))}))
    with pytest.raises(ModelLoadError, match=r"declared 5"):
        Tokenizer.from_directory(tmp_path)


def test_engine_from_vocab_merges_checkpoint(tmp_path):
    """An otherwise complete checkpoint with vocab.json + merges.txt instead of tokenizer.json."""
    fast = build_checkpoint(tmp_path / "fast", preset="tiny", dtype="float32")
    slow = tmp_path / "slow"
    shutil.copytree(fast, slow)
    (slow / "tokenizer.json").unlink()
    config = json.loads((fast / "tokenizer_config.json").read_text(encoding="utf-8"))
    write_vocab_merges(tokenizers.Tokenizer.from_file(str(fast / "tokenizer.json")), slow, config)
    ckpt = open_checkpoint(slow)
    assert ckpt.tokenizer_file is None and ckpt.path == slow
    assert open_checkpoint(fast).tokenizer_file == fast / "tokenizer.json"
    with ovfast.load(fast, dtype="float32") as a, ovfast.load(slow, dtype="float32") as b:
        for text in TEXTS:
            assert b.tokenizer.encode(text) == a.tokenizer.encode(text), repr(text)
        assert b.tokenizer.token_id("<image>") == a.tokenizer.token_id("<image>")
        assert b.generate(None, "hi", max_new_tokens=3) == a.generate(None, "hi", max_new_tokens=3)
