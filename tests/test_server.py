"""`ovfast serve` end to end: a real uvicorn server on 127.0.0.1 (a subprocess, a free port) driven
with the official `openai` client, checked against the in-process engine on the same checkpoint."""
from __future__ import annotations

import asyncio
import base64
import http.server
import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import reference as ref
from test_video_files import encode

import ovfast

KEY = "test-key-7f3a"
NAME = "tiny-ov"
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


IMAGES = [ref.synthetic_image(90, 120, 21), ref.synthetic_image(64, 64, 22), ref.synthetic_image(120, 80, 23)]
URIS = [_uri(_png(im)) for im in IMAGES]


class Served:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(m.group(1))


def _start(checkpoint: str, log: Path, *extra: str, cwd: Path = ROOT) -> Served:
    port = _free_port()
    out = log.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ovfast", "serve", "--model", checkpoint, "--port", str(port), "--dtype", "float32",
         "--max-seq-len", "8192", "--served-model-name", NAME, *extra],
        stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return Served(proc, url, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError(log.read_text()[-3000:])


def _stop(served: Served) -> int:
    served.proc.send_signal(signal.SIGTERM)
    try:
        return served.proc.wait(60)
    except subprocess.TimeoutExpired:
        served.proc.kill()
        raise


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A directory of media served over loopback HTTP (for --allowed-media-domains) and by file://."""
    root = tmp_path_factory.mktemp("media")
    (root / "a.png").write_bytes(_png(IMAGES[0]))
    encode(root / "clip.mp4", "mpeg4", "mp4", "yuv420p", n=12)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(checkpoint_dirs, media, tmp_path_factory):
    root, _ = media
    log = tmp_path_factory.mktemp("serve") / "server.log"
    served = _start(checkpoint_dirs["tiny"], log, "--api-key", KEY, "--max-batch-size", "2", "--max-queue", "4",
                    "--max-images", "3", "--max-request-bytes", "400000", "--allowed-media-domains", "127.0.0.1",
                    "--allowed-local-media-path", str(root))
    yield served
    assert _stop(served) == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _chat(client, content, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}], **kw)


def _engine_chat(engine, content, **kw):
    return engine.chat([{"role": "user", "content": content}], **kw)


# --- answers equal the library's -----------------------------------------------------------------


def test_image_answer_equals_the_engine(tiny, client):
    _, engine = tiny
    content = [{"type": "image_url", "image_url": {"url": URIS[0]}}, {"type": "text", "text": "What is this?"}]
    r = _chat(client, content, max_tokens=8)
    expected = _engine_chat(engine, content, max_new_tokens=8)
    assert r.choices[0].message.content == expected.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == expected.prompt_tokens and r.usage.completion_tokens == len(expected.token_ids)
    assert r.model == NAME and r.id.startswith("chatcmpl-")


def test_several_images_and_multi_turn(tiny, client):
    _, engine = tiny
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": URIS[1]}},
                                     {"type": "image_url", "image_url": {"url": URIS[2]}},
                                     {"type": "text", "text": "Compare them."}]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": "How?"},
    ]
    r = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=6)
    assert r.choices[0].message.content == engine.chat(messages, max_new_tokens=6).text


def test_video_frames_and_video_url(tiny, client, media):
    _, engine = tiny
    root, _ = media
    frames = [{"type": "image_url", "image_url": {"url": u}, "modalities": "video"} for u in URIS]
    r = _chat(client, frames + [{"type": "text", "text": "What happens?"}], max_tokens=6)
    expected = engine.chat([{"role": "user", "content": [{"type": "video", "video": ovfast.Video(IMAGES)},
                                                         {"type": "text", "text": "What happens?"}]}],
                           max_new_tokens=6)
    assert r.choices[0].message.content == expected.text and r.usage.prompt_tokens == expected.prompt_tokens
    clip = (root / "clip.mp4").read_bytes()
    r = _chat(client, [{"type": "video_url", "video_url": {"url": _uri(clip, "video/mp4")}},
                       {"type": "text", "text": "And here?"}], max_tokens=6)
    expected = engine.chat([{"role": "user", "content": [{"type": "video", "video": ovfast.Video(clip)},
                                                         {"type": "text", "text": "And here?"}]}], max_new_tokens=6)
    assert r.choices[0].message.content == expected.text and r.usage.prompt_tokens == expected.prompt_tokens
    assert expected.prompt_tokens > 12 * 196  # all 12 frames reached the model


def test_text_completion_equals_the_engine(tiny, client):
    _, engine = tiny
    prompt = "<|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=7, temperature=0)
    expected = engine.complete(None, prompt, chat=False, max_new_tokens=7)
    assert r.choices[0].text == expected.text and r.usage.completion_tokens == len(expected.token_ids)
    assert r.object == "text_completion"


def test_media_from_allowed_urls(tiny, client, media):
    _, engine = tiny
    root, base = media
    expected = _engine_chat(engine, [{"type": "image", "image": IMAGES[0]}, {"type": "text", "text": "Look."}],
                            max_new_tokens=5).text
    for url in (f"{base}/a.png", (root / "a.png").as_uri()):
        r = _chat(client, [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Look."}],
                  max_tokens=5)
        assert r.choices[0].message.content == expected


# --- streaming, concurrency, logprobs ------------------------------------------------------------


def test_stream_pieces_join_to_the_answer(client):
    content = [{"type": "image_url", "image_url": {"url": URIS[0]}}, {"type": "text", "text": "Describe."}]
    whole = _chat(client, content, max_tokens=10)
    chunks = list(_chat(client, content, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_concurrent_async_clients_each_get_their_solo_answer(server, client):
    prompts = [f"Question number {i}: what now?" for i in range(4)]
    solo = [_chat(client, p, max_tokens=8).choices[0].message.content for p in prompts]
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def main():
        rs = await asyncio.gather(*(aclient.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=8) for p in prompts))
        await aclient.close()
        return [r.choices[0].message.content for r in rs]

    assert asyncio.run(main()) == solo  # 4 clients on 2 slots: two wait for a slot, all exact


def test_logprobs(tiny, client):
    _, engine = tiny
    r = _chat(client, "Hello there.", max_tokens=4, logprobs=True, top_logprobs=3)
    expected = _engine_chat(engine, "Hello there.", max_new_tokens=4, logprobs=3)
    got = r.choices[0].logprobs.content
    assert len(got) == len(expected.logprobs) == 4
    for g, e in zip(got, expected.logprobs):
        assert g.token == e.token and g.logprob == pytest.approx(e.logprob, abs=1e-4)
        assert [t.token for t in g.top_logprobs] == [s for _, s, _ in e.top] and len(g.top_logprobs) == 3


def test_seeded_sampling_is_reproducible(client):
    kw = dict(max_tokens=8, seed=7, top_p=0.9)
    first = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Say something."}],
                                           temperature=0.9, **kw).choices[0].message.content
    again = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Say something."}],
                                           temperature=0.9, **kw).choices[0].message.content
    assert first == again


# --- errors --------------------------------------------------------------------------------------


def _error(exc) -> dict:
    return exc.value.response.json()["error"]


def test_input_errors_are_400_and_the_server_keeps_serving(client):
    cases = [
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, {"type": "text", "text": "x"}],
         {}, "messages"),
        ([{"type": "image_url", "image_url": {"url": URIS[0]}}] * 4 + [{"type": "text", "text": "x"}], {}, "messages"),
        ("Hi", {"max_tokens": 100_000}, "messages"),
        ("Hi", {"temperature": 5}, "temperature"),
        ("Hi", {"n": 2}, "n"),
        ("Hi", {"top_p": 0}, "top_p"),
        ([{"type": "image_url", "image_url": {"url": "/etc/passwd"}}], {}, "messages"),
        ([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}], {}, "messages"),
        ([{"type": "image_url", "image_url": {"url": "http://localhost:9/a.png"}}], {}, "messages"),
        ([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}], {}, "messages"),
    ]
    for content, kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            _chat(client, content, **kw)
        err = _error(e)
        assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], (content, err)
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "Hi", max_tokens=100_000)
    assert _error(e)["code"] == "context_length_exceeded"
    assert _chat(client, "Still there?", max_tokens=2).usage.completion_tokens == 2


def test_http_level_errors(server, client):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"x" * 500_000, headers=auth)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "Hi"}])
    assert _error(e)["code"] == "model_not_found"
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def _long_stream(server, text: str):
    """An open streamed request that will run for thousands of tokens (closed by the caller)."""
    c = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    body = {"model": NAME, "messages": [{"role": "user", "content": text}], "max_tokens": 6000, "temperature": 0,
            "ignore_eos": True, "stream": True}
    cm = c.stream("POST", "/v1/chat/completions", json=body)
    r = cm.__enter__()
    assert r.status_code == 200
    lines = r.iter_lines()
    assert next(lines).startswith("data: ")
    return c, cm, lines


def _wait_metric(server, name, value, timeout=20.0):
    deadline = time.monotonic() + timeout
    while server.metric(name) != value:
        assert time.monotonic() < deadline, f"{name} stayed at {server.metric(name)}, expected {value}"
        time.sleep(0.05)


def test_dropped_stream_frees_its_slot_and_full_queue_is_429(server, client):
    streams = [_long_stream(server, f"Blocker {i}.") for i in range(2)]  # both slots busy
    _wait_metric(server, "ovfast_requests_running", 2.0)
    waiting = [httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)]

    async def burst():
        c = waiting[0]
        body = {"model": NAME, "messages": [{"role": "user", "content": "Queued."}], "max_tokens": 2,
                "temperature": 0}
        queued = [asyncio.create_task(c.post("/v1/chat/completions", json=body)) for _ in range(4)]
        while server.metric("ovfast_requests_waiting") < 4:
            await asyncio.sleep(0.05)
        refused = await c.post("/v1/chat/completions", json=body)
        for c_, cm, _ in streams:  # drop the blockers: the queued requests get their slots
            cm.__exit__(None, None, None)
            c_.close()
        done = await asyncio.gather(*queued)
        await c.aclose()
        return refused, done

    refused, done = asyncio.run(burst())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert [r.status_code for r in done] == [200] * 4
    _wait_metric(server, "ovfast_requests_running", 0.0)
    assert server.metric("ovfast_requests_waiting") == 0.0
    assert _chat(client, "After the burst.", max_tokens=2).usage.completion_tokens == 2


def test_client_that_times_out_cancels_its_unstreamed_request(server):
    body = {"model": NAME, "messages": [{"role": "user", "content": "Never read."}], "max_tokens": 6000,
            "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(1.0, connect=5.0))
    _wait_metric(server, "ovfast_requests_running", 0.0)
    assert re.search(r"status=499", server.log.read_text())


def test_metrics_and_request_log(server, client):
    _chat(client, "Count me.", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("ovfast_requests_running", "ovfast_requests_waiting", "ovfast_kv_cache_usage",
                 "ovfast_requests_total", "ovfast_generation_tokens_total", "ovfast_prompt_tokens_total",
                 "ovfast_time_to_first_token_seconds_bucket", "ovfast_inter_token_latency_seconds_bucket",
                 "ovfast_preprocess_seconds_bucket", "ovfast_vision_seconds_bucket", "process_resident_memory_bytes"):
        assert name in text, name
    assert re.search(r'ovfast_requests_total\{finish_reason="length",status="200"\} [1-9]', text)
    with pytest.raises(openai.BadRequestError):
        _chat(client, "Hi", temperature=-1)
    text = httpx.get(server.url + "/metrics").text
    assert re.search(r'ovfast_requests_total\{finish_reason="error",status="400"\} [1-9]', text)
    log = server.log.read_text()
    assert re.search(r"chatcmpl-\w+ chat\.completion status=200 prompt=\d+ completion=3 finish=length \d+ms", log)
    assert "Count me." not in log and "base64" not in log  # never the payload


# --- lifecycle -----------------------------------------------------------------------------------


def test_health_is_503_until_loaded_and_while_draining(tiny):
    from fastapi.testclient import TestClient

    from ovfast.server.app import Server, ServerConfig, create_app

    _, engine = tiny
    release = threading.Event()

    def loader():
        release.wait(30)
        return engine

    state = Server(ServerConfig(model="m"), loader=loader)
    with TestClient(create_app(state)) as http_client:
        r = http_client.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        r = http_client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 503
        release.set()
        deadline = time.monotonic() + 30
        while http_client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        state.draining = True
        assert http_client.get("/health").status_code == 503
        state.engine = None  # the shared test engine must outlive this app's shutdown


def test_sigterm_drains_in_flight_requests_and_exits_0(checkpoint_dirs, tmp_path):
    served = _start(checkpoint_dirs["tiny"], tmp_path / "drain.log", "--grace-period", "60")
    body = {"model": NAME, "messages": [{"role": "user", "content": "Long answer."}], "max_tokens": 300,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        served.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    final = json.loads(rest[-2].removeprefix("data: "))
    assert final["choices"][0]["finish_reason"] == "length"
    assert served.proc.wait(60) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(served.url + "/health", timeout=2)


def test_load_script_runs_bounded(server):
    out = Path(server.log).with_name("load.json")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--url", server.url, "--api-key", KEY,
                    "--requests", "12", "--concurrency", "2", "--max-seconds", "120", "--max-tokens", "4",
                    "--out", str(out)], check=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["requests"] == result["ok"] == 12 and result["errors"] == 0
    assert result["requests_per_s"] > 0 and result["ttft_ms"]["p99"] >= result["ttft_ms"]["p50"] > 0
    assert result["rss_growth_mib"] is not None


def test_cached_prompt_tokens_are_reported_and_counted(server, client):
    """A repeated image question: usage.prompt_tokens_details.cached_tokens as OpenAI reports it,
    and the cache figures on /metrics."""
    content = [{"type": "image_url", "image_url": {"url": URIS[1]}}, {"type": "text", "text": "Again?"}]
    first = _chat(client, content, max_tokens=2)
    second = _chat(client, content, max_tokens=2)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens_details.cached_tokens
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    text = httpx.get(server.url + "/metrics").text
    for name in ("ovfast_kv_cache_blocks_used", "ovfast_kv_cache_blocks_total", "ovfast_prefix_cache_hit_tokens",
                 "ovfast_prefix_cache_query_tokens", "ovfast_encoder_cache_hits", "ovfast_encoder_cache_misses",
                 "ovfast_preemptions"):
        assert name in text, name
    assert re.search(r"ovfast_prefix_cache_hit_tokens [1-9]", text)
