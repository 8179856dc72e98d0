"""Tokenizer (the `tokenizers` library on tokenizer.json) and the chat-template renderer.

Both reproduce what transformers' LlavaOnevisionProcessor does: the same token ids for the
same text (Qwen2 adds no BOS), the same decoding with special tokens skipped, and the checkpoint's
chat template rendered in the same sandboxed jinja2 environment, including transformers'
``{% generation %}`` tag.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ModelLoadError

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    def __init__(self, tokenizer_file: Path, tokenizer_config: dict):
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:
            raise ModelLoadError(f"cannot load {tokenizer_file}: {e}") from e
        self.special_tokens_map = {}
        for key in _SPECIAL_KEYS:
            value = tokenizer_config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                self.special_tokens_map[key] = value

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


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
