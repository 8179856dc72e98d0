"""Load an ``ovfast serve`` server over loopback and report what its clients see.

    python benchmarks/serve_load.py --model DIR --requests 300 --concurrency 16     # starts a server
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key KEY       # or uses one

Bounded twice: at most ``--requests`` requests and at most ``--max-seconds`` of sending. Every
other request carries an image (a PNG ``data:`` URI); all are streamed. Reports requests/s,
time to first token and latency p50/p99, the error count by status, and the server's resident
memory before and after (from its /metrics), as JSON (``--out``) and a line of text.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
from PIL import Image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_uri(seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def start_server(model: str, extra: list[str], timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """``ovfast serve`` on 127.0.0.1 on a free port; returns once /health says 200."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ovfast", "serve", "--model", model, "--port", str(port), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"the server was not healthy after {timeout} s")


def resident_bytes(url: str) -> float | None:
    for line in httpx.get(url + "/metrics", timeout=10.0).text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return float(line.split()[1])
    return None


async def one(client: httpx.AsyncClient, i: int, max_tokens: int, image: str | None) -> dict:
    content = [{"type": "text", "text": f"Request {i}: describe what you see."}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code}
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                first = time.perf_counter()
    t1 = time.perf_counter()
    return {"status": 200, "ttft_ms": ((first or t1) - t0) * 1e3, "latency_ms": (t1 - t0) * 1e3}


async def run_load(url: str, requests: int, concurrency: int, max_seconds: float, max_tokens: int,
                   api_key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    image = _image_uri(0)
    sem = asyncio.Semaphore(concurrency)
    stop_at = time.monotonic() + max_seconds
    results = []

    async def client_task(client, i):
        async with sem:
            if time.monotonic() > stop_at:
                return
            try:
                results.append(await one(client, i, max_tokens, image if i % 2 else None))
            except httpx.HTTPError as e:
                results.append({"status": type(e).__name__})

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120.0, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_task(client, i) for i in range(requests)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    errors: dict[str, int] = {}
    for r in results:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1

    def pct(key, q):
        xs = sorted(r[key] for r in ok)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0

    return {
        "requests": len(results), "ok": len(ok), "errors": sum(errors.values()), "errors_by_status": errors,
        "wall_s": wall, "requests_per_s": len(ok) / wall if wall else 0.0,
        "ttft_ms": {"p50": pct("ttft_ms", 0.5), "p99": pct("ttft_ms", 0.99)},
        "latency_ms": {"p50": pct("latency_ms", 0.5), "p99": pct("latency_ms", 0.99)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server (loopback)")
    where.add_argument("--model", help="start `ovfast serve --model MODEL` on 127.0.0.1 for the run")
    p.add_argument("--server-arg", action="append", default=[], help="extra `ovfast serve` argument (repeatable)")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop sending after this long")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--api-key", default=os.environ.get("OVFAST_API_KEY"))
    p.add_argument("--out", help="write the JSON here")
    args = p.parse_args(argv)
    if args.requests > 10_000:
        p.error("--requests is capped at 10000")
    proc = None
    url = args.url
    if args.model:
        proc, url = start_server(args.model, args.server_arg)
    if not url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        p.error("this load script only targets loopback servers")
    try:
        before = resident_bytes(url)
        result = asyncio.run(run_load(url, args.requests, args.concurrency, args.max_seconds, args.max_tokens,
                                      args.api_key))
        after = resident_bytes(url)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    result.update(url=url, concurrency=args.concurrency, max_tokens=args.max_tokens,
                  rss_before_mib=before and before / 2**20, rss_after_mib=after and after / 2**20,
                  rss_growth_mib=(after - before) / 2**20 if before and after else None)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"{result['ok']}/{result['requests']} ok, {result['errors']} errors, {result['requests_per_s']:.2f} req/s, "
          f"TTFT p50 {result['ttft_ms']['p50']:.0f} ms p99 {result['ttft_ms']['p99']:.0f} ms, latency p50 "
          f"{result['latency_ms']['p50']:.0f} ms p99 {result['latency_ms']['p99']:.0f} ms, "
          f"RSS growth {result['rss_growth_mib'] or 0:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
