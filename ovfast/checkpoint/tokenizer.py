"""Tokenizer (the `tokenizers` library) and the chat-template renderer.

Both reproduce what transformers' LlavaOnevisionProcessor does: the same token ids for the
same text (Qwen2 adds no BOS), the same decoding with special tokens skipped, and the checkpoint's
chat template rendered in the same sandboxed jinja2 environment, including transformers'
``{% generation %}`` tag.

The tokenizer comes from tokenizer.json when the checkpoint has one, else from the slow files
(vocab.json + merges.txt, the added tokens from tokenizer_config.json or added_tokens.json), as
the original lmms-lab repositories ship it: built with Qwen2's pipeline exactly as transformers'
Qwen2Tokenizer builds it from those files.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from ..errors import ModelLoadError
from .files import find_tokenizer_file

if TYPE_CHECKING:
    from .files import Checkpoint

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Qwen2's pre-tokenizer split, as transformers' Qwen2Tokenizer (and its slow->fast converter) installs it.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# transformers' Qwen2Tokenizer defaults for the named tokens tokenizer_config.json leaves out.
_QWEN2_DEFAULTS = {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
_TOKEN_FLAGS = ("lstrip", "rstrip", "normalized", "single_word", "special")


class Tokenizer:
    def __init__(self, tokenizer_file: Path, tokenizer_config: dict):
        """The tokenizer in ``tokenizer_file`` (a tokenizer.json); see also ``from_checkpoint``."""
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:
            raise ModelLoadError(f"cannot load {tokenizer_file}: {e}") from e
        self._setup(backend, tokenizer_config)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> Tokenizer:
        """The checkpoint's tokenizer: its tokenizer.json, else its vocab.json + merges.txt."""
        if ckpt.tokenizer_file is not None:
            return cls(ckpt.tokenizer_file, ckpt.tokenizer_config)
        return cls.from_directory(ckpt.path, ckpt.tokenizer_config)

    @classmethod
    def from_directory(cls, path: str | Path, tokenizer_config: dict | None = None) -> Tokenizer:
        """The tokenizer of a checkpoint directory: tokenizer.json when there is one, else vocab.json +
        merges.txt. ``tokenizer_config``: the directory's tokenizer_config.json (read when None)."""
        path = Path(path)
        if tokenizer_config is None:
            tokenizer_config = _read_config(path / "tokenizer_config.json")
        tokenizer_file = find_tokenizer_file(path)
        if tokenizer_file is not None:
            return cls(tokenizer_file, tokenizer_config)
        return cls.from_vocab_merges(path / "vocab.json", path / "merges.txt", tokenizer_config,
                                     added_tokens_file=path / "added_tokens.json")

    @classmethod
    def from_vocab_merges(cls, vocab_file: str | Path, merges_file: str | Path, tokenizer_config: dict,
                          added_tokens_file: str | Path | None = None) -> Tokenizer:
        """Qwen2's byte-level BPE from the slow files, as transformers' Qwen2Tokenizer builds it."""
        self = cls.__new__(cls)
        self._setup(qwen2_backend(vocab_file, merges_file, tokenizer_config, added_tokens_file), tokenizer_config)
        return self

    def _setup(self, backend: tokenizers.Tokenizer, tokenizer_config: dict) -> None:
        self._tok = backend
        # transformers sets this on every backend it loads (tokenizer.json or not); False by default.
        self._tok.encode_special_tokens = bool(tokenizer_config.get("split_special_tokens", False))
        self.special_tokens_map = {}
        for key in _SPECIAL_KEYS:
            value = tokenizer_config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                self.special_tokens_map[key] = value

    def backend_copy(self) -> tokenizers.Tokenizer:
        """An independent copy of the underlying ``tokenizers.Tokenizer`` (to extend or save)."""
        return tokenizers.Tokenizer.from_str(self._tok.to_str())

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for. A byte-level BPE piece can be part of a UTF-8
        character (``decode`` shows it as U+FFFD); its bytes come from GPT-2's byte table."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if isinstance(self._tok.decoder, decoders.ByteLevel) and token_id not in self._added_ids() \
                and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def special_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (<|im_start|>, <image>, ...): markup, never text."""
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def _added_ids(self) -> frozenset[int]:
        if getattr(self, "_added", None) is None:
            self._added = frozenset(self._tok.get_added_tokens_decoder())
        return self._added


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the
    rest are shifted to U+0100 onwards."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(0x100 + shifted)] = b
            shifted += 1
    return table


_BYTE_OF_CHAR = _byte_level_table()


def qwen2_backend(vocab_file: str | Path, merges_file: str | Path, tokenizer_config: dict,
                  added_tokens_file: str | Path | None = None) -> tokenizers.Tokenizer:
    """A ``tokenizers.Tokenizer`` from vocab.json + merges.txt with Qwen2's pipeline and added tokens.

    The pipeline is transformers' Qwen2Tokenizer's (and its Qwen2Converter's): NFC, Qwen2's split
    regex (isolated), byte-level without regex and without prefix space (unless the config sets
    ``add_prefix_space``), BPE without unk token, dropout or byte fallback, byte-level decoder, and
    no BOS/EOS added. The added tokens are, as transformers takes them, tokenizer_config.json's
    ``added_tokens_decoder`` (id -> flags) or, without one, added_tokens.json (token -> id; special
    when the config names the token), then any named special token of the config still missing.
    Each declared token must land on its declared id: tokenizers appends added tokens after the
    vocabulary, so a gap or an id inside the vocabulary raises ModelLoadError (transformers would
    silently renumber).
    """
    vocab_file, merges_file = Path(vocab_file), Path(merges_file)
    missing = [f.name for f in (vocab_file, merges_file) if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{vocab_file.parent} has no {' or '.join(missing)} (needed without tokenizer.json)")
    try:
        vocab, merges = BPE.read_file(str(vocab_file), str(merges_file))
    except Exception as e:
        raise ModelLoadError(f"cannot read {vocab_file} + {merges_file}: {e}") from e
    tok = tokenizers.Tokenizer(BPE(
        vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
        end_of_word_suffix="", fuse_unk=False, byte_fallback=False,
    ))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(tokenizer_config.get("add_prefix_space") or False),
                                 use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only: adds no token

    declared, source = _declared_added_tokens(tokenizer_config, added_tokens_file, vocab_file.parent)
    named, extra = _special_token_names(tokenizer_config)
    specials = set(named) | set(extra)
    tokens = []
    for _, token in sorted(declared.items()):
        flags = {k: token[k] for k in _TOKEN_FLAGS if k in token}
        flags["special"] = bool(flags.get("special", False)) or token["content"] in specials
        tokens.append(AddedToken(token["content"], **flags))
    contents = {t.content for t in tokens}
    for name in list(named) + list(extra):  # named special tokens the files do not declare
        if name not in contents:
            tokens.append(AddedToken(name, special=True))
            contents.add(name)
    if tokens:
        tok.add_tokens(tokens)
    wrong = [(t["content"], i, tok.token_to_id(t["content"])) for i, t in sorted(declared.items())
             if tok.token_to_id(t["content"]) != i]
    if wrong:
        listing = ", ".join(f"{c!r} declared {i}, would get {g}" for c, i, g in wrong[:5])
        raise ModelLoadError(
            f"the added tokens in {source} do not follow the {len(vocab)}-entry vocabulary of {vocab_file} "
            f"without gaps ({listing}); ovfast cannot give them their declared ids"
        )
    return tok


def _declared_added_tokens(config: dict, added_tokens_file: str | Path | None, where: Path) -> tuple[dict, str]:
    """{id: {"content": ..., flags}}: tokenizer_config.json's added_tokens_decoder when it has one
    (transformers then ignores added_tokens.json), else added_tokens.json's entries."""
    if "added_tokens_decoder" in config:
        out = {}
        for idx, token in (config.get("added_tokens_decoder") or {}).items():
            if isinstance(token, str):
                token = {"content": token}
            if not isinstance(token, dict) or not isinstance(token.get("content"), str):
                raise ModelLoadError(f"tokenizer_config.json's added_tokens_decoder[{idx!r}] is not a token entry")
            try:
                out[int(idx)] = token
            except ValueError:
                raise ModelLoadError(f"tokenizer_config.json's added_tokens_decoder has a non-integer id {idx!r}") from None
        return out, "tokenizer_config.json (added_tokens_decoder)"
    if added_tokens_file is None or not Path(added_tokens_file).is_file():
        return {}, "added_tokens.json"
    entries = _read_config(Path(added_tokens_file))
    named, extra = _special_token_names(config)
    specials = set(named) | set(extra)
    out = {}
    for content, idx in entries.items():
        if not isinstance(idx, int):
            raise ModelLoadError(f"{added_tokens_file}: the id of {content!r} is not an integer")
        special = content in specials
        out[idx] = {"content": content, "lstrip": False, "rstrip": False, "normalized": not special, "special": special}
    return out, str(added_tokens_file)


def _special_token_names(config: dict) -> tuple[list[str], list[str]]:
    """(named special tokens, extra special tokens) as transformers' Qwen2Tokenizer sees the config."""
    named = []
    for key in _SPECIAL_KEYS:
        value = config[key] if key in config else _QWEN2_DEFAULTS.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value not in named:
            named.append(value)
    extra = []
    for value in config.get("extra_special_tokens") or config.get("additional_special_tokens") or []:
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value not in extra:
            extra.append(value)
    return named, extra


def _read_config(p: Path) -> dict:
    if not p.is_file():
        return {}
    try:
        value = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{p} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ModelLoadError(f"{p} is not a JSON object")
    return value


class IncrementalDecoder:
    """Text of a growing id sequence, released only in whole characters.

    Byte-level BPE tokens can end inside a multi-byte UTF-8 character; decoding such a prefix
    gives U+FFFD. New text is released once it no longer ends in one, decoding only a short
    window of recent tokens each time (so streaming costs O(1) per token, not O(n)).
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # window start: the text before it is final
        self._read = 0  # ids up to here are already released
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._tok.decode(self.ids[self._prefix : self._read])
        new_text = self._tok.decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Release whatever is held back (an incomplete character becomes U+FFFD, as decode gives)."""
        full = self._tok.decode(self.ids)
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += delta
        self._prefix = self._read = len(self.ids)
        return delta


class _GenerationTag(jinja2.ext.Extension):
    """transformers' ``{% generation %}...{% endgeneration %}``: renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """A checkpoint's chat template, compiled once, rendered as transformers renders it."""

    def __init__(self, source: str):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ModelLoadError(f"the checkpoint's chat template does not compile: {e}") from e

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
