"""``ovfast serve``: an OpenAI-compatible HTTP server on uvicorn.

The socket opens at once and ``/health`` answers 503 until the model is loaded (weights,
vision warm-up, CUDA graphs), then 200.

SIGTERM or Ctrl-C (SIGINT) drains, and the process then exits 0:

1. The listener stays open: every new request, on a new or a kept-alive connection, gets a 503
   in OpenAI's error shape (type "service_unavailable", code "draining"), ``/health`` too.
2. The requests in flight run on until they finish, for up to ``--grace-period`` seconds; the
   drain ends as soon as none is left.
3. Each request still open then is cancelled (its slot freed at the next engine step): a whole
   answer becomes a 503 (code "draining"); a stream gets a last chunk with finish_reason
   "cancelled" (the text so far was already sent) and ``data: [DONE]``. They get up to 10 s
   to send those last bytes.
4. uvicorn closes the listener and the idle connections, the lifespan closes the engine (once),
   and ``main`` returns 0: no cancelled task, no traceback in the log.

A second signal during the drain cuts the grace period short: what is left is cancelled at once,
as in 3.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import uvicorn

from ..runtime.engine import load
from ..settings import environment
from .app import Server, ServerConfig, create_app, log
from .media import MediaPolicy


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ovfast serve", description="OpenAI-compatible server for LLaVA-OneVision")
    p.add_argument("--model", required=True, help="Hub id or local checkpoint directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the model name clients pass (default: --model)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (or set OVFAST_API_KEY)")
    p.add_argument("--max-request-bytes", type=int, default=64 << 20, help="largest request body (413 above)")
    p.add_argument("--allowed-media-domains", nargs="*", default=[], metavar="DOMAIN",
                   help="hosts http(s) media urls may come from (subdomains included); none by default")
    p.add_argument("--allowed-local-media-path", metavar="DIR", help="file:// media urls may name files under DIR")
    p.add_argument("--max-media-bytes", type=int, default=64 << 20, help="largest fetched media item")
    p.add_argument("--media-timeout", type=float, default=10.0, help="seconds to fetch one media url")
    p.add_argument("--grace-period", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--log-level", default="info")
    g = p.add_argument_group("engine (ovfast.load)")
    g.add_argument("--device")
    g.add_argument("--dtype", help="float32, bfloat16 or float16")
    g.add_argument("--max-batch-size", type=int, default=16)
    g.add_argument("--max-queue", type=int, default=256)
    g.add_argument("--max-seq-len", type=int)
    g.add_argument("--max-images", type=int, default=16)
    g.add_argument("--max-video-frames", type=int, default=64)
    g.add_argument("--prefill-chunk", type=int, default=None, help="prompt tokens per loop turn (default 1024 on a GPU, 4096 on a CPU)")
    g.add_argument("--preprocess-workers", type=int, default=2)
    g.add_argument("--kv-cache-tokens", type=int, help="KV-cache budget in positions (default: from free GPU memory)")
    g.add_argument("--kv-block-size", type=int, help="positions per KV page (default: 256 with flash-attn, else 16)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--no-prefix-caching", action="store_true", help="do not reuse identical prompt prefixes")
    g.add_argument("--encoder-cache-tokens", type=int, default=16384, help="vision features kept by media (0: off)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="cut the decoder across N GPUs; under torchrun, rank 0 serves HTTP")
    g.add_argument("--semantics", choices=["original", "transformers"],
                   help="whose reference to reproduce (default by checkpoint family: lmms-lab original, llava-hf transformers)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    load_options = dict(device=args.device, dtype=args.dtype, max_batch_size=args.max_batch_size,
                        max_queue=args.max_queue, max_seq_len=args.max_seq_len, max_images=args.max_images,
                        max_video_frames=args.max_video_frames, prefill_chunk=args.prefill_chunk,
                        preprocess_workers=args.preprocess_workers, semantics=args.semantics,
                        tensor_parallel_size=args.tensor_parallel_size, kv_cache_tokens=args.kv_cache_tokens,
                        kv_block_size=args.kv_block_size, gpu_memory_utilization=args.gpu_memory_utilization,
                        prefix_caching=not args.no_prefix_caching, encoder_cache_tokens=args.encoder_cache_tokens)
    launched = environment.torchrun_rank()
    if launched is not None and launched[0] > 0 and args.tensor_parallel_size > 1:
        load(args.model, **load_options)  # this rank serves rank 0's decoder inside load() and exits there
        return 0
    config = ServerConfig(
        model=args.model, served_model_name=args.served_model_name,
        api_key=args.api_key or environment.api_key(), max_request_bytes=args.max_request_bytes,
        media=MediaPolicy(tuple(args.allowed_media_domains), args.allowed_local_media_path, args.max_media_bytes,
                          args.media_timeout),
    )
    server = Server(config, loader=lambda: load(args.model, **load_options))
    # The drain (below) has answered every request before uvicorn's own shutdown starts: that only
    # closes the listener and the idle connections, so its timeout is short.
    uv = _DrainingServer(uvicorn.Config(server.counting(create_app(server)), host=args.host, port=args.port,
                                        log_level=args.log_level, access_log=False,
                                        timeout_graceful_shutdown=_SHUTDOWN_TIMEOUT_S),
                         server, args.grace_period)
    server.on_load_error = lambda e: setattr(uv, "should_exit", True)
    uv.run()
    if server.load_error is not None:
        print(f"ovfast serve: the model failed to load: {server.load_error}", file=sys.stderr)
        return 1
    return 0


_SHUTDOWN_TIMEOUT_S = 5.0


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, draining before it shuts down.

    uvicorn's own handling of a signal closes the listener at once and, at its timeout, cancels the
    requests' tasks mid-response. Here the first signal starts ``Server.drain`` instead, with the
    listener open; uvicorn is told to exit only once that is over. The signal is not recorded for
    uvicorn to raise again after ``run`` (that would turn Ctrl-C into a KeyboardInterrupt)."""

    def __init__(self, config: uvicorn.Config, server: Server, grace: float):
        super().__init__(config)
        self.ovfast = server
        self.grace = grace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task | None = None
        self._hurry: asyncio.Event | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig, frame) -> None:
        # A signal handler, run between two bytecodes of whatever the loop is doing: hand over to the loop.
        if self._loop is None or self._loop.is_closed():
            self.should_exit = True  # not serving yet (or any more): nothing to drain
            return
        self._loop.call_soon_threadsafe(self._on_signal, sig)

    def _on_signal(self, sig) -> None:
        name = signal.Signals(sig).name
        if self._drain is None:
            stats = self.ovfast.stats()
            log.info("%s: draining (%d running, %d waiting); new requests get 503; grace period %g s", name,
                     stats["running"], stats["waiting"], self.grace)
            self.ovfast.draining = True  # at once, before the drain task's first step
            self._hurry = asyncio.Event()
            self._drain = asyncio.get_running_loop().create_task(self._drain_then_exit())
        elif not self._hurry.is_set():
            log.info("%s again: cancelling the requests left now", name)
            self._hurry.set()

    async def _drain_then_exit(self) -> None:
        try:
            await self.ovfast.drain(self.grace, self._hurry)
        except Exception:
            log.exception("the drain failed")
        finally:
            log.info("drained: shutting down")
            self.should_exit = True


if __name__ == "__main__":
    sys.exit(main())
