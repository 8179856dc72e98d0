"""Structured outputs: a request's constraint as an xgrammar grammar, and the token masks that
hold a constrained sequence to it.

A constraint is one of: a JSON schema (``response_format={"type": "json_schema", ...}``), any
JSON object (``{"type": "json_object"}``), a regular expression (``regex=``), one of several
strings (``choice=``) or an EBNF grammar (``grammar=``, xgrammar's dialect). ``parse`` checks its
shape where the request is submitted; ``Grammars.compile`` turns it into a compiled grammar on a
preprocessing worker (``RequestBuilder``), so a bad or slow schema costs its caller, never the
scheduler loop. Each constrained sequence then carries a ``GrammarState``: the model runner
feeds it every token and asks it for the next token's bitmask, which the decode step applies to
the logits.

xgrammar is optional (the ``structured`` extra) and is imported at the first constrained request,
on a worker: loading an engine, and serving unconstrained requests, never pay its import (it
brings transformers) nor the vocabulary table it builds.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import threading
from dataclasses import dataclass

import numpy as np
import torch

from ..checkpoint.tokenizer import Tokenizer
from ..errors import GrammarError, StructuredOutputsUnavailableError

INSTALL_HINT = "pip install 'ovfast[structured]'"
_CACHE_BYTES = 256 << 20  # compiled grammars kept for reuse (xgrammar's own LRU)

# JSON-schema keywords xgrammar enforces (each checked in tests/test_structured.py), and the
# annotations that constrain nothing. Anything else is refused: silently dropping a keyword would
# let through answers the schema forbids. (oneOf is generated as anyOf: exact when its branches
# do not overlap, as with a const or enum discriminator.)
SCHEMA_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "oneOf", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "pattern", "format", "$ref", "$defs", "definitions",
    "title", "description", "default", "examples", "$schema", "$comment",
})
SCHEMA_FORMATS = frozenset({
    "date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri", "uri-reference",
    "uri-template", "json-pointer", "relative-json-pointer",
})
_SUBSCHEMA = ("additionalProperties", "items")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf")


@dataclass(frozen=True)
class Constraint:
    """What a request's answer must match: ``kind`` "json_schema" (``text`` is the schema as
    JSON), "json_object", "regex" or "grammar" (EBNF; a ``choice`` becomes one)."""

    kind: str
    text: str
    param: str  # the parameter it came from, for messages


def _error(param: str, message: str) -> GrammarError:
    return GrammarError(f"{param}: {message}", param=param)


def parse(response_format=None, regex=None, choice=None, grammar=None) -> Constraint | None:
    """The request's constraint (None: free text); a ``GrammarError`` naming the parameter for a
    malformed one, or for more than one."""
    found = []
    if response_format is not None:
        c = _response_format(response_format)
        if c is not None:
            found.append(c)
    if regex is not None:
        if not isinstance(regex, str) or not regex:
            raise _error("regex", f"must be a non-empty string, got {regex!r}")
        found.append(Constraint("regex", regex, "regex"))
    if choice is not None:
        if isinstance(choice, str) or not isinstance(choice, (list, tuple)) or not choice \
                or not all(isinstance(c, str) and c for c in choice):
            raise _error("choice", f"must be a non-empty list of non-empty strings, got {choice!r}")
        # EBNF string literals take JSON's escapes: each choice as a JSON string is its literal.
        found.append(Constraint("grammar", "root ::= " + " | ".join(json.dumps(c) for c in choice), "choice"))
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise _error("grammar", f"must be a non-empty EBNF string, got {grammar!r}")
        found.append(Constraint("grammar", grammar, "grammar"))
    if len(found) > 1:
        names = [c.param for c in found]
        raise GrammarError(f"{names[0]}: at most one constraint per request, got {' and '.join(names)}",
                           param=names[1])
    return found[0] if found else None


def _response_format(fmt) -> Constraint | None:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text" and set(fmt) == {"type"}:
        return None
    if kind == "json_object" and set(fmt) == {"type"}:
        return Constraint("json_object", "", "response_format")
    if kind == "json_schema" and set(fmt) <= {"type", "json_schema"} and isinstance(fmt.get("json_schema"), dict):
        spec = fmt["json_schema"]
        unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
        if unknown:
            raise _error("response_format", f"json_schema has unknown fields {unknown} (name, schema, strict, description)")
        for key, kinds in (("name", str), ("description", str), ("strict", bool)):
            if spec.get(key) is not None and not isinstance(spec[key], kinds):
                raise _error("response_format", f"json_schema.{key} must be a {kinds.__name__}")
        if "schema" not in spec:
            raise _error("response_format", "json_schema needs its schema")
        return schema_constraint(spec["schema"], "response_format")
    raise _error("response_format", "must be {'type': 'text'}, {'type': 'json_object'} or "
                 "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}, 'strict': ...}}")


def schema_constraint(schema, param: str) -> Constraint:
    """A JSON schema (a dict) as a constraint, its keywords checked (``check_schema``)."""
    schema = check_schema(schema, param)
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise _error(param, f"the schema is not JSON: {e}") from None
    return Constraint("json_schema", text, param)


def check_schema(schema, param: str) -> dict:
    """``schema`` as xgrammar should get it; a ``GrammarError`` naming the keyword (or format)
    and where, for one it would not enforce."""
    if not isinstance(schema, dict):
        raise _error(param, f"the JSON schema must be an object, got {type(schema).__name__}")
    return _check_node(schema, "#", param)


def _check_node(node, path: str, param: str):
    """The subschema at ``path``, checked, its subschemas too; string lengths become a pattern."""
    if isinstance(node, bool):  # true / false subschemas (additionalProperties, items)
        return node
    if not isinstance(node, dict):
        raise _error(param, f"the subschema at {path} must be an object or a boolean")
    unknown = sorted(set(node) - SCHEMA_KEYWORDS)
    if unknown:
        raise _error(param, f"JSON-schema keyword {unknown[0]!r} at {path} is not supported (it cannot be "
                     f"enforced); supported: {', '.join(sorted(SCHEMA_KEYWORDS))}")
    if "format" in node and node["format"] not in SCHEMA_FORMATS:
        raise _error(param, f"string format {node['format']!r} at {path} is not supported; supported: "
                     f"{', '.join(sorted(SCHEMA_FORMATS))}")
    if {"pattern", "format"} & node.keys() and {"minLength", "maxLength"} & node.keys():
        raise _error(param, f"minLength/maxLength beside pattern or format at {path} cannot be enforced "
                     "together; put the length in the pattern")
    out = _lengths_as_pattern(node, path, param)
    for key in _SUBSCHEMA:
        if key in node:
            out[key] = _check_node(node[key], f"{path}/{key}", param)
    for key in _SUBSCHEMA_MAPS:
        if key in node:
            if not isinstance(node[key], dict):
                raise _error(param, f"{key} at {path} must be an object")
            out[key] = {name: _check_node(sub, f"{path}/{key}/{name}", param) for name, sub in node[key].items()}
    for key in _SUBSCHEMA_LISTS:
        if key in node:
            if not isinstance(node[key], list):
                raise _error(param, f"{key} at {path} must be a list")
            out[key] = [_check_node(sub, f"{path}/{key}/{i}", param) for i, sub in enumerate(node[key])]
    return out


def _lengths_as_pattern(node: dict, path: str, param: str) -> dict:
    """A copy of ``node`` with minLength/maxLength as the equivalent pattern: xgrammar 0.2.9's own
    length rule lets raw control characters into the string (invalid JSON); its pattern rule does
    not. (Escapes are not generated either way: a subset of the valid answers.)"""
    if not {"minLength", "maxLength"} & node.keys():
        return dict(node)
    lo, hi = node.get("minLength", 0), node.get("maxLength", "")
    for key, v in (("minLength", lo), ("maxLength", hi)):
        if key in node and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise _error(param, f"{key} at {path} must be an integer >= 0, got {v!r}")
    out = {k: v for k, v in node.items() if k not in ("minLength", "maxLength")}
    out["pattern"] = rf'^[^"\\\x00-\x1f]{{{lo},{hi}}}$'  # any character but a quote, backslash or control
    return out


# --- the backend -----------------------------------------------------------------------------------


def available() -> bool:
    """Whether xgrammar can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("xgrammar") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None for it
        return False


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:
        raise StructuredOutputsUnavailableError(
            f"structured outputs need xgrammar, which is not installed ({e}); {INSTALL_HINT}") from None
    return xgrammar


class Grammars:
    """One engine's grammar backend: xgrammar's tokenizer table and compiler (with its cache),
    built at the first constrained request; thread-safe (preprocessing workers compile at once)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_ids):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self.words = (vocab_size + 31) // 32  # int32 words of one row's bitmask
        stop = np.zeros(self.words * 32, dtype=bool)
        stop[self.stop_ids] = True
        self._stop_words = np.packbits(stop.reshape(-1, 32), axis=1, bitorder="little").view(np.int32)[:, 0]
        self._lock = threading.Lock()
        self._compiler = None

    @staticmethod
    def require() -> None:
        """A ``StructuredOutputsUnavailableError`` now, at the call, when xgrammar is missing."""
        if not available():
            raise StructuredOutputsUnavailableError(f"structured outputs need xgrammar, which is not installed; {INSTALL_HINT}")

    def compile(self, c: Constraint) -> "CompiledConstraint":
        """The compiled grammar of ``c`` (cached by xgrammar); runs on a preprocessing worker."""
        compiler = self._load()
        try:
            if c.kind == "json_schema":
                # One line, fixed separators: no run of whitespace can keep an answer from ending.
                # Strict: properties the schema does not name are not generated (xgrammar's default).
                g = compiler.compile_json_schema(c.text, any_whitespace=False, strict_mode=True)
            elif c.kind == "json_object":
                g = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            elif c.kind == "regex":
                g = compiler.compile_regex(c.text)
            else:
                g = compiler.compile_grammar(c.text)
        except RuntimeError as e:  # xgrammar's parse and conversion errors
            raise _error(c.param, f"cannot compile: {_xgrammar_message(e)}") from None
        return CompiledConstraint(g, self._stop_words)

    def _load(self):
        with self._lock:
            if self._compiler is None:
                xgr = _xgrammar()
                info = xgr.TokenizerInfo(self._vocabulary(), xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                         stop_token_ids=self.stop_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1),
                                                     cache_limit_bytes=_CACHE_BYTES)
            return self._compiler

    def _vocabulary(self) -> list[bytes]:
        """Each token id's raw bytes (byte-level BPE pieces decoded through GPT-2's byte table), so
        xgrammar needs no transformers tokenizer. Special tokens (<|im_start|>, <image>, ...) get
        no bytes: xgrammar then never allows them (the stop ids it allows at the end by id); ids
        past the tokenizer (the embedding's padding rows) are masked out as well."""
        special = self.tokenizer.special_ids()
        n = min(self.tokenizer.vocab_size, self.vocab_size)
        return [b"" if i in special else self.tokenizer.token_bytes(i) for i in range(n)]


def _xgrammar_message(e: Exception) -> str:
    """xgrammar's message without its '[time] file.cc:line:' prefix."""
    text = str(e).strip()
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", text) or type(e).__name__


class CompiledConstraint:
    """A compiled grammar, shared by every request with the same constraint."""

    def __init__(self, grammar, stop_words: np.ndarray):
        self.grammar, self._stop_words = grammar, stop_words

    def start(self) -> "GrammarState":
        return GrammarState(_xgrammar().GrammarMatcher(self.grammar), self._stop_words)


class GrammarState:
    """One sequence's place in its grammar: the tokens accepted so far and the next token's mask."""

    def __init__(self, matcher, stop_words: np.ndarray):
        self._matcher, self._stop_words = matcher, stop_words

    def accept(self, token: int) -> None:
        if not self._matcher.accept_token(token):  # the mask allowed it: a defect, never the request's fault
            raise RuntimeError(f"the grammar refused token {token}, which its mask allowed")

    def fill(self, bitmask: torch.Tensor, row: int) -> bool:
        """The next token's allowed ids into ``bitmask[row]`` (host int32, xgrammar's layout); False
        when the answer is complete: a stop token was accepted, or nothing but one can follow."""
        if self._matcher.is_terminated():
            return False
        self._matcher.fill_next_token_bitmask(bitmask, row)
        if self._matcher.is_completed():
            return bool((bitmask[row].numpy() & ~self._stop_words).any())
        return True
