"""``ovfast serve``: an OpenAI-compatible HTTP server on uvicorn.

The socket opens at once and ``/health`` answers 503 until the model is loaded (weights,
vision warm-up, CUDA graphs), then 200. SIGTERM or Ctrl-C: the server stops accepting
connections and answers 503 to new requests, lets in-flight requests finish for up to
``--grace-period`` seconds, cancels what is left, closes the engine and exits 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import uvicorn

from ..runtime.engine import load
from ..runtime.tensor_parallel import from_torchrun
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
    g.add_argument("--prefill-chunk", type=int, default=1024)
    g.add_argument("--preprocess-workers", type=int, default=2)
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
                        tensor_parallel_size=args.tensor_parallel_size)
    launched = from_torchrun()
    if launched is not None and launched[0] > 0 and args.tensor_parallel_size > 1:
        load(args.model, **load_options)  # this rank serves rank 0's decoder inside load() and exits there
        return 0
    config = ServerConfig(
        model=args.model, served_model_name=args.served_model_name,
        api_key=args.api_key or os.environ.get("OVFAST_API_KEY"), max_request_bytes=args.max_request_bytes,
        media=MediaPolicy(tuple(args.allowed_media_domains), args.allowed_local_media_path, args.max_media_bytes,
                          args.media_timeout),
    )
    server = Server(config, loader=lambda: load(args.model, **load_options))
    uv = _DrainingServer(uvicorn.Config(create_app(server), host=args.host, port=args.port, log_level=args.log_level,
                                 access_log=False, timeout_graceful_shutdown=args.grace_period), server)
    server.on_load_error = lambda e: setattr(uv, "should_exit", True)
    # uvicorn re-raises the signal after its graceful shutdown, to the handler it found: make
    # that a no-op for SIGTERM, so a drained server exits 0.
    signal.signal(signal.SIGTERM, lambda sig, frame: None)
    uv.run()
    if server.load_error is not None:
        print(f"ovfast serve: the model failed to load: {server.load_error}", file=sys.stderr)
        return 1
    return 0


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, draining first: at the first signal new requests get 503 while uvicorn
    stops accepting and waits up to the grace period for the ones in flight."""

    def __init__(self, config: uvicorn.Config, server: Server):
        super().__init__(config)
        self.ovfast = server

    def handle_exit(self, sig, frame) -> None:
        self.ovfast.draining = True
        stats = self.ovfast._stats()
        log.info("draining: %d running, %d waiting", stats["running"], stats["waiting"])
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    sys.exit(main())
