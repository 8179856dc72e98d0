"""`ovfast serve` drains on SIGTERM and Ctrl-C (issue #20), checked on a real server subprocess.

During the drain the listener stays open and every new request gets a 503 in OpenAI's error
shape (code "draining"), /health too; the requests in flight run on until they finish or the
grace period ends; what is left is then cancelled cleanly (a whole answer: 503 JSON; a stream:
a last chunk with a finish_reason, then [DONE]); the process exits 0 with no traceback logged.
"""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from test_server import NAME, _start, _wait_metric

GRACE = 2.0
LONG = 30_000  # tokens: far beyond the grace period on any machine (--max-seq-len 32768 below)
SHORT = 3_000  # tokens: a few seconds on the CPU, well within a grace period of 60 s


def _body(text: str, max_tokens: int, stream: bool = False) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        try:
            out["response"] = fn()
        except BaseException as e:  # reported by the test's assertions
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _assert_draining(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": {"message": response.json()["error"]["message"],
                                         "type": "service_unavailable", "param": None, "code": "draining"}}


def _assert_clean_exit(served, timeout: float = 30.0) -> None:
    assert served.proc.wait(timeout) == 0
    log = served.log.read_text()
    assert "Traceback" not in log and "CancelledError" not in log, log[-4000:]
    with pytest.raises(httpx.HTTPError):  # the listener is closed once the drain is over
        httpx.get(served.url + "/health", timeout=2)


def _kill(served) -> None:
    if served.proc.poll() is None:
        served.proc.kill()
        served.proc.wait(30)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_requests_outliving_the_grace_period_are_cancelled_cleanly(checkpoint_dirs, tmp_path, sig):
    served = _start(checkpoint_dirs["tiny"], tmp_path / "serve.log", "--grace-period", str(GRACE),
                    "--max-seq-len", "32768", "--max-batch-size", "4")
    url = served.url + "/v1/chat/completions"
    try:
        with httpx.stream("POST", url, json=_body("Stream on.", LONG, stream=True), timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            whole, result = _in_thread(lambda: httpx.post(url, json=_body("Whole answer.", LONG), timeout=60))
            _wait_metric(served, "ovfast_requests_running", 2.0)
            signalled = time.monotonic()
            served.proc.send_signal(sig)
            # The drain: the listener still takes connections; every new request gets 503.
            deadline = time.monotonic() + 10
            while (health := httpx.get(served.url + "/health", timeout=5)).status_code == 200:
                assert time.monotonic() < deadline, "/health stayed 200 after the signal"
                time.sleep(0.02)
            late = httpx.post(url, json=_body("Too late.", 2), timeout=5)
            probed = time.monotonic() - signalled
            assert served.proc.poll() is None
            rest = [line for line in lines if line.startswith("data: ")]
            ended = time.monotonic() - signalled
        whole.join(60)
        _assert_draining(health)
        _assert_draining(late)
        assert probed < GRACE, f"the probes took {probed:.1f} s: not during the grace period"
        # The requests ran through the grace period, then were cancelled at once.
        assert GRACE - 0.2 <= ended < GRACE + 10, ended
        assert rest[-1] == "data: [DONE]"
        final = json.loads(rest[-2].removeprefix("data: "))
        assert final["choices"][0]["finish_reason"] == "cancelled"
        assert final["choices"][0]["delta"] == {}
        pieces = [json.loads(line.removeprefix("data: "))["choices"][0]["delta"].get("content") for line in rest[:-2]]
        assert sum(1 for p in pieces if p) > 1  # the text generated during the grace period was sent
        assert "error" not in result, repr(result.get("error"))
        _assert_draining(result["response"])
        _assert_clean_exit(served)
    finally:
        _kill(served)


def test_a_request_finishing_within_the_grace_period_is_answered_in_full(checkpoint_dirs, tmp_path):
    served = _start(checkpoint_dirs["tiny"], tmp_path / "serve.log", "--grace-period", "60")
    url = served.url + "/v1/chat/completions"
    try:
        expected = httpx.post(url, json=_body("Short answer.", SHORT), timeout=60)
        assert expected.status_code == 200
        thread, result = _in_thread(lambda: httpx.post(url, json=_body("Short answer.", SHORT), timeout=60))
        _wait_metric(served, "ovfast_requests_running", 1.0)
        signalled = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        health = httpx.get(served.url + "/health", timeout=5)  # the listener is still open
        assert served.proc.poll() is None
        thread.join(60)
        assert "error" not in result, repr(result.get("error"))
        _assert_draining(health)
        r = result["response"]
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] == SHORT
        assert answer["choices"][0]["message"]["content"] == expected.json()["choices"][0]["message"]["content"]
        _assert_clean_exit(served)
        assert time.monotonic() - signalled < 30  # the drain ends with the last request, not the grace period
    finally:
        _kill(served)
