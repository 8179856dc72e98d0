"""Structured outputs (issue #24): JSON schemas, regex, choice, EBNF grammars and tool calls.

The model has random weights, so whatever it answers is the constraint's doing: every answer
here must parse, validate and end by itself. Also: the keyword allow-list against xgrammar's
own behaviour, the decode step's mask bookkeeping, unconstrained neighbours keeping their solo
answers, preemption, tensor parallelism, and an install without xgrammar.
"""
from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch

import ovfast
from ovfast.errors import GenerationParamsError, GrammarError, StructuredOutputsUnavailableError
from ovfast.runtime import constraints
from ovfast.runtime.decode import DecodeRunner
from ovfast.runtime.request import SamplingParams

xgr = pytest.importorskip("xgrammar")

PROMPT = "Describe the weather as data."

# --- a small validator for the keywords the tests use ---------------------------------------------------


def valid(x, s: dict, root: dict | None = None) -> bool:
    root = root or s
    if "$ref" in s:
        node = root
        for part in s["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        return valid(x, node, root)
    if "enum" in s and not any(x == e and type(x) is type(e) for e in s["enum"]):
        return False
    if "const" in s and not (x == s["const"] and type(x) is type(s["const"])):
        return False
    if "anyOf" in s and not any(valid(x, b, root) for b in s["anyOf"]):
        return False
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    t = s.get("type")
    if t == "integer" and (isinstance(x, bool) or not isinstance(x, int)):
        return False
    if t == "number" and (isinstance(x, bool) or not isinstance(x, (int, float))):
        return False
    if t in kinds and not isinstance(x, kinds[t]):
        return False
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        if ("minimum" in s and x < s["minimum"]) or ("maximum" in s and x > s["maximum"]):
            return False
        if ("exclusiveMinimum" in s and x <= s["exclusiveMinimum"]) or \
                ("exclusiveMaximum" in s and x >= s["exclusiveMaximum"]):
            return False
    if isinstance(x, str):
        if len(x) < s.get("minLength", 0) or len(x) > s.get("maxLength", len(x)):
            return False
        if "pattern" in s and not re.search(s["pattern"], x):
            return False
    if isinstance(x, dict):
        props = s.get("properties", {})
        if any(k not in x for k in s.get("required", [])):
            return False
        for k, v in x.items():
            if k in props:
                if not valid(v, props[k], root):
                    return False
            elif s.get("additionalProperties") is False:
                return False
    if isinstance(x, list):
        if len(x) < s.get("minItems", 0) or len(x) > s.get("maxItems", len(x)):
            return False
        prefix = s.get("prefixItems", [])
        for i, v in enumerate(x):
            sub = prefix[i] if i < len(prefix) else s.get("items", {})
            if sub is False or (isinstance(sub, dict) and not valid(v, sub, root)):
                return False
    return True


def _object(properties: dict, **kw) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False,
            **kw}


SCHEMAS = {
    "enum-integer-boolean": _object({"colour": {"enum": ["red", "green", "blue"]},
                                     "count": {"type": "integer", "minimum": -3, "maximum": 12},
                                     "ok": {"type": "boolean"}}),
    "number-range-nested": _object({"position": _object({"x": {"type": "number", "minimum": -1, "maximum": 1},
                                                         "y": {"type": "number", "exclusiveMinimum": 0,
                                                               "exclusiveMaximum": 5}}),
                                    "label": {"type": "string", "maxLength": 6}}),
    "arrays": _object({"tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1,
                                "maxItems": 3},
                       "pair": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                                 {"type": "boolean"}], "items": False}}),
    "refs-anyof-const": {"$defs": {"level": {"enum": [1, 2, 3]}},
                         **_object({"kind": {"const": "reading"}, "level": {"$ref": "#/$defs/level"},
                                    "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 5}]}})},
}


def _json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def engine(tiny):
    return tiny[1]


# --- answers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=7)], ids=["greedy", "seeded"])
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_answers_parse_validate_and_end_by_themselves(engine, name, sampling):
    schema = SCHEMAS[name]
    c = engine.complete(None, PROMPT, response_format=_json_schema(schema), max_new_tokens=300, **sampling)
    assert c.finish_reason == "stop", c.text
    assert valid(json.loads(c.text), schema), c.text


def test_a_json_schema_over_an_image_in_chat(engine):
    image = torch.zeros(3, 40, 50, dtype=torch.uint8).numpy().transpose(1, 2, 0)
    schema = SCHEMAS["enum-integer-boolean"]
    c = engine.chat([{"role": "user", "content": [{"type": "image", "image": image},
                                                  {"type": "text", "text": "What is it?"}]}],
                    response_format=_json_schema(schema), max_new_tokens=100)
    assert c.finish_reason == "stop" and valid(json.loads(c.text), schema)


@pytest.mark.parametrize("kw, check", [
    (dict(regex=r"[a-z]{2,6}@[a-z]{2,4}\.(com|org)"), lambda t: re.fullmatch(r"[a-z]{2,6}@[a-z]{2,4}\.(com|org)", t)),
    (dict(choice=["yes", "no", 'a "quoted" choice']), lambda t: t in ("yes", "no", 'a "quoted" choice')),
    (dict(grammar='root ::= "(" [0-9]{1,4} ("," [0-9]{1,4})* ")"'),
     lambda t: re.fullmatch(r"\(\d{1,4}(,\d{1,4})*\)", t)),
], ids=["regex", "choice", "ebnf"])
def test_regex_choice_and_grammar_greedy_and_seeded(engine, kw, check):
    greedy = engine.complete(None, PROMPT, max_new_tokens=200, temperature=0, **kw)
    assert check(greedy.text) and greedy.finish_reason == "stop", greedy.text
    seeded = [engine.complete(None, PROMPT, max_new_tokens=200, temperature=1.0, seed=11, **kw) for _ in range(2)]
    assert check(seeded[0].text) and seeded[0].finish_reason == "stop", seeded[0].text
    assert seeded[0].token_ids == seeded[1].token_ids  # the same seed, the same answer


def test_json_object_answers_an_object(engine):
    c = engine.complete(None, PROMPT, response_format={"type": "json_object"}, max_new_tokens=100, temperature=1.0,
                        seed=JSON_OBJECT_SEED)
    assert c.finish_reason == "stop" and isinstance(json.loads(c.text), dict), c.text


JSON_OBJECT_SEED = 10  # random weights: one seed whose object closes within the budget


def test_logprobs_of_a_constrained_answer_are_the_models(engine):
    """The chosen tokens obey the grammar; their log-probabilities are the unmasked model's."""
    free = engine.complete(None, PROMPT, max_new_tokens=1, logprobs=3)
    c = engine.complete(None, PROMPT, choice=["0", "1"], max_new_tokens=5, logprobs=3)
    assert c.text in ("0", "1")
    assert c.logprobs[0].top == free.logprobs[0].top  # the model's own top tokens, banned or not
    assert c.logprobs[0].logprob <= free.logprobs[0].logprob


# --- refusals --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keyword, schema", [
    ("multipleOf", {"type": "number", "multipleOf": 0.5}),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}),
    ("patternProperties", {"type": "object", "patternProperties": {"^x": {"type": "integer"}}}),
    ("dependencies", {"type": "object", "dependencies": {"a": ["b"]}}),
    ("not", {"not": {"type": "integer"}}),
    ("if", {"type": "object", "properties": {"a": {"if": {"type": "integer"}, "then": {"minimum": 3}}}}),
    ("allOf", {"allOf": [{"type": "integer"}, {"minimum": 3}]}),
    ("contains", {"type": "array", "items": {"type": "integer"}, "contains": {"const": 3}}),
    ("format", {"type": "string", "format": "idn-email"}),
    ("maxLength", {"type": "string", "format": "date", "maxLength": 3}),
])
def test_keywords_xgrammar_would_not_enforce_are_refused_by_name(engine, keyword, schema):
    with pytest.raises(GrammarError, match=re.escape(keyword)) as e:
        engine.submit(None, PROMPT, response_format=_json_schema(schema))
    assert e.value.param == "response_format"


# Each allowed keyword with an instance it admits and one it must refuse, checked on xgrammar's matcher.
ENFORCED = [
    ({"type": "integer", "minimum": 3, "maximum": 5}, "4", "7"),
    ({"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 5}, "4", "5"),
    ({"type": "number", "minimum": 0.5, "maximum": 2.5}, "1.5", "0.25"),
    ({"type": "string", "minLength": 2, "maxLength": 3}, '"abc"', '"abcd"'),
    ({"type": "string", "maxLength": 3}, '"ab"', '"a\x15"'),  # no raw control characters (invalid JSON)
    ({"type": "string", "pattern": "^[a-c]+$"}, '"abc"', '"abd"'),
    ({"type": "string", "format": "date"}, '"2024-01-02"', '"yesterday"'),
    ({"type": "string", "format": "email"}, '"a@b.co"', '"ab"'),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}, "[1, 2]", "[1, 2, 3]"),
    ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False}, '[1, "a"]',
     '[1, "a", 2]'),
    ({"enum": ["a", 1, None]}, "null", "2"),
    ({"const": "x"}, '"x"', '"y"'),
    ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, "true", '"a"'),
    ({"oneOf": [{"type": "integer"}, {"type": "null"}]}, "null", '"a"'),
    ({"type": ["integer", "null"]}, "null", '"a"'),
    (_object({"a": {"type": "integer"}}), '{"a": 1}', '{"a": 1, "b": 2}'),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}}, "required": ["b"],
      "additionalProperties": False}, '{"b": true}', '{"a": 1}'),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {"type": "string"}},
     '{"a": 1, "z": "x"}', '{"a": 1, "z": 2}'),
    ({"$defs": {"n": {"type": "integer"}}, **_object({"a": {"$ref": "#/$defs/n"}})}, '{"a": 1}', '{"a": "x"}'),
    ({"definitions": {"n": {"type": "boolean"}}, **_object({"a": {"$ref": "#/definitions/n"}}, title="t",
                                                           description="d")}, '{"a": true}', '{"a": 1}'),
]


@pytest.mark.parametrize("schema, good, bad", ENFORCED, ids=[json.dumps(s)[:50] for s, _, _ in ENFORCED])
def test_every_allowed_keyword_is_enforced_by_xgrammar(engine, schema, good, bad):
    compiled = engine.grammars.compile(constraints.schema_constraint(schema, "response_format"))

    def accepts(text):
        m = xgr.GrammarMatcher(compiled.grammar)
        return m.accept_string(text) and m.is_completed()

    assert accepts(good) and not accepts(bad)


@pytest.mark.parametrize("kw, param, needle", [
    (dict(response_format=_json_schema({"type": "foo"})), "response_format", "Unsupported type"),
    (dict(response_format=_json_schema({"$ref": "#/$defs/missing"})), "response_format", "missing"),
    (dict(regex="[a-"), "regex", "cannot compile"),
    (dict(grammar="root ::= undefined_rule"), "grammar", "undefined_rule"),
])
def test_a_constraint_that_cannot_compile_fails_the_request_before_admission(engine, kw, param, needle):
    h = engine.submit(None, PROMPT, **kw)
    with pytest.raises(GrammarError, match=needle) as e:
        h.result(timeout=60)
    assert e.value.param == param
    assert engine.complete(None, PROMPT, max_new_tokens=2).finish_reason == "length"  # the engine is untouched


@pytest.mark.parametrize("kw", [
    dict(regex="a+", choice=["a"]),
    dict(response_format={"type": "json_object"}, grammar='root ::= "a"'),
    dict(response_format={"type": "xml"}),
    dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
    dict(response_format=_json_schema([1])),
    dict(choice=[]),
    dict(choice="yes"),
    dict(regex=""),
])
def test_malformed_or_several_constraints_are_refused_at_submit(engine, kw):
    with pytest.raises(GenerationParamsError):
        engine.submit(None, PROMPT, **kw)


def test_complete_many_overrides_carry_constraints(engine):
    with pytest.raises(GenerationParamsError, match="at most one constraint"):
        engine.complete_many([(None, PROMPT, {"choice": ["a"]})], regex="b+")
    out = engine.complete_many([(None, PROMPT, {"choice": ["left", "right"]}), (None, PROMPT, {"regex": "[0-9]{3}"})],
                               max_new_tokens=20)
    assert out[0].text in ("left", "right") and re.fullmatch(r"[0-9]{3}", out[1].text)


def test_response_format_text_is_no_constraint(engine):
    p = SamplingParams.make(response_format={"type": "text"})
    assert p.constraint is None and p.plain_greedy


# --- batching, preemption, tensor parallelism --------------------------------------------------------------


def test_unconstrained_neighbours_keep_their_solo_answers(engine):
    plain = [("A plain question about colours.", {}), ("Another plain one, sampled.", {"temperature": 1.0, "seed": 3}),
             ("A third, with penalties.", {"repetition_penalty": 1.3, "logprobs": 2})]
    solo = [engine.complete(None, p, max_new_tokens=12, **kw) for p, kw in plain]
    schema = SCHEMAS["arrays"]
    mixed = [(None, plain[0][0], plain[0][1]), (None, PROMPT, {"response_format": _json_schema(schema),
                                                                 "max_new_tokens": 200}),
             (None, plain[1][0], plain[1][1]), (None, PROMPT, {"regex": "[a-z]{1,40}", "temperature": 1.0, "seed": 2}),
             (None, plain[2][0], plain[2][1])]
    out = engine.complete_many(mixed, max_new_tokens=12)
    for got, want in zip([out[0], out[2], out[4]], solo):
        assert got.token_ids == want.token_ids
    # (log-probabilities: as in any batch, within float rounding of the solo ones)
    assert [t.logprob for t in out[4].logprobs] == pytest.approx([t.logprob for t in solo[2].logprobs], abs=1e-4)
    assert valid(json.loads(out[1].text), schema) and re.fullmatch("[a-z]{1,40}", out[3].text)
    # concurrent submits, the constrained one first
    handles = [engine.submit(None, PROMPT, response_format=_json_schema(schema), max_new_tokens=200)]
    handles += [engine.submit(None, p, max_new_tokens=12, **kw) for p, kw in plain]
    assert [h.result().token_ids for h in handles[1:]] == [c.token_ids for c in solo]
    assert valid(json.loads(handles[0].result().text), schema)


def test_preempted_constrained_requests_stay_valid(checkpoint_dirs):
    schema = _object({"items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99999},
                                "minItems": 8, "maxItems": 10}, "name": {"type": "string", "maxLength": 12}})
    with ovfast.load(checkpoint_dirs["tiny"], dtype="float32", max_batch_size=4, kv_cache_tokens=192,
                     kv_block_size=16) as small:
        jobs = [(None, f"Tell a long story number {i}.", {"response_format": _json_schema(schema)}) for i in range(4)]
        out = small.complete_many(jobs, max_new_tokens=120)
        assert small.stats()["preemptions"] > 0
    for c in out:
        assert c.finish_reason == "stop" and valid(json.loads(c.text), schema), c.text


def test_tensor_parallel_constrained_request_equals_one_process(checkpoint_dirs, engine):
    schema = SCHEMAS["enum-integer-boolean"]
    kw = dict(response_format=_json_schema(schema), max_new_tokens=100)
    want = [engine.complete(None, PROMPT, **kw), engine.complete(None, PROMPT, regex="[a-z]{1,9}", temperature=1.0,
                                                                 seed=5, max_new_tokens=20)]
    with ovfast.load(checkpoint_dirs["tiny"], dtype="float32", max_seq_len=2048, tensor_parallel_size=2) as tp:
        got = [tp.complete(None, PROMPT, **kw), tp.complete(None, PROMPT, regex="[a-z]{1,9}", temperature=1.0,
                                                            seed=5, max_new_tokens=20)]
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert valid(json.loads(got[0].text), schema)


# --- the decode step's mask ------------------------------------------------------------------------------


def test_mask_rows_flags_and_order_before_penalties(engine):
    lm = engine.model.language_model
    d = DecodeRunner(lm, engine.cache, torch.device("cpu"), rows=3, max_blocks=4)
    vocab, words = lm.cfg.vocab_size, d.mask.shape[1]
    assert words == (vocab + 31) // 32 and bool((d.mask == -1).all()) and d.constrained == [False] * 3
    allowed = [5, 40, vocab - 1]
    bits = np.zeros(words * 32, dtype=bool)
    bits[allowed] = True
    row = torch.from_numpy(np.packbits(bits.reshape(-1, 32), axis=1, bitorder="little").view(np.int32)[:, 0].copy())
    d.set_mask(1, row)
    assert d.constrained == [False, True, False] and bool((d.mask[0] == -1).all())
    logits = torch.randn(3, vocab)
    logits[1, 7] = 100.0  # the model's favourite, banned
    for slot, p in enumerate([SamplingParams.make(), SamplingParams.make(presence_penalty=-2.0),
                              SamplingParams.make(temperature=1.0, seed=4)]):
        d.set_params(slot, p, seed=4, prompt_ids=torch.tensor([1, 2]))
    d.counts[1, 7] = 3  # a negative presence penalty would favour token 7 further
    positions = torch.tensor([4, 4, 4])
    masked = d.choose(logits, slice(0, 3), positions, general=True, masked=True)
    assert torch.equal(d.out_logprob[1], torch.log_softmax(logits[1], -1)[int(masked[1])])  # the raw model's
    plain = d.choose(logits, slice(0, 3), positions, general=True, masked=False)
    assert int(masked[1]) in allowed and int(plain[1]) == 7
    assert int(masked[0]) == int(plain[0]) and int(masked[2]) == int(plain[2])  # all-ones rows: unchanged
    d.retire(1)
    assert d.constrained == [False] * 3 and bool((d.mask == -1).all())


def test_the_engine_marks_constrained_rows_and_clears_them(engine, monkeypatch):
    d = engine.runner.decode
    variants, step = [], d.step
    monkeypatch.setattr(d, "step", lambda rows, general, masked=False: variants.append((general, masked)) or
                        step(rows, general, masked))
    engine.complete(None, PROMPT, regex="[a-z]{5,9}", max_new_tokens=20)
    assert set(variants) == {(False, True)}  # greedy and constrained: the fast variant, masked
    variants.clear()
    engine.complete(None, PROMPT, regex="[a-z]{5,9}", max_new_tokens=20, temperature=0.5, seed=1)
    assert set(variants) == {(True, True)}
    assert not any(d.constrained) and bool((d.mask == -1).all())


# --- without xgrammar ---------------------------------------------------------------------------------------


def test_without_xgrammar_the_engine_runs_and_refuses_constrained_requests(checkpoint_dirs, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # `import xgrammar` now raises ImportError
    assert not constraints.available()
    with ovfast.load(checkpoint_dirs["tiny"], dtype="float32", max_seq_len=2048) as e:
        assert e.complete(None, PROMPT, max_new_tokens=3).finish_reason == "length"
        with pytest.raises(StructuredOutputsUnavailableError, match=re.escape("ovfast[structured]")):
            e.submit(None, PROMPT, regex="a+")
        monkeypatch.setattr(constraints, "available", lambda: True)  # found, but its import fails on the worker
        with pytest.raises(StructuredOutputsUnavailableError, match=re.escape("ovfast[structured]")):
            e.complete(None, PROMPT, regex="a+")
        assert e.complete(None, PROMPT, max_new_tokens=3).finish_reason == "length"


@pytest.mark.gpu
def test_constrained_answers_with_cuda_graphs_equal_eager_steps(checkpoint_dirs, monkeypatch):
    """The masked variant is captured at load like the others and reads the mask buffer in place."""
    jobs = [(None, PROMPT, {"response_format": _json_schema(SCHEMAS["arrays"])}),
            (None, "Plain.", {"max_new_tokens": 9}), (None, PROMPT, {"regex": "[a-z]{1,20}", "temperature": 1.0,
                                                                     "seed": 1})]
    with ovfast.load(checkpoint_dirs["tiny"], device="cuda", dtype="float32", max_batch_size=4,
                     max_seq_len=1024) as graphs:
        assert graphs.runner.use_graphs and any(key[2] for key in graphs.runner.decode.graphs)
        a = [c.token_ids for c in graphs.complete_many(jobs, max_new_tokens=200)]
    monkeypatch.setenv("OVFAST_CUDA_GRAPHS", "0")
    with ovfast.load(checkpoint_dirs["tiny"], device="cuda", dtype="float32", max_batch_size=4,
                     max_seq_len=1024) as eager:
        assert a == [c.token_ids for c in eager.complete_many(jobs, max_new_tokens=200)]
