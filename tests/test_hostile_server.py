"""`ovfast serve` probed as an attacker and a careless client would: a real server subprocess on
127.0.0.1. No media reference reads a file outside the allowed root, nothing parseable is a 5xx,
and the server keeps answering, with no traceback in its log."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import NAME, URIS, _png, _start, _stop

import reference as ref


@pytest.fixture(scope="module")
def hostile(checkpoint_dirs, tmp_path_factory):
    """A server whose working directory holds a secret and a ``Data:`` directory, with an allowed
    media root holding an image, a FIFO, a sub-directory and a link to the secret."""
    work = tmp_path_factory.mktemp("hostile")
    secret = _png(ref.synthetic_image(30, 40, 5))
    (work / "secret.png").write_bytes(secret)
    (work / "Data:").mkdir()
    (work / "Data:secret.png").write_bytes(secret)
    root = work / "allowed"
    root.mkdir()
    (root / "ok.png").write_bytes(secret)
    os.mkfifo(root / "pipe.png")
    (root / "sub").mkdir()
    (root / "link.png").symlink_to(work / "secret.png")
    served = _start(checkpoint_dirs["tiny"], work / "server.log", "--allowed-local-media-path", str(root),
                    "--max-seq-len", "2048", "--max-batch-size", "2", cwd=work)
    yield served, work, root
    assert _stop(served) == 0
    log = served.log.read_text()
    assert "Traceback" not in log, log[-4000:]


def _post(url: str, body, path: str = "/v1/chat/completions", **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={"Content-Type": "application/json"}, timeout=60, **kw)


def _chat(text_or_parts, **kw) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": text_or_parts}], "max_tokens": 2,
            "temperature": 0, **kw}


def _image(url: str) -> dict:
    return _chat([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}])


def _is_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def test_case_variants_of_data_never_open_local_files(hostile):
    served, work, root = hostile
    r = _post(served.url, _image(f"file://{root}/ok.png"))
    assert r.status_code == 200, r.text
    for url in ("Data:/../secret.png", "Data:secret.png", "DATA:secret.png", "dAtA:/../secret.png",
                "secret.png", f"{work}/secret.png", "data:/../secret.png"):
        _is_openai_error(_post(served.url, _image(url)), 400, "messages")


def test_file_urls_only_regular_files_under_the_root_with_one_message(hostile):
    served, work, root = hostile
    said = set()
    for name in ("missing.png", "pipe.png", "sub", "link.png"):
        t0 = time.monotonic()
        err = _is_openai_error(_post(served.url, _image(f"file://{root}/{name}")), 400, "messages")
        assert time.monotonic() - t0 < 20  # the FIFO is refused, not opened
        said.add(err["message"].replace(name, "NAME"))
    assert len(said) == 1, said
    for url in (f"file://{root}/../secret.png", f"file://{root}/%00.png", f"FILE://{work}/secret.png",
                "file://evil.com/etc/passwd", "http://[::1/a.png", "http://a.com:99999/a.png", "https:///a.png",
                "http://a.com/a b.png", "gopher://a/b", "javascript:alert(1)"):
        _is_openai_error(_post(served.url, _image(url)), 400, "messages")


BAD_BODIES = [
    # (body, path, param)
    (b"[" * 10_000 + b"]" * 10_000, "/v1/chat/completions", None),
    (b'{"model": "tiny-ov", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "/v1/chat/completions",
     "messages"),
    (b'{"model": "tiny-ov", "prompt": "a\\udc00b"}', "/v1/completions", "prompt"),
    (_chat("Hi", seed=2**64), "/v1/chat/completions", "seed"),
    (_chat("Hi", seed=-(2**63) - 1), "/v1/chat/completions", "seed"),
    (_chat("Hi", seed=10**40), "/v1/chat/completions", "seed"),
    ({"model": NAME, "messages": [{"role": ["user"], "content": "Hi"}]}, "/v1/chat/completions", "messages"),
    ({"model": NAME, "messages": [{"role": {"a": 1}, "content": "Hi"}]}, "/v1/chat/completions", "messages"),
    ({"model": NAME, "prompt": ""}, "/v1/completions", "prompt"),
    ({"model": NAME, "prompt": [""]}, "/v1/completions", "prompt"),
    (_chat("Hi", stream="yes"), "/v1/chat/completions", "stream"),
    (_chat("Hi", stream=True, stream_options=[1]), "/v1/chat/completions", "stream_options"),
    ({"model": ["x"], "messages": []}, "/v1/chat/completions", "model"),
]


@pytest.mark.parametrize("body, path, param", BAD_BODIES)
def test_parseable_bad_requests_are_4xx_naming_the_parameter(hostile, body, path, param):
    served, _, _ = hostile
    _is_openai_error(_post(served.url, body, path), 404 if param == "model" else 400, param)


def test_huge_top_k_and_any_64_bit_seed_work(hostile):
    served, _, _ = hostile
    r = _post(served.url, _chat("Hi", temperature=1.0, top_k=2**63, seed=2**64 - 1))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_empty_prompt_is_refused_and_does_not_disturb_later_answers(hostile):
    served, _, _ = hostile
    body = {"model": NAME, "prompt": "Once upon", "max_tokens": 5, "temperature": 0}
    first = _post(served.url, body, "/v1/completions").json()["choices"][0]["text"]
    err = _is_openai_error(_post(served.url, {**body, "prompt": ""}, "/v1/completions"), 400, "prompt")
    assert err["code"] == "invalid_prompt"
    assert _post(served.url, body, "/v1/completions").json()["choices"][0]["text"] == first


def test_wrong_method_is_405_with_allow(hostile):
    served, _, _ = hostile
    r = httpx.get(served.url + "/v1/chat/completions", timeout=10)
    _is_openai_error(r, 405)
    assert "POST" in r.headers["allow"]


def test_client_that_disconnects_mid_upload_is_logged_without_a_traceback(hostile):
    served, _, _ = hostile
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n" + b'{"model": "tiny-ov", "messages": [' + b" " * 1000)
        time.sleep(0.3)
    deadline = time.monotonic() + 20
    while "disconnected before its request was read" not in served.log.read_text():
        assert time.monotonic() < deadline, served.log.read_text()[-2000:]
        time.sleep(0.1)
    assert _post(served.url, _chat("Still there?")).status_code == 200


# --- fuzz: request bodies shaped like the API's, with hostile values in every field -----------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                     st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
                     st.sampled_from(["\ud800", "Data:/../secret.png", "file:///etc/passwd", "http://[::1", "",
                                      "%00", "user", "image_url"]))
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                           max_size=3), max_leaves=8)
_urls = st.one_of(st.sampled_from(["Data:/../secret.png", "DATA:secret.png", "file:///etc/passwd", "secret.png",
                                   "http://[::1/x", "http://a.com:0/x", "data:image/png;base64,@@", URIS[0],
                                   "file://allowed/%00", "FiLe:///dev/zero"]), st.text(max_size=20))
_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=20), _json)}),
    st.fixed_dictionaries({"type": st.sampled_from(["image_url", "video_url"]),
                           "image_url": st.one_of(st.fixed_dictionaries({"url": _urls}), _urls, _json),
                           "video_url": st.one_of(st.fixed_dictionaries({"url": _urls}), _json)}),
    _json)
_message = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool"]), _json),
                                  "content": st.one_of(st.text(max_size=30), st.lists(_part, max_size=3), _json)})
_params = st.fixed_dictionaries({}, optional={
    name: st.one_of(_scalars, _json) for name in
    ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "logprobs", "top_logprobs", "stream",
     "stream_options", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "ignore_eos",
     "response_format", "echo", "tools", "max_completion_tokens")})
_chat_bodies = st.builds(lambda m, p, model: {"model": model, "messages": m, "max_tokens": 3, **p},
                         st.one_of(st.lists(_message, max_size=3), _json), _params,
                         st.sampled_from([NAME, None, "other"]))
_completion_bodies = st.builds(lambda prompt, p: {"model": NAME, "prompt": prompt, "max_tokens": 3, **p},
                               st.one_of(st.text(max_size=30), _json), _params)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.one_of(st.tuples(st.just("/v1/chat/completions"), _chat_bodies),
                 st.tuples(st.just("/v1/completions"), _completion_bodies)))
def test_fuzzed_requests_are_never_5xx(hostile, request_):
    served, _, _ = hostile
    path, body = request_
    try:
        content = json.dumps(body)
    except (ValueError, UnicodeEncodeError):
        return
    r = _post(served.url, content.encode("utf-8", "surrogatepass"), path)
    assert r.status_code < 500, (body, r.status_code, r.text[:500])
    if r.status_code >= 400:
        _is_openai_error(r, r.status_code)
