"""Inter-token latency of running streams while a video request is admitted.

    python benchmarks/itl_under_video.py                                   # 0.5b shapes, 3 streams, 32 frames
    python benchmarks/itl_under_video.py --vision-layers 2 --text-layers 4 --tag before   # CPU-sized, ~30 s
    python benchmarks/itl_under_video.py --engine-option vision_chunk=4    # options only newer engines take

``--streams`` text requests (greedy, eos ignored, long enough to outlast the video) decode on one
engine loaded with ``max_batch_size = streams + 1``; a thread per stream notes
``time.perf_counter()`` at each text piece. Once every stream is steady, a baseline window of
inter-token gaps is recorded with no video; then one request with a ``--frames``-frame
random-noise video and a short question is submitted. The admission window runs from the
video's submit to its first text piece (or its completion, if no piece came). Reported: the
streams' baseline ITL p50/p99/max, the ITL p50/p99/max of the gaps that overlap the admission
window (a gap straddling an edge counts), the longest stall, the video's time to first token and
its Timings (preprocess, vision, prefill), how many tokens each piece stood for (from the
Completions' token_ids), and every stream's piece times (JSON, ms from the video's submit).

Only the public API is used (``ovfast.load``, ``Engine.submit``, ``RequestHandle``,
``ovfast.Video``, ``Engine.close``), so the script runs against older and newer engines; options
only some engines accept go through ``--engine-option KEY=VALUE``. Presets are random weights at
the real shapes (nothing is downloaded), written to this script's own cache directories:
``--vision-layers N`` / ``--text-layers N`` cut the SigLIP tower / the decoder so that a CPU run
takes well under a minute (the report states the layer counts used), and the tokenizer is
rewritten so that every id decodes to whole characters; the random tokenizer's ids mostly end
inside a UTF-8 character, and held-back text would make one piece stand for 3-5 tokens. A
warm-up runs every path once and probes candidate stream prompts, keeping those whose greedy
output gives a piece per token. Results go to ``--out`` as ``DATE-DEVICE-itl-video-....json``
and ``.md``; the Markdown is printed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

import ovfast
from ovfast.testing.random_checkpoint import PRESETS, build_checkpoint

STREAM_PROMPTS = [
    "Write a long story about a lighthouse keeper and the ships she watches.",
    "Explain, step by step and at length, how a steam engine works.",
    "Describe a walk through a busy market town, every stall and every sound.",
    "List and discuss the history of every kind of bridge you know.",
]
VIDEO_QUESTION = "What happens in this video?"


def log(msg: str) -> None:
    print(f"[itl-video] {msg}", file=sys.stderr, flush=True)


# --- setup -----------------------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("OVFAST_CACHE", Path.home() / ".cache" / "ovfast"))


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's character -> byte map (GPT-2's ``bytes_to_unicode``, inverted)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def whole_character_tokenizer(path: Path, vocab_size: int) -> int:
    """Rewrite ``path/tokenizer.json`` so that every id but the special tokens decodes to whole
    UTF-8 characters; returns how many entries were renamed or added.

    The random tokenizer fills its vocabulary with synthetic merges (token + any byte): most entries
    end inside a multi-byte character, and the engine holds such text back until the character is
    whole, so a stream's text pieces would stand for 3-5 tokens each and its piece gaps would not
    be inter-token gaps. Here every such entry (the 128 single bytes >= 0x80 too) gets a fresh ASCII
    name (same id, so the model and every other file are unchanged) and the merges that made or used
    it are dropped. Only non-ASCII input would need the lost bytes; this benchmark's prompts are ASCII.
    The ids past the tokenizer that pad the embedding table (up to ``vocab_size``) get names too."""
    file = path / "tokenizer.json"
    data = json.loads(file.read_text(encoding="utf-8"))
    model = data["model"]
    decoder = _byte_decoder()

    def whole(token: str) -> bool:
        try:
            bytes(decoder[c] for c in token).decode("utf-8")
            return True
        except (KeyError, UnicodeDecodeError):
            return False

    vocab: dict[str, int] = model["vocab"]
    broken = {t for t in vocab if not whole(t)}
    taken = set(vocab.values()) | {t["id"] for t in data.get("added_tokens") or []}
    padding = [i for i in range(vocab_size) if i not in taken]
    if not broken and not padding:
        return 0
    merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model["merges"]]
    model["merges"] = [[a, b] for a, b in merges if not ({a, b, a + b} & broken)]
    renamed = {}
    for token, i in vocab.items():
        if token in broken:
            name = f"zq{i}"
            while name in vocab or name in renamed:
                name += "q"
            renamed[name] = i
        else:
            renamed[token] = i
    model["vocab"] = renamed
    # after the special tokens, so as added tokens (plain text ones): the library numbers added
    # tokens from the end of the BPE vocabulary, in their order
    data["added_tokens"] = sorted((data.get("added_tokens") or []) + [
        {"id": i, "content": f"zq{i}", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": False} for i in padding], key=lambda t: t["id"])
    file.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return len(broken) + len(padding)


def checkpoint(model: str, vision_layers: int | None, text_layers: int | None) -> tuple[Path, dict]:
    """(checkpoint directory, its config). A preset is written once, without weights (the engine
    makes random ones at load), to this benchmark's own cache directory, with ``vision_layers``
    SigLIP layers and ``text_layers`` decoder layers when given, and a whole-character tokenizer."""
    if model not in PRESETS:
        path = Path(model)
        if not (path / "config.json").is_file():
            raise SystemExit(f"--preset {model!r} is neither a preset ({', '.join(PRESETS)}) "
                             "nor a checkpoint directory")
        if vision_layers is not None or text_layers is not None:
            raise SystemExit("--vision-layers and --text-layers only apply to a preset")
    else:
        vision = None if vision_layers is None else {"num_hidden_layers": vision_layers}
        text = None if text_layers is None else {"num_hidden_layers": text_layers, "max_window_layers": text_layers}
        name = (f"itl-video-{model}" + (f"-vision{vision_layers}" if vision else "")
                + (f"-text{text_layers}" if text else ""))
        path = cache_dir() / f"{name}-config"
        if not (path / "done").is_file():
            log(f"writing the {model} config" + (f", {vision_layers} SigLIP layers" if vision else "")
                + (f", {text_layers} decoder layers" if text else "") + f" to {path}")
            build_checkpoint(path, model, weights=False, vision=vision, text=text)
            config = json.loads((path / "config.json").read_text())
            n = whole_character_tokenizer(path, config["text_config"]["vocab_size"])
            log(f"tokenizer: {n} ids renamed or named so that each decodes to whole characters")
            (path / "done").write_text("")
    return path, json.loads((path / "config.json").read_text())


def parse_engine_options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` strings -> load() keywords (int, float, true/false/none parsed; else the string)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"--engine-option wants KEY=VALUE, got {pair!r}")
        low = value.lower()
        if low in ("true", "false"):
            parsed = low == "true"
        elif low == "none":
            parsed = None
        else:
            try:
                parsed = int(value)
            except ValueError:
                try:
                    parsed = float(value)
                except ValueError:
                    parsed = value
        out[key] = parsed
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def git_commit() -> str | None:
    """The commit of the ovfast being measured (None outside a git checkout)."""
    try:
        root = Path(ovfast.__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return (out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def noise_video(frames: int, height: int, width: int, seed: int) -> ovfast.Video:
    rng = np.random.default_rng(seed)
    return ovfast.Video(rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8))


# --- measuring -------------------------------------------------------------------------------------


class Stream:
    """One request and the perf_counter() time of each text piece, noted by its own thread."""

    def __init__(self, name: str, handle):
        self.name, self.handle = name, handle
        self.times: list[float] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._consume, name=f"itl-{name}", daemon=True)
        self.thread.start()

    def _consume(self) -> None:
        try:
            for _ in self.handle:
                self.times.append(time.perf_counter())
        except BaseException as e:  # reported, never raised in this thread
            self.error = e

    def gaps(self, start: float, end: float, overlap: bool = False) -> list[float]:
        """Gaps (ms) between consecutive pieces: inside [start, end], or, with ``overlap``, every gap
        that overlaps (start, end) at all (a gap straddling an edge counts)."""
        t = self.times[:]
        out = []
        for a, b in zip(t, t[1:]):
            if (b > start and a < end) if overlap else (a >= start and b <= end):
                out.append((b - a) * 1e3)
        return out


def wait_until(pred, timeout: float, what: str, streams: list[Stream]) -> None:
    deadline = time.perf_counter() + timeout
    while not pred():
        for s in streams:
            if s.error is not None:
                raise RuntimeError(f"{s.name} failed while waiting for {what}: {s.error!r}")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.005)


def stats(gaps: list[float]) -> dict:
    if not gaps:
        return {"gaps": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    x = np.asarray(gaps)
    # nearest rank (an observed gap), not an interpolation: the window may hold only a few gaps
    return {"gaps": len(gaps), "p50_ms": float(np.percentile(x, 50, method="higher")),
            "p99_ms": float(np.percentile(x, 99, method="higher")), "max_ms": float(x.max()),
            "mean_ms": float(x.mean())}


def candidate(i: int) -> str:
    return STREAM_PROMPTS[i % len(STREAM_PROMPTS)] + f" (stream {i})"


def warm_up(engine, streams: int, video_frames: int, frame_size: tuple[int, int], probe_tokens: int,
            candidates: int, timeout: float) -> tuple[list[str], list[dict], float]:
    """Every code path once before anything is timed (first-call allocations, kernel compilation,
    CUDA-graph capture at every batch size up to streams + 1), and the stream prompts.

    A stream's gaps are only per-token gaps while every token gives a text piece; random weights
    decode greedily into loops that can hold special or padding ids (no text) or half a UTF-8
    character (held back). So candidate prompts are probed for ``probe_tokens`` tokens, a round of
    streams + 1 at a time, and those with the fewest tokens a piece are kept."""
    t0 = time.perf_counter()
    probes = []
    rounds = 0
    i = 0
    def score(p: dict) -> float:
        return float("inf") if p["tokens_per_piece"] is None else p["tokens_per_piece"]

    while i < candidates and sum(score(p) <= 1.0 for p in probes) < streams:
        extra = []
        if rounds == 0 and video_frames:
            extra = [engine.submit([noise_video(video_frames, *frame_size, seed=1)], VIDEO_QUESTION,
                                   max_new_tokens=4, ignore_eos=True, temperature=0)]
        batch = list(range(i, min(candidates, i + streams + 1 - len(extra))))
        handles = [engine.submit(None, candidate(k), max_new_tokens=probe_tokens, ignore_eos=True, temperature=0)
                   for k in batch]
        for k, h in zip(batch, handles):
            c = h.result(timeout=timeout)
            pieces = sum(1 for _ in h)  # finished: iterating hands back every piece at once
            probes.append({"prompt": k, "tokens": len(c.token_ids), "pieces": pieces,
                           "tokens_per_piece": len(c.token_ids) / pieces if pieces else None})
        for h in extra:
            h.result(timeout=timeout)
        i += len(batch)
        rounds += 1
    best = sorted(probes, key=lambda p: (score(p), p["prompt"]))[:streams]
    if len(best) < streams:
        best += [{"prompt": k} for k in range(i, i + streams - len(best))]
    return [candidate(p["prompt"]) for p in best], probes, (time.perf_counter() - t0) * 1e3


def run(args) -> dict:
    options = parse_engine_options(args.engine_option)
    path, config = checkpoint(args.preset, args.vision_layers, args.text_layers)
    layers = config.get("vision_config", {}).get("num_hidden_layers")
    text_layers = config.get("text_config", config).get("num_hidden_layers")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    height, width = args.frame_size
    video_tokens = args.frames * 196 + 1  # per the Video docstring: 196 a frame, one newline
    max_seq_len = args.max_seq_len or max(8192, -(-(video_tokens + 512) // 1024) * 1024)
    stream_tokens = args.stream_tokens or max_seq_len - 256
    load_kw = dict(device=str(device), dtype=dtype, max_batch_size=args.streams + 1, max_seq_len=max_seq_len, **options)
    log(f"loading {args.preset} ({layers} SigLIP layers, {text_layers} decoder layers) on {device}, {dtype}, "
        f"engine options {options or '{}'} (random weights are made at load) ...")
    t0 = time.perf_counter()
    try:
        engine = ovfast.load(str(path), **load_kw)
    except TypeError as e:
        if "unexpected keyword" not in str(e):
            raise
        raise SystemExit(f"this engine's ovfast.load() does not take these options ({e}); "
                         "drop the --engine-option") from None
    load_s = time.perf_counter() - t0
    streams: list[Stream] = []
    video: Stream | None = None
    try:
        prompts, probes, warmup_ms = [candidate(i) for i in range(args.streams)], [], None
        if args.probe_tokens:
            log(f"warm-up: stream prompts probed for {args.probe_tokens} tokens, a {args.warmup_frames}-frame video ...")
            prompts, probes, warmup_ms = warm_up(engine, args.streams, args.warmup_frames, (height, width),
                                                 args.probe_tokens, max(args.probe_prompts, args.streams), args.timeout)
        frames = noise_video(args.frames, height, width, seed=args.seed)

        log(f"starting {args.streams} streams of up to {stream_tokens} tokens ...")
        for i, prompt in enumerate(prompts):
            h = engine.submit(None, prompt, max_new_tokens=stream_tokens, ignore_eos=True, temperature=0)
            streams.append(Stream(f"stream {i}", h))
        wait_until(lambda: all(len(s.times) >= args.min_pieces for s in streams), args.timeout,
                   f"{args.min_pieces} pieces from every stream", streams)

        base0 = time.perf_counter()
        n0 = sum(len(s.times) for s in streams)
        log(f"baseline: {args.baseline_s:g} s and at least {args.baseline_gaps} gaps ...")
        wait_until(lambda: time.perf_counter() - base0 >= args.baseline_s
                   and sum(len(s.times) for s in streams) - n0 >= args.baseline_gaps + len(streams),
                   args.timeout, "the baseline window", streams)
        base1 = time.perf_counter()

        log(f"submitting a {args.frames}-frame {height}x{width} video ...")
        t_submit = time.perf_counter()
        video = Stream("video", engine.submit([frames], VIDEO_QUESTION, max_new_tokens=args.video_tokens,
                                              ignore_eos=True, temperature=0))
        wait_until(lambda: video.times or video.handle.done, args.timeout, "the video's first token", streams + [video])
        t_first = video.times[0] if video.times else time.perf_counter()
        completion = video.handle.result(timeout=args.timeout)
        # every stream speaks once more after the window, so the gap straddling its end is closed
        wait_until(lambda: all(s.handle.done or (s.times and s.times[-1] > t_first) for s in streams),
                   args.timeout, "a piece from every stream after the admission window", streams)
        t_end = time.perf_counter()
    finally:
        for s in streams + ([video] if video else []):
            s.handle.cancel()
        for s in streams + ([video] if video else []):
            s.thread.join(timeout=30)
        stream_done = []
        for s in streams:
            try:
                stream_done.append(s.handle.result(timeout=30))
            except Exception as e:  # noqa: BLE001 - reported below
                stream_done.append(e)
        engine.close()

    for s, c in zip(streams, stream_done):
        if isinstance(c, BaseException):
            raise RuntimeError(f"{s.name} failed: {c!r}")
    outlasted = all(c.finish_reason == "cancelled" for c in stream_done)
    baseline = [g for s in streams for g in s.gaps(base0, base1)]
    window = [g for s in streams for g in s.gaps(t_submit, t_first, overlap=True)]
    after_steady = [g for s in streams for g in s.gaps(base0, t_end)]
    t = completion.timings
    per_stream = []
    for s, c in zip(streams, stream_done):
        per_stream.append({
            "pieces": len(s.times), "tokens": len(c.token_ids), "finish_reason": c.finish_reason,
            "tokens_per_piece": len(c.token_ids) / len(s.times) if s.times else None,
            "window": stats(s.gaps(t_submit, t_first, overlap=True)),
            # piece times in ms from the video's submit, from the baseline's start on
            "timeline_ms": [round((x - t_submit) * 1e3, 3) for x in s.times if x >= base0],
        })
    pieces = sum(p["pieces"] for p in per_stream)
    tokens = sum(p["tokens"] for p in per_stream)
    base = stats(baseline)
    win = stats(window)
    return {
        "date": datetime.date.today().isoformat(), "device": device_name(device), "dtype": dtype,
        "torch": torch.__version__, "ovfast": getattr(ovfast, "__version__", None), "commit": git_commit(),
        "preset": args.preset, "vision_layers": layers, "vision_layers_cut": args.vision_layers is not None,
        "text_layers": text_layers, "text_layers_cut": args.text_layers is not None,
        "engine_options": options, "max_batch_size": args.streams + 1, "max_seq_len": max_seq_len,
        "streams": args.streams, "stream_max_new_tokens": stream_tokens,
        "frames": args.frames, "frame_size": [height, width], "video_max_new_tokens": args.video_tokens,
        "load_s": load_s, "warmup_ms": warmup_ms, "probes": probes, "stream_prompts": prompts,
        "streams_outlasted_video": outlasted,
        "baseline_window_ms": (base1 - base0) * 1e3, "baseline": base,
        "admission_window_ms": (t_first - t_submit) * 1e3, "admission": win,
        "longest_stall_ms": win["max_ms"],
        "longest_stall_over_baseline_p50": win["max_ms"] / base["p50_ms"] if win["max_ms"] and base["p50_ms"] else None,
        "longest_gap_after_steady_ms": max(after_steady) if after_steady else None,
        "video": {
            "ttft_ms": (t_first - t_submit) * 1e3, "first_piece": bool(video.times),
            "prompt_tokens": completion.prompt_tokens, "new_tokens": len(completion.token_ids),
            "finish_reason": completion.finish_reason, "timings": t.as_dict(),
            "timings_ttft_ms": t.time_to_first_token_ms,
        },
        "pieces": pieces, "tokens": tokens, "tokens_per_piece": tokens / pieces if pieces else None,
        "per_stream": per_stream,
    }


# --- reporting -------------------------------------------------------------------------------------


def _ms(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def markdown(r: dict) -> str:
    v, t = r["video"], r["video"]["timings"]
    tower = (f"{r['vision_layers']} SigLIP layers" + (" (cut with --vision-layers)" if r["vision_layers_cut"] else "")
             + f", {r['text_layers']} decoder layers" + (" (cut with --text-layers)" if r["text_layers_cut"] else ""))
    lines = [
        f"# ITL of {r['streams']} streams while a {r['frames']}-frame video is admitted: {r['preset']}, {tower}",
        "",
        f"{r['device']}, {r['dtype']}, torch {r['torch']}, ovfast {r['ovfast']} ({r['commit'] or 'no git'}), "
        f"{r['date']}. "
        f"Engine options: {json.dumps(r['engine_options']) if r['engine_options'] else 'none'}; "
        f"max_batch_size {r['max_batch_size']}, max_seq_len {r['max_seq_len']}. "
        f"Video: {r['frames']} random-noise frames of {r['frame_size'][0]}x{r['frame_size'][1]}, "
        f"{v['prompt_tokens']} prompt tokens.",
        "",
        "| stream inter-token gaps | gaps | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for label, s in (("baseline (no video)", r["baseline"]), ("overlapping the admission window", r["admission"])):
        lines.append(f"| {label} | {s['gaps']} | {_ms(s['p50_ms'])} | {_ms(s['p99_ms'])} | {_ms(s['max_ms'])} |")
    ratio = r["longest_stall_over_baseline_p50"]
    lines += [
        "",
        f"Longest stall: {_ms(r['longest_stall_ms'])} ms" + (f" ({ratio:.1f}x the baseline p50)" if ratio else "")
        + f". Admission window (video submit to its first piece): {_ms(r['admission_window_ms'])} ms.",
        f"Video: time to first token {_ms(v['ttft_ms'])} ms measured; "
        f"Timings: preprocess {_ms(t['preprocess_ms'])} ms, "
        f"vision {_ms(t['vision_ms'])} ms, prefill {_ms(t['prefill_ms'])} ms.",
        f"Pieces vs tokens (from the Completions): {r['pieces']} pieces for {r['tokens']} tokens "
        f"({r['tokens_per_piece']:.3f} tokens a piece; per stream: "
        + ", ".join("-" if p["tokens_per_piece"] is None else f"{p['tokens_per_piece']:.3f}"
                    for p in r["per_stream"]) + ").",
    ]
    worst = [i for i, p in enumerate(r["per_stream"]) if p["tokens_per_piece"] is None or p["tokens_per_piece"] > 1.05]
    if worst:
        lines.append(f"WARNING: stream(s) {', '.join(map(str, worst))} gave more than one token a piece (ids without "
                     "text, or held half characters): some of their gaps span several tokens.")
    if not r["streams_outlasted_video"]:
        lines.append("WARNING: a stream ended before the video was admitted; raise --stream-tokens.")
    return "\n".join(lines) + "\n"


def write_results(r: dict, out_dir: str, tag: str | None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", r["device"]).strip("-").lower()
    preset = re.sub(r"[^A-Za-z0-9.]+", "-", Path(r["preset"]).name).strip("-").lower()
    name = (f"{r['date']}-{slug}-itl-video-{preset}-v{r['vision_layers']}"
            + (f"-t{r['text_layers']}" if r["text_layers_cut"] else "")
            + f"-f{r['frames']}" + (f"-{tag}" if tag else ""))
    stem = out / name  # not with_suffix: "0.5b" holds a dot
    Path(f"{stem}.json").write_text(json.dumps(r, indent=2) + "\n")
    Path(f"{stem}.md").write_text(markdown(r))
    return stem


def frame_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)(?:x(\d+))?", text)
    if not m or int(m.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"want HEIGHTxWIDTH or one size, got {text!r}")
    return int(m.group(1)), int(m.group(2) or m.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a = p.add_argument
    a("--preset", default="0.5b",
      help=f"model preset ({', '.join(PRESETS)}) or a checkpoint directory (default: 0.5b)")
    a("--vision-layers", type=int, metavar="N", help="run only N SigLIP layers (a preset's own config)")
    a("--text-layers", type=int, metavar="N",
      help="run only N decoder layers (on the CPU the video's prefill costs more than its vision)")
    a("--device", help="cpu, cuda or cuda:N (default: cuda when visible, else cpu)")
    a("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on a GPU, float32 on the CPU")
    a("--engine-option", action="append", default=[], metavar="KEY=VALUE",
      help="extra ovfast.load() keyword, e.g. vision_chunk=4 (repeatable; ints, floats, true/false parsed)")
    a("--streams", type=int, default=3, help="running text streams (default: 3)")
    a("--frames", type=int, default=32, help="frames of the admitted video (default: 32)")
    a("--frame-size", type=frame_size, default=(384, 384), metavar="HxW", help="frame height x width (default: 384x384)")
    a("--seed", type=int, default=0, help="the noise video's seed (default: 0)")
    a("--video-tokens", type=int, default=8, help="max_new_tokens of the video request (default: 8)")
    a("--stream-tokens", type=int, help="max_new_tokens of each stream (default: max_seq_len - 256)")
    a("--max-seq-len", type=int, help="the engine's context (default: the video's tokens + 512 in 1024s, at least 8192)")
    a("--min-pieces", type=int, default=5, help="pieces every stream makes before the baseline starts (default: 5)")
    a("--baseline-s", type=float, default=2.0, help="baseline window, seconds at least (default: 2)")
    a("--baseline-gaps", type=int, default=20, help="baseline gaps over all streams, at least (default: 20)")
    a("--warmup-frames", type=int, default=2, help="frames of the warm-up video (0: none; default: 2)")
    a("--probe-tokens", type=int, default=16,
      help="tokens each candidate stream prompt is probed for in the warm-up (0: no warm-up at all; default: 16)")
    a("--probe-prompts", type=int, default=12, help="candidate stream prompts probed, at most (default: 12)")
    a("--timeout", type=float, default=900.0, help="bound on every wait, seconds (default: 900)")
    a("--out", default="benchmarks/results", help="directory of the JSON and Markdown results (default: %(default)s)")
    a("--tag", help="suffix of the result file names, e.g. before / after")
    args = p.parse_args(argv)
    for name in ("streams", "frames", "video_tokens", "min_pieces"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("vision_layers", "text_layers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.min_pieces < 2:
        args.min_pieces = 2
    t0 = time.perf_counter()
    result = run(args)
    result["wall_s"] = time.perf_counter() - t0
    stem = write_results(result, args.out, args.tag)
    print(markdown(result))
    log(f"wrote {stem}.json and .md ({result['wall_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
