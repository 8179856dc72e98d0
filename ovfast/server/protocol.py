"""OpenAI's wire format: request bodies to engine calls, completions to response bodies.

Parsing never touches the engine: a body is checked here (types, ranges, ``n``, media urls
through the ``MediaPolicy``) and any problem becomes an ``APIError`` with OpenAI's error shape
and the offending parameter's OpenAI name.
"""
from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import (
    ContextLengthError,
    EngineBusyError,
    EngineOverloadedError,
    GenerationParamsError,
    GrammarError,
    InputError,
    OvfastError,
    PromptError,
    StructuredOutputsUnavailableError,
)
from ..inputs.media import Video
from ..runtime.generation import Completion, TokenLogprob
from .media import MediaPolicy

MAX_TOP_LOGPROBS = 20


@dataclass
class APIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict = field(default_factory=dict)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Engine parameter -> the OpenAI name a client used for it (for error messages).
_API_NAMES = {"max_new_tokens": "max_tokens", "logprobs": "top_logprobs"}


def api_error(e: BaseException, prompt_param: str = "messages", constraint_param: str | None = None) -> APIError:
    """The HTTP error for an exception from the engine or from parsing; ``prompt_param`` names
    where the prompt came from ("messages" for chat, "prompt" for completions), ``constraint_param``
    the body key of the request's constraint ("response_format", "structured_outputs", "tools")."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, (GrammarError, StructuredOutputsUnavailableError)):
        code = "invalid_schema" if isinstance(e, GrammarError) else "structured_outputs_unavailable"
        return APIError(400, str(e), param=constraint_param or getattr(e, "param", None), code=code)
    if isinstance(e, EngineOverloadedError):
        return APIError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, EngineBusyError):
        return APIError(503, "the server is shutting down", "service_unavailable", code="draining")
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), param=prompt_param, code="context_length_exceeded")
    if isinstance(e, PromptError):
        return APIError(400, str(e), param=prompt_param, code="invalid_prompt")
    if isinstance(e, GenerationParamsError):
        name = str(e).split(" ", 1)[0]
        return APIError(400, str(e), param=_API_NAMES.get(name, name), code="invalid_parameter")
    if isinstance(e, InputError):
        return APIError(400, str(e), param=prompt_param, code="invalid_input")
    if isinstance(e, OvfastError):
        return APIError(500, str(e), "server_error")
    return APIError(500, f"internal error: {type(e).__name__}", "server_error")


# --- the body ------------------------------------------------------------------------------

MAX_JSON_DEPTH = 64  # far above any real request; a deeper one would exhaust the parser's stack
_JSON_STRUCTURE = re.compile(rb'[\[\]{}"\\]')


def parse_body(data: bytes) -> dict:
    """The JSON object of a request body. Nesting is checked before parsing (``json.loads``
    recurses once per level), so a deeply nested body is a 400, never a ``RecursionError``."""
    depth, in_string, escaped = 0, False, -1
    for m in _JSON_STRUCTURE.finditer(data):  # brackets, quotes and backslashes only: string bodies are skipped
        i, c = m.start(), data[m.start()]
        if i == escaped:
            continue
        if in_string:
            if c == 0x5C:  # a backslash escapes the next byte
                escaped = i + 1
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise APIError(400, f"the body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
        elif c in (0x5D, 0x7D):
            depth -= 1
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return body


# --- parameters ------------------------------------------------------------------------------

# Every body key the endpoints read; any other is refused (400), so a parameter this server does not
# implement is never silently ignored. The metadata keys change nothing in the answer.
_METADATA = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
_COMMON_KEYS = {
    "model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options", "logprobs",
    "presence_penalty", "frequency_penalty", "logit_bias", "response_format",
    "top_k", "min_p", "repetition_penalty", "ignore_eos", "structured_outputs",  # vLLM's extras
} | _METADATA
CHAT_KEYS = frozenset(_COMMON_KEYS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                                      "parallel_tool_calls", "functions", "function_call"})
COMPLETION_KEYS = frozenset(_COMMON_KEYS | {"prompt", "echo", "suffix", "best_of"})


def check_keys(body: dict, chat: bool) -> None:
    known = CHAT_KEYS if chat else COMPLETION_KEYS
    unknown = sorted(k for k in body if k not in known)
    if unknown:
        raise APIError(400, f"unknown parameter {unknown[0]!r}: this endpoint does not implement it (it accepts "
                            f"{', '.join(sorted(known))})", param=unknown[0], code="unknown_parameter")


def _get(body: dict, name: str, kinds: tuple, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise APIError(400, f"{name} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}", param=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"{name} must be finite", param=name)
    return value


def sampling_params(body: dict, chat: bool) -> dict:
    """Engine keyword arguments from an OpenAI body (defaults as OpenAI's: temperature 1, top_p 1),
    the constraint aside (``constraint``)."""
    check_keys(body, chat)
    n = _get(body, "n", (int,), 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    if body.get("best_of") not in (None, 1):
        raise APIError(400, "only best_of=1 is supported", param="best_of")
    for unsupported in ("functions", "function_call", "logit_bias", "echo", "suffix"):
        if body.get(unsupported) and body.get(unsupported) != "none":
            raise APIError(400, f"{unsupported} is not supported by this server", param=unsupported)
    if chat:
        max_tokens = _get(body, "max_completion_tokens", (int,), None)
        max_tokens = _get(body, "max_tokens", (int,), None) if max_tokens is None else max_tokens
        if _get(body, "logprobs", (bool,), False):
            logprobs = _get(body, "top_logprobs", (int,), 0)
            if not 0 <= logprobs <= MAX_TOP_LOGPROBS:
                raise APIError(400, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs")
        elif body.get("top_logprobs") is not None:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        else:
            logprobs = None
    else:
        max_tokens = _get(body, "max_tokens", (int,), 16)  # the completions API's own default
        logprobs = _get(body, "logprobs", (int,), None)
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise APIError(400, f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]", param="logprobs")
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise APIError(400, "stop must be a string or a list of strings", param="stop")
    temperature = _get(body, "temperature", (int, float), 1.0)
    if not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be in [0, 2], got {temperature}", param="temperature")
    return {
        "max_new_tokens": max_tokens, "temperature": temperature, "top_p": _get(body, "top_p", (int, float), 1.0),
        "top_k": _get(body, "top_k", (int,), 0), "min_p": _get(body, "min_p", (int, float), 0.0),
        "seed": _get(body, "seed", (int,), None), "stop": stop or None,
        "presence_penalty": _get(body, "presence_penalty", (int, float), 0.0),
        "frequency_penalty": _get(body, "frequency_penalty", (int, float), 0.0),
        "repetition_penalty": _get(body, "repetition_penalty", (int, float), 1.0),
        "ignore_eos": _get(body, "ignore_eos", (bool,), False), "logprobs": logprobs,
    }


_STRUCTURED = ("json", "regex", "choice", "grammar")


def constraint(body: dict, tool_format: dict | None = None) -> tuple[dict, str | None]:
    """(the engine's constraint keyword argument, the body key it came from): ``response_format``,
    ``structured_outputs`` (vLLM's: exactly one of json, regex, choice, grammar) or the tools'
    ``tool_format``; at most one of them. The engine checks the constraint itself."""
    found = []
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        found.append(("response_format", {"response_format": fmt}))
    so = body.get("structured_outputs")
    if so is not None:
        keys = [k for k, v in so.items() if v is not None] if isinstance(so, dict) else []
        if not isinstance(so, dict) or len(keys) != 1 or keys[0] not in _STRUCTURED:
            raise APIError(400, f"structured_outputs must have exactly one of {', '.join(_STRUCTURED)}",
                           param="structured_outputs")
        key, value = keys[0], so[keys[0]]
        if key == "json":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as e:
                    raise APIError(400, f"structured_outputs.json is not JSON: {e}", param="structured_outputs") from None
            found.append(("structured_outputs", {"response_format": {
                "type": "json_schema", "json_schema": {"name": "structured_outputs", "schema": value}}}))
        else:
            found.append(("structured_outputs", {key: value}))
    if tool_format is not None:
        found.append(("tools", {"response_format": tool_format}))
    if len(found) > 1:
        raise APIError(400, f"at most one of response_format, structured_outputs and tools may constrain the answer; "
                            f"got {' and '.join(k for k, _ in found)}", param=found[1][0])
    return (found[0][1], found[0][0]) if found else ({}, None)


def stream_options(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = _get(body, "stream", (bool,), False)
    options = _get(body, "stream_options", (dict,), {})
    return stream, stream and _get(options, "include_usage", (bool,), False)


# --- messages --------------------------------------------------------------------------------

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


async def engine_messages(body: dict, policy: MediaPolicy) -> list[dict]:
    """OpenAI chat messages -> the engine's messages, every media url fetched under ``policy``.

    Video: a ``video_url`` part, or consecutive ``image_url`` parts marked ``"modalities": "video"``
    (SGLang's convention), which become one video of those frames.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(role, str) or role not in _ROLES:
            raise APIError(400, f"messages[{i}] needs a role in {sorted(_ROLES)}", param="messages")
        content = m.get("content")
        if content is None and m["role"] == "assistant":
            content = ""
        if isinstance(content, str):
            out.append({"role": _ROLES[m["role"]], "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"messages[{i}].content must be a string or a list of parts", param="messages")
        parts, frames = [], []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            where = f"messages[{i}].content[{j}]"
            if kind == "image_url" and part.get("modalities") == "video":
                frames.append(await policy.fetch(_url(part, "image_url", where)))
                continue
            if frames:
                parts.append({"type": "video", "video": Video(frames)})
                frames = []
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise APIError(400, f"{where}: a text part needs a string text", param="messages")
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                parts.append({"type": "image", "image": await policy.fetch(_url(part, "image_url", where))})
            elif kind == "video_url":
                data = await policy.fetch(_url(part, "video_url", where))
                parts.append({"type": "video", "video": await asyncio.to_thread(Video, data)})
            else:
                raise APIError(400, f"{where}: unsupported part type {kind!r} (text, image_url, video_url)",
                               param="messages")
        if frames:
            parts.append({"type": "video", "video": Video(frames)})
        out.append({"role": _ROLES[m["role"]], "content": parts})
    return out


def _url(part: dict, key: str, where: str) -> str:
    ref = part.get(key)
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str):
        raise APIError(400, f"{where}: a {key} part needs {key}.url", param="messages")
    return url


def completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "prompt must be a string (one prompt per request)", param="prompt")
    return prompt


# --- responses -------------------------------------------------------------------------------


TokenBytes = Callable[[int], bytes]  # token id -> its raw bytes (``Tokenizer.token_bytes``)


@dataclass
class Reply:
    """What every response of one request shares."""

    kind: str  # "chat.completion" or "text_completion"
    model: str
    token_bytes: TokenBytes | None = None  # None: each token's text as UTF-8
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def chat(self) -> bool:
        return self.kind == "chat.completion"

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.id

    def _envelope(self, obj: str, choices: list, usage: dict | None) -> dict:
        out = {"id": self.response_id, "object": obj, "created": self.created, "model": self.model,
               "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def full(self, c: Completion, tool_call: dict | None = None) -> dict:
        """The whole response; with ``tool_call`` (the answer parsed as one), as a tool call."""
        finish = _finish(c)
        if self.chat:
            message = {"role": "assistant", "content": c.text}
            if tool_call is not None:
                message, finish = {"role": "assistant", "content": None, "tool_calls": [tool_call]}, "tool_calls"
            choice = {"index": 0, "message": message, "finish_reason": finish,
                      "logprobs": chat_logprobs(c.logprobs, self.token_bytes)}
        else:
            choice = {"index": 0, "text": c.text, "finish_reason": finish, "logprobs": text_logprobs(c.logprobs)}
        return self._envelope(self.kind, [choice], usage(c))

    def chunk(self, text: str | None, finish: str | None = None, logprobs: list[TokenLogprob] | None = None,
              first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish,
                      "logprobs": chat_logprobs(logprobs, self.token_bytes) if logprobs else None}
            return self._envelope("chat.completion.chunk", [choice], None)
        choice = {"index": 0, "text": text or "", "finish_reason": finish,
                  "logprobs": text_logprobs(logprobs) if logprobs else None}
        return self._envelope("text_completion", [choice], None)

    def tool_chunk(self, deltas: list[dict], first: bool = False, finish: str | None = None,
                   logprobs: list[TokenLogprob] | None = None) -> dict:
        """A chat chunk carrying tool-call deltas (OpenAI's stream of a tool call)."""
        delta = {"role": "assistant", "content": None} if first else {}
        if deltas:
            delta["tool_calls"] = deltas
        choice = {"index": 0, "delta": delta, "finish_reason": finish,
                  "logprobs": chat_logprobs(logprobs, self.token_bytes) if logprobs else None}
        return self._envelope("chat.completion.chunk", [choice], None)

    def usage_chunk(self, c: Completion) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, [], usage(c))


def _finish(c: Completion) -> str:
    return "length" if c.finish_reason == "length" else "stop"


def usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.token_ids),
            "total_tokens": c.prompt_tokens + len(c.token_ids),
            "prompt_tokens_details": {"cached_tokens": c.cached_tokens}}


def _entry(token_id: int, token: str, logprob: float, token_bytes: TokenBytes | None) -> dict:
    # The token's own bytes: for part of a UTF-8 character the text is U+FFFD, the bytes are not.
    raw = token_bytes(token_id) if token_bytes is not None else token.encode("utf-8")
    return {"token": token, "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(lps: list[TokenLogprob] | None, token_bytes: TokenBytes | None = None) -> dict | None:
    if lps is None:
        return None
    return {"content": [{**_entry(t.token_id, t.token, t.logprob, token_bytes),
                         "top_logprobs": [_entry(i, s, lp, token_bytes) for i, s, lp in t.top]} for t in lps]}


def text_logprobs(lps: list[TokenLogprob] | None) -> dict | None:
    if lps is None:
        return None
    offsets, pos = [], 0
    for t in lps:
        offsets.append(pos)
        pos += len(t.token)
    return {"tokens": [t.token for t in lps], "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [{s: lp for _, s, lp in t.top} for t in lps], "text_offset": offsets}
