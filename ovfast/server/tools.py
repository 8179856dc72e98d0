"""Tool calls as a constrained answer: OpenAI's ``tools`` and ``tool_choice`` become one JSON
schema, and the answer comes back as ``message.tool_calls`` (whole, or as stream deltas).

The answer is one call, ``{"name": <a tool's name>, "arguments": <an object valid for its
parameters>}``: for a named ``tool_choice`` the name is that tool's, for ``"required"`` the schema
is the anyOf of every tool's call. ``"none"`` answers in plain text. ``"auto"`` (OpenAI's default
when tools are given) is refused: choosing between text and a call needs a chat template with a
tool section, and the checkpoint's has none. For the same reason the tool definitions are not
shown to the model: the grammar alone makes the call well-formed.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from ..errors import GrammarError
from ..runtime.constraints import check_schema
from .protocol import APIError

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# The call's head as the grammar writes it (one line, fixed separators; spaces allowed anyway), up
# to the first character of the arguments.
_HEAD = re.compile(r'\{\s*"name"\s*:\s*"([A-Za-z0-9_-]+)"\s*,\s*"arguments"\s*:\s*(?=\S)')
_NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolChoice:
    """The request's tools and ``tool_choice``, as the answer's JSON schema."""

    names: tuple[str, ...]
    schema: dict

    def response_format(self) -> dict:
        return {"type": "json_schema", "json_schema": {"name": "tool_call", "schema": self.schema, "strict": True}}


def tool_choice(body: dict) -> ToolChoice | None:
    """The tool call the answer must be, or None for a plain answer; an ``APIError`` (400) naming
    ``tools`` or ``tool_choice`` for anything this server cannot do."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice is None or choice == "none":
            return None
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list of {'type': 'function', 'function': {...}}", param="tools")
    calls = dict(_tool(t, i) for i, t in enumerate(tools))
    if len(calls) < len(tools):
        raise APIError(400, "tools: two tools have the same name", param="tools")
    if choice == "none":
        return None
    if choice is None or choice == "auto":
        raise APIError(400, 'tool_choice "auto" (the default when tools are given) is not supported: the '
                            "checkpoint's chat template has no tool section; pass tool_choice \"required\", "
                            '{"type": "function", "function": {"name": ...}}, or "none"', param="tool_choice")
    if choice == "required":
        names = tuple(calls)
    else:
        fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise APIError(400, 'tool_choice must be "none", "required" or {"type": "function", "function": '
                                '{"name": ...}}', param="tool_choice")
        if name not in calls:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        names = (name,)
    branches = [calls[n] for n in names]
    schema = branches[0] if len(branches) == 1 else {"anyOf": branches}
    try:
        check_schema(schema, "tools")
    except GrammarError as e:
        raise APIError(400, str(e), param="tools", code="invalid_schema") from None
    return ToolChoice(names, schema)


def _tool(tool, i: int) -> tuple[str, dict]:
    """(name, the JSON schema of a call of it)."""
    fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not _NAME.fullmatch(fn["name"]):
        raise APIError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': "
                            "{...}}}} with a name of letters, digits, _ and -, at most 64", param="tools")
    params = fn.get("parameters")
    params = _NO_PARAMETERS if params is None else params
    if not isinstance(params, dict):
        raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
    return fn["name"], {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False}


class ToolCallText:
    """The answer's text as it arrives, turned into one OpenAI tool call: ``feed`` returns the
    stream deltas ready so far (the id, type and name first, then pieces of the arguments
    string), ``finish`` the rest and the whole call, or None when the text is not a complete call
    (cut by max_tokens or a stop string)."""

    def __init__(self):
        self.id = "call_" + uuid.uuid4().hex[:24]
        self.text = ""
        self.name: str | None = None
        self._start = self._sent = 0  # where the arguments start in the text; how far they are sent

    def feed(self, piece: str) -> list[dict]:
        self.text += piece
        out = []
        if self.name is None:
            m = _HEAD.match(self.text)
            if m is None:
                return out
            self.name, self._start = m.group(1), m.end()
            self._sent = self._start
            out.append({"index": 0, "id": self.id, "type": "function",
                        "function": {"name": self.name, "arguments": ""}})
        end = len(self.text) - 1  # the last character may be the call's closing brace
        if end > self._sent:
            out.append(self._arguments(self.text[self._sent : end]))
            self._sent = end
        return out

    def finish(self) -> tuple[list[dict], dict | None]:
        try:
            call = json.loads(self.text)
        except ValueError:
            return [], None
        if self.name is None or not isinstance(call, dict) or call.get("name") != self.name:
            return [], None
        end = self.text.rstrip().rindex("}")  # the call's closing brace
        rest = self.text[self._sent : end]
        self._sent = end
        arguments = self.text[self._start : end]
        return ([self._arguments(rest)] if rest else []), {
            "id": self.id, "type": "function", "function": {"name": self.name, "arguments": arguments}}

    @staticmethod
    def _arguments(piece: str) -> dict:
        return {"index": 0, "function": {"arguments": piece}}
