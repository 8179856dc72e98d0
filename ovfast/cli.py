"""Command line: ``ovfast generate``, ``serve``, ``bench``, ``demo``, ``convert`` and ``build-checkpoint``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import OvfastError
from .terminal.arguments import HelpFormatter, positive_float, positive_int
from .terminal.progress import set_enabled, spinner

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _video(spec: str, num_frames: int | None):
    """One --video: a video file, or frame images (comma-separated files, directories in name order)."""
    from . import Video

    path = Path(spec)
    if "," not in spec and not path.is_dir() and path.suffix.lower() not in _IMAGE_SUFFIXES:
        return Video(spec, num_frames=num_frames)
    return Video(_frames(spec))


def _frames(spec: str) -> list[str]:
    """Frame files: comma-separated files, directories expanded to their images in name order."""
    out = []
    for p in map(Path, spec.split(",")):
        if p.is_dir():
            out += sorted(str(f) for f in p.iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES)
        else:
            out.append(str(p))
    return out


def _generate(args) -> int:
    from . import load

    # Under torchrun, a rank > 0 serves rank 0 inside load() and exits there.
    engine = load(args.model, device=args.device, dtype=args.dtype, semantics=args.semantics,
                  tensor_parallel_size=args.tensor_parallel_size)
    with engine:  # close() stops the loop (and any tensor-parallel workers)
        items = list(args.image or []) + [_video(v, args.num_frames) for v in args.video or []]
        kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  seed=args.seed, stop=args.stop, chat=not args.no_chat)
        if args.stream:
            # A long prompt (a video, many tiles) takes a while to prefill: a spinner until the first piece.
            with spinner("reading the prompt") as first_piece:
                for piece in engine.stream(items, args.prompt, **kw):
                    first_piece()
                    print(piece, end="", flush=True)
            print()
            return 0
        with spinner("generating"):
            c = engine.complete(items, args.prompt, **kw)
        if args.json:
            print(json.dumps({"text": c.text, "token_ids": c.token_ids, "prompt_tokens": c.prompt_tokens,
                              "finish_reason": c.finish_reason, "timings": c.timings.as_dict(),
                              "random_weights": engine.random_weights}, indent=2))
        else:
            print(c.text)
        if engine.random_weights:
            print("(random-weight test checkpoint: the answer is noise)", file=sys.stderr)
        return 0


def _demo(args) -> int:
    from .tools.demo import run_demo

    run_demo(args.model, max_new_tokens=args.max_new_tokens)
    return 0


def _build(args) -> int:
    from .testing.random_checkpoint import build_checkpoint

    path = build_checkpoint(args.out, args.preset, seed=args.seed, dtype=args.dtype, layout=args.layout,
                            weights=not args.no_weights, overwrite=args.force)
    print(f"wrote a random-weight {args.preset} checkpoint to {path}")
    return 0


def _convert(args) -> int:
    from .tools.convert import convert

    out = convert(args.src, args.dst, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30), overwrite=args.force)
    print(f"wrote the llava-hf layout of {args.src} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command but ``bench`` and ``serve`` (they have their own, for their --help)."""
    from .api import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="ovfast", description="Fast LLaVA-OneVision inference")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)

    quiet = dict(action="store_true", help="no progress bars (they are drawn only when stderr is a terminal)")

    g = command("generate", "answer a prompt about images or a video")
    g.add_argument("prompt", help="the question or instruction (with --no-chat: the whole prompt)")
    g.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or local checkpoint directory")
    g.add_argument("--image", action="append", help="an image file (repeat for several)")
    g.add_argument("--video", action="append", metavar="VIDEO",
                   help="a video: a video file (clip.mp4), a directory of frame images, or frame files "
                        "separated by commas (repeatable)")
    g.add_argument("--num-frames", type=positive_int, help="frames sampled uniformly from each video file (default: 32)")
    g.add_argument("--max-new-tokens", type=positive_int, default=256, help="the most tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of this probability")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 is no limit")
    g.add_argument("--seed", type=int, help="sampling seed (default: a random one)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--no-chat", action="store_true", help="use the prompt verbatim (it holds the <image>/<video>)")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    g.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on a GPU, float32 on the CPU)")
    g.add_argument("--semantics", choices=["original", "transformers"],
                   help="whose reference to reproduce (default by checkpoint family: lmms-lab original, llava-hf transformers)")
    g.add_argument("--tensor-parallel-size", type=positive_int, default=1, metavar="N",
                   help="cut the decoder across N GPUs (or N CPU processes); see the README")
    g.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    g.add_argument("--json", action="store_true", help="print the whole completion as JSON")
    g.add_argument("--quiet", **quiet)
    g.set_defaults(func=_generate)

    d = command("demo", "an image, a two-image and a video request, offline")
    d.add_argument("--model", help=f"default: {DEFAULT_MODEL} if cached, else a tiny random-weight model")
    d.add_argument("--max-new-tokens", type=positive_int, default=24, help="the most tokens per answer")
    d.set_defaults(func=_demo)

    b = command("build-checkpoint", "write a random-weight checkpoint in the Hugging Face layout")
    b.add_argument("out", help="output directory (refused if it holds files, unless --force)")
    b.add_argument("--preset", default="tiny", choices=["tiny", "tiny-mha", "0.5b", "7b", "72b"],
                   help="the model's shapes: tiny test models, or a real size")
    b.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    b.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="dtype of the weights")
    b.add_argument("--layout", default="llava-hf", choices=["llava-hf", "transformers5", "lmms-lab"],
                   help="file layout and tensor names: llava-hf (the Hub's), transformers 5.x saves, or lmms-lab originals")
    b.add_argument("--no-weights", action="store_true", help="configs and tokenizer only")
    b.add_argument("--force", action="store_true", help="write into a non-empty directory (its old weights are removed)")
    b.add_argument("--quiet", **quiet)
    b.set_defaults(func=_build)

    c = command("convert", "rewrite an original lmms-lab checkpoint in the llava-hf layout")
    c.add_argument("src", help="lmms-lab checkpoint: local directory or Hub id")
    c.add_argument("dst", help="output directory (loads in transformers, vLLM and ovfast)")
    c.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="default: keep the checkpoint's")
    c.add_argument("--max-shard-gb", type=positive_float, default=5.0, help="largest weights file, in GiB")
    c.add_argument("--force", action="store_true", help="write into a non-empty directory")
    c.add_argument("--quiet", **quiet)
    c.set_defaults(func=_convert)
    sub.add_parser("bench", help="latency against transformers and the decode roofline (ovfast bench --help)")
    sub.add_parser("serve", help="an OpenAI-compatible HTTP server (ovfast serve --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: ovfast bench --help
        from .tools.bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["serve"]:  # its own parser too: ovfast serve --help
        try:
            from .server.main import main as serve_main
        except ImportError as e:
            print(f"ovfast serve needs the serve extra: pip install 'ovfast[serve]' ({e})", file=sys.stderr)
            return 2
        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    set_enabled(not getattr(args, "quiet", False))
    try:
        return args.func(args)
    except (OvfastError, OSError) as e:  # OSError: a directory that cannot be written, a disk full
        print(f"ovfast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
