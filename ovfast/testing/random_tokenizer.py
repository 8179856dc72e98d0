"""A Qwen2-style byte-level BPE tokenizer of any vocabulary size, built offline.

Random-weight checkpoints need a tokenizer.json that both ovfast and transformers load. This one
has Qwen2's exact pipeline (NFC, Qwen2's split regex, byte-level BPE with no prefix space) and
Qwen2's special tokens right after the BPE vocabulary, so at the real size (151,643 BPE entries)
the ids are the real ones: <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645,
<image> 151646, <video> 151647. Merges are learnt from a short built-in text, then filled up with
synthetic merges until the vocabulary has the requested size. It tokenises English sensibly; it
is not Qwen2's vocabulary.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

# Qwen2's pre-tokenizer split (the same regex transformers' Qwen2Tokenizer installs).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

_CORPUS = """\
The quick brown fox jumps over the lazy dog while the cat watches from the window.
A picture shows a red car parked beside a small house with a green door and two windows.
What is shown in this image? Describe the scene in detail, including colours and objects.
There are three people standing on the beach; one of them is holding a blue umbrella.
The chart compares the performance of several models across twelve different benchmarks.
In the video, a man walks into the kitchen, opens the fridge and takes out a bottle of milk.
The weather today is sunny with a light breeze, and the temperature is about 21 degrees.
Please answer the question using a single word or phrase. Yes, no, maybe, it depends.
She said: "I'll be there at 10:30, don't worry!" He replied that he'd wait by the station.
Numbers like 1, 2, 3, 42, 100, 2024 and 3.14159 appear in many documents and tables.
The image contains a dog, a ball, a tree, a bench, a bicycle and a bird sitting on a fence.
Question: How many apples are on the table? Answer: There are five apples on the table.
The assistant describes images, answers questions about videos and compares several pictures.
Mountains rise behind the lake, and the sky above them turns orange as the sun goes down.
def main():\n    print("hello world")\n    return 0\n
Le café est très bon, mais la crème brûlée est encore meilleure. Naïve façade, déjà vu.
Straße, Größe, Übung, Ärger; 東京は日本の首都です。猫が好きです。 Привет, как дела?
The first frame shows a street; the second frame shows the same street at night, with lights.
Each patch of the image is encoded by the vision tower and projected into the language model.
"""


def build_tokenizer(bpe_vocab_size: int) -> Tokenizer:
    """A byte-level BPE with exactly ``bpe_vocab_size`` entries, then the five special tokens."""
    if bpe_vocab_size < 256:
        raise ValueError("a byte-level BPE needs at least 256 entries")
    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(
        vocab_size=bpe_vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer)

    vocab = tok.get_vocab()
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in _merges_of(tok)]
    if len(vocab) < bpe_vocab_size:
        _fill_with_synthetic_merges(vocab, merges, bpe_vocab_size)
    tok.model = BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _merges_of(tok: Tokenizer) -> list:
    return json.loads(tok.to_str())["model"]["merges"]


# tokenizer_config.json as Qwen2's slow-file repositories (the lmms-lab checkpoints) carry it, less
# the chat template and the added_tokens_decoder (write_vocab_merges fills that in).
QWEN2_TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    "bos_token": None,
    "clean_up_tokenization_spaces": False,
    "eos_token": "<|im_end|>",
    "errors": "replace",
    "model_max_length": 32768,
    "pad_token": "<|endoftext|>",
    "split_special_tokens": False,
    "tokenizer_class": "Qwen2Tokenizer",
    "unk_token": None,
}


def write_vocab_merges(tokenizer: Tokenizer, out_dir, tokenizer_config: dict | None = None) -> list[Path]:
    """Save ``tokenizer`` (a byte-level BPE ``tokenizers.Tokenizer``) as the slow files, no tokenizer.json.

    Writes vocab.json, merges.txt (``#version: 0.2`` then one "left right" pair a line),
    added_tokens.json (token -> id) and tokenizer_config.json: ``tokenizer_config`` (default
    QWEN2_TOKENIZER_CONFIG) with an ``added_tokens_decoder`` entry (id -> content and flags) for
    every added token, as transformers saves a Qwen2 tokenizer's slow files. Returns the paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = json.loads(tokenizer.to_str())
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"write_vocab_merges writes a BPE tokenizer, not {model.get('type')!r}")
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model["merges"]]
    for left, right in merges:
        if " " in left or " " in right or "\n" in left + right:
            raise ValueError(f"merge {(left, right)!r} cannot be written to merges.txt")
    added = sorted(data.get("added_tokens") or [], key=lambda t: t["id"])
    paths = [out / "vocab.json", out / "merges.txt", out / "added_tokens.json", out / "tokenizer_config.json"]
    paths[0].write_text(json.dumps(vocab, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths[1].write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    paths[2].write_text(json.dumps({t["content"]: t["id"] for t in added}, indent=2, ensure_ascii=False) + "\n",
                        encoding="utf-8")
    config = dict(QWEN2_TOKENIZER_CONFIG if tokenizer_config is None else tokenizer_config)
    config["added_tokens_decoder"] = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in added
    }
    paths[3].write_text(json.dumps(dict(sorted(config.items())), indent=2, ensure_ascii=False) + "\n",
                        encoding="utf-8")
    return paths


def _fill_with_synthetic_merges(vocab: dict[str, int], merges: list, size: int) -> None:
    """Append merges (token + byte) in a fixed order until the vocabulary has ``size`` entries."""
    by_id = sorted(vocab, key=vocab.__getitem__)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    i = 0
    while len(vocab) < size:
        left = by_id[i]
        for right in alphabet:
            token = left + right
            if token not in vocab:
                vocab[token] = len(vocab)
                by_id.append(token)
                merges.append((left, right))
                if len(vocab) == size:
                    return
        i += 1
