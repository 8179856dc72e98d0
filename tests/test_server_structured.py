"""Structured outputs and tool calls over HTTP (issue #24), through the official `openai` client
against a real `ovfast serve` on 127.0.0.1."""
from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
from test_server import NAME, _start, _stop
from test_structured import SCHEMAS, valid

pytest.importorskip("xgrammar")

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "additionalProperties": False,
                                                           "required": ["city", "unit"],
                                                           "properties": {"city": {"type": "string", "maxLength": 12},
                                                                          "unit": {"enum": ["C", "F"]}}}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["a", "b"],
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0,
                                                                            "maximum": 99}}}}}
TOOLS = [WEATHER, ADD]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def served(checkpoint_dirs, tmp_path_factory):
    s = _start(checkpoint_dirs["tiny"], tmp_path_factory.mktemp("serve-structured") / "server.log")
    yield s
    assert _stop(s) == 0


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _arguments_valid(call) -> None:
    tool = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
    assert valid(json.loads(call.function.arguments), tool), call.function.arguments
    assert re.fullmatch(r"call_[0-9a-f]+", call.id) and call.type == "function"


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "add"}}, "required"],
                         ids=["named", "required"])
def test_tool_calls_whole_and_streamed(client, choice):
    kw = dict(model=NAME, messages=MESSAGES, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=200)
    r = client.chat.completions.create(**kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    _arguments_valid(call)
    if isinstance(choice, dict):
        assert call.function.name == "add"
    with client.chat.completions.stream(**kw) as stream:  # the client's own accumulation of the deltas
        for _ in stream:
            pass
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    streamed = final.message.tool_calls[0]
    _arguments_valid(streamed)
    assert (streamed.function.name, streamed.function.arguments) == (call.function.name, call.function.arguments)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == call.function.name
    assert len(deltas) > 2 and all(d.id is None and d.function.name is None for d in deltas[1:])
    assert "".join(d.function.arguments for d in deltas) == call.function.arguments


def test_tool_choice_none_answers_in_text(client):
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                       temperature=0, max_tokens=5)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"


def test_response_format_json_schema_and_structured_outputs(client):
    schema = SCHEMAS["enum-integer-boolean"]
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=100, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    assert r.choices[0].finish_reason == "stop" and valid(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=1, seed=3, max_tokens=20,
                                       extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}})
    assert r.choices[0].message.content in ("sunny", "rainy")
    r = client.completions.create(model=NAME, prompt="A number:", max_tokens=20, temperature=0,
                                  extra_body={"structured_outputs": {"regex": "[0-9]{2,4}"}})
    assert re.fullmatch("[0-9]{2,4}", r.choices[0].text)
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=100,
                                       extra_body={"structured_outputs": {"json": json.dumps(schema)}})
    assert valid(json.loads(r.choices[0].message.content), schema)


@pytest.mark.parametrize("body, param, needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "array",
                                                                                        "uniqueItems": True}}}},
     "response_format", "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nonsense"}}}},
     "response_format", "nonsense"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs", "compile"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"json": {"type": "object"}}, "response_format": {"type": "json_object"}},
     "structured_outputs", "at most one"),
    ({"tools": TOOLS}, "tool_choice", "auto"),
    ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", "auto"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}],
      "tool_choice": "required"}, "tools", "not"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}], "tool_choice": "required"}, "tools", "name"),
    ({"frobnicate": True}, "frobnicate", "unknown parameter"),
    ({"logit_bias": {"1": 5}}, "logit_bias", "not supported"),
])
def test_bad_constraints_and_unknown_keys_are_400_naming_them(served, body, param, needle):
    r = httpx.post(served.url + "/v1/chat/completions", timeout=60,
                   json={"model": NAME, "messages": MESSAGES, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err


def test_openai_client_defaults_and_metadata_keys_are_accepted(served, client):
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=3, temperature=0, user="u1",
                                       metadata={"k": "v"}, store=False, parallel_tool_calls=True, logit_bias={},
                                       response_format={"type": "text"})
    assert r.choices[0].finish_reason == "length"
    r = httpx.post(served.url + "/v1/completions", timeout=60,
                   json={"model": NAME, "prompt": "Hi", "max_tokens": 2, "tools": [WEATHER]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"  # completions take no tools
