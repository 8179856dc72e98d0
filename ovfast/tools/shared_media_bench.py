"""``ovfast bench --shared-media``: users asking several questions about the same images, with the
prefix and vision-embedding caches on and then off, in one run.

N users (``--users``) run at once, each on its own thread; user u asks about image u % M
(``--images``), first K (``--questions``) one-turn questions, one after another, then a chat of T
(``--turns``) turns, each turn resending the conversation so far (the previous answer as an
assistant message) and a new question. Every question text is different. The same workload runs
on two engines loaded one after the other: caches on (``prefix_caching=True``, the default
``encoder_cache_tokens``) and off (``prefix_caching=False``, ``encoder_cache_tokens=0``).

For each it reports the time to first token of first questions, follow-up questions, chat turn 1
and later chat turns, both as the client sees it (submission to the first streamed text piece,
queueing included) and as the engine times it (``Completion.timings.time_to_first_token_ms``:
preprocessing, vision and prefill), the prompt tokens served from the prefix cache, output
tokens/s over the run, and the caches' counters; then the off/on TTFT ratios. Greedy with eos
ignored, so both engines generate the same number of tokens: every answer must be the same
token ids with the caches on and off, or the run fails (exit 1).
"""
from __future__ import annotations

import datetime
import gc
import threading
import time

import torch

from ..runtime.config import EngineConfig
from ..terminal.arguments import positive_int
from ..terminal.progress import progress
from .bench_common import device_and_dtype, device_name, log, peak_memory, plural, prepare, run_threads, write_results
from .demo import synthetic_image

QUESTIONS = [
    "What is the main object in this picture?", "Which colours stand out?", "Is there a person here?",
    "Describe the background.", "What is on the left side?", "How many shapes can you count?",
    "Is it day or night?", "What would you title this image?", "Which part is the brightest?",
    "Does anything look out of place?", "What material are the objects made of?", "Where could this be?",
]
CHAT = [
    "Tell me briefly what this image shows.", "Can you say more about that?", "And what else do you notice?",
    "Summarise our conversation in one sentence.", "Anything you would add?",
]
GROUPS = ("first", "follow_up", "chat_first", "chat_later")
_COUNTERS = ("prefix_cache_hit_tokens", "prefix_cache_query_tokens", "encoder_cache_hits", "encoder_cache_misses",
             "preemptions", "requests_finished", "tokens_generated")


def _numbered(texts: list[str], i: int) -> str:
    """The i-th text, numbered once the list runs out, so no two are the same."""
    return texts[i % len(texts)] + (f" (#{i})" if i >= len(texts) else "")


def _image_message(image, text: str) -> dict:
    return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}


def _ask(engine, messages: list, new_tokens: int) -> dict:
    """Stream one chat request; TTFT as the client sees it and as the engine timed it."""
    t0 = time.perf_counter()
    handle = engine.submit(messages=messages, max_new_tokens=new_tokens, ignore_eos=True, temperature=0.0)
    first = None
    for _ in handle:
        if first is None:
            first = time.perf_counter()
    c = handle.result()
    t1 = time.perf_counter()
    return {"start": t0, "end": t1, "ttft_ms": ((first or t1) - t0) * 1e3,
            "engine_ttft_ms": c.timings.time_to_first_token_ms, "prompt_tokens": c.prompt_tokens,
            "cached_tokens": c.cached_tokens, "tokens": len(c.token_ids), "token_ids": list(c.token_ids),
            "text": c.text}


def workload(engine, images: list, users: int, questions: int, turns: int, new_tokens: int) -> dict:
    """Every user on its own thread; results keyed by (user, group, index)."""
    results: dict = {}
    errors: list[BaseException] = []
    bar = progress(desc="requests", total=users * (questions + turns), unit=" requests")
    lock = threading.Lock()

    def record(key, r) -> None:
        with lock:
            results[key] = r
            bar.update()

    def user(u: int) -> None:
        image = images[u % len(images)]
        try:
            for k in range(questions):
                r = _ask(engine, [_image_message(image, _numbered(QUESTIONS, u * questions + k))], new_tokens)
                record((u, "first" if k == 0 else "follow_up", k), r)
            messages: list = []
            for t in range(turns):
                text = _numbered(CHAT, t) + f" (user {u + 1})"  # chats of users sharing an image differ from turn 1
                messages.append(_image_message(image, text) if t == 0 else {"role": "user", "content": text})
                r = _ask(engine, messages, new_tokens)
                record((u, "chat_first" if t == 0 else "chat_later", t), r)
                messages.append({"role": "assistant", "content": r["text"]})
        except BaseException as e:  # reported after the run; the other users go on
            errors.append(e)

    run_threads(user, users, bar, errors, "user")
    return results


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0.0


def summarise(results: dict) -> dict:
    groups = {}
    for g in GROUPS:
        rs = [r for (_, group, _), r in results.items() if group == g]
        if not rs:
            continue
        ttft, eng, cached = [r["ttft_ms"] for r in rs], [r["engine_ttft_ms"] for r in rs], [r["cached_tokens"] for r in rs]
        groups[g] = {
            "requests": len(rs),
            "ttft_ms": {"mean": _mean(ttft), "p50": _median(ttft), "max": max(ttft)},
            "engine_ttft_ms": {"mean": _mean(eng), "p50": _median(eng), "max": max(eng)},
            "prompt_tokens_mean": _mean([r["prompt_tokens"] for r in rs]),
            "cached_tokens": {"mean": _mean(cached), "min": min(cached), "max": max(cached), "total": sum(cached)},
        }
    rs = list(results.values())
    wall = max(r["end"] for r in rs) - min(r["start"] for r in rs)
    tokens = sum(r["tokens"] for r in rs)
    return {"groups": groups, "requests": len(rs), "wall_s": wall, "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall}


def _side(args, device, dtype, images, warm_image, caching: bool) -> tuple[dict, dict]:
    on = EngineConfig()
    options = dict(prefix_caching=caching, encoder_cache_tokens=on.encoder_cache_tokens if caching else 0)
    log(f"caches {'on' if caching else 'off'}: loading ...")
    _, engine, _ = prepare(args.model, device, dtype, False, args.max_seq_len, max_batch_size=args.users,
                           tensor_parallel_size=args.tensor_parallel_size, **options)
    try:
        info = engine.info()
        log("warm-up (another image) ...")
        warm = [_image_message(warm_image, "Warm up.")]
        engine.submit(messages=warm, max_new_tokens=2, ignore_eos=True).result()
        engine.submit(messages=warm + [{"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Again."}],
                      max_new_tokens=2, ignore_eos=True).result()
        before = engine.stats()
        peak, done = [before["kv_blocks_used"]], threading.Event()

        def watch() -> None:  # the KV pages in use at their highest during the run
            while not done.wait(0.02):
                peak[0] = max(peak[0], engine.stats()["kv_blocks_used"])

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        log(f"caches {'on' if caching else 'off'}: {plural(args.users, 'user')} ...")
        try:
            results = workload(engine, images, args.users, args.questions, args.turns, args.new_tokens)
        finally:
            done.set()
            watcher.join()
        after = engine.stats()
        side = summarise(results)
        cache = {k: after[k] - before[k] for k in _COUNTERS}
        cache.update(prefix_cache_hit_rate=cache["prefix_cache_hit_tokens"] / max(cache["prefix_cache_query_tokens"], 1),
                     kv_blocks_used_peak=peak[0], kv_blocks_total=after["kv_blocks_total"],
                     kv_block_size=info["kv_block_size"])
        side.update(prefix_caching=info["prefix_caching"], encoder_cache_tokens=info["encoder_cache_tokens"],
                    cache=cache, peak_memory_gib=peak_memory(device), engine_stats=after)
        return side, results
    finally:
        engine.close()
        del engine
        gc.collect()


def run(args) -> dict:
    device, dtype = device_and_dtype(args)
    w, h = args.image_size
    images = [synthetic_image(h, w, 300 + m) for m in range(args.images)]
    warm_image = synthetic_image(h, w, 299)
    log(f"{args.model} on {device_name(device)}: {plural(args.users, 'user')} x ({plural(args.questions, 'question')} "
        f"+ a {args.turns}-turn chat) about {plural(args.images, 'image')} of {w}x{h}, "
        f"{plural(args.new_tokens, 'new token')} each")
    on, on_results = _side(args, device, dtype, images, warm_image, True)
    off, off_results = _side(args, device, dtype, images, warm_image, False)
    mismatches = [f"user {u + 1} {g} {i + 1}" for (u, g, i), r in sorted(on_results.items())
                  if r["token_ids"] != off_results[(u, g, i)]["token_ids"]]

    def ratio(group: str, key: str = "ttft_ms") -> float | None:
        a, b = off["groups"].get(group), on["groups"].get(group)
        return a[key]["mean"] / b[key]["mean"] if a and b and b[key]["mean"] > 0 else None

    return {
        "date": datetime.date.today().isoformat(), "device": device_name(device), "torch": torch.__version__,
        "model": args.model, "dtype": str(dtype).removeprefix("torch."), "users": args.users,
        "questions": args.questions, "images": args.images, "turns": args.turns, "image_size": f"{w}x{h}",
        "new_tokens": args.new_tokens, "max_batch_size": args.users,
        "ttft": "ttft_ms: client side, submit() to the first streamed text piece (queueing included); "
                "engine_ttft_ms: Completion.timings.time_to_first_token_ms (preprocess + vision + prefill)",
        "on": on, "off": off,
        "ttft_ratio_off_on": {g: ratio(g) for g in GROUPS},
        "engine_ttft_ratio_off_on": {g: ratio(g, "engine_ttft_ms") for g in GROUPS},
        "output_tokens_per_s_ratio_on_off": on["output_tokens_per_s"] / off["output_tokens_per_s"],
        "answers": len(on_results), "identical_answers": len(on_results) - len(mismatches),
        "identical": not mismatches, "mismatches": mismatches,
    }


def markdown(r: dict) -> str:
    on, off = r["on"], r["off"]
    names = {"first": "first question", "follow_up": "follow-up question", "chat_first": "chat turn 1",
             "chat_later": "chat turn 2+"}
    lines = [
        f"# Shared media: {r['model']}, {plural(r['users'], 'user')}: {r['device']}, {r['dtype']}, {r['date']}",
        "",
        f"{plural(r['users'], 'user')} at once, each {plural(r['questions'], 'question')} then a {r['turns']}-turn chat "
        f"about one of {plural(r['images'], 'image')} ({r['image_size']}); {plural(r['new_tokens'], 'new token')} per "
        f"answer (greedy, eos ignored), torch {r['torch']}. TTFT: client side, submission to the first streamed "
        f"piece (engine: preprocess + vision + prefill). Means over each group's requests.",
        "",
        "| | requests | TTFT ms on | TTFT ms off | off/on | engine TTFT ms on | off | off/on | cached tokens on | off |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g, name in names.items():
        a, b = on["groups"].get(g), off["groups"].get(g)
        if not a:
            continue
        ratio, eratio = r["ttft_ratio_off_on"][g], r["engine_ttft_ratio_off_on"][g]
        lines.append(
            f"| {name} | {a['requests']} | {a['ttft_ms']['mean']:.1f} | {b['ttft_ms']['mean']:.1f} | "
            f"{ratio:.2f}x | {a['engine_ttft_ms']['mean']:.1f} | {b['engine_ttft_ms']['mean']:.1f} | {eratio:.2f}x | "
            f"{a['cached_tokens']['mean']:.0f} of {a['prompt_tokens_mean']:.0f} | {b['cached_tokens']['mean']:.0f} |")
    lines += [
        "",
        "| | caches on | caches off |",
        "|---|---|---|",
        f"| output tokens/s | {on['output_tokens_per_s']:.2f} | {off['output_tokens_per_s']:.2f} |",
        f"| wall s | {on['wall_s']:.2f} | {off['wall_s']:.2f} |",
    ]
    for k in ("prefix_cache_hit_tokens", "prefix_cache_query_tokens", "prefix_cache_hit_rate", "encoder_cache_hits",
              "encoder_cache_misses", "preemptions", "kv_blocks_used_peak", "kv_blocks_total"):
        a, b = on["cache"][k], off["cache"][k]
        fmt = (lambda x: f"{x:.2f}") if isinstance(a, float) else str
        lines.append(f"| {k} | {fmt(a)} | {fmt(b)} |")
    lines += [
        "",
        f"Follow-up TTFT with caches off / on: {r['ttft_ratio_off_on']['follow_up']:.2f}x "
        f"(engine-timed {r['engine_ttft_ratio_off_on']['follow_up']:.2f}x). Answers identical with caches on and off: "
        f"{r['identical_answers']} of {r['answers']}.",
    ]
    return "\n".join(lines) + "\n"


def parse_size(text: str) -> tuple[int, int]:
    import argparse

    w, sep, h = text.lower().partition("x")
    try:
        size = (int(w), int(h))
    except ValueError:
        size = (0, 0)
    if not sep or min(size) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 640x480")
    return size


def add_arguments(p) -> None:
    g = p.add_argument_group("shared media (with --shared-media)")
    g.add_argument("--shared-media", action="store_true",
                   help="users asking several questions and chatting about shared images, caches on vs off")
    g.add_argument("--users", type=positive_int, default=4, help="concurrent users")
    g.add_argument("--questions", type=positive_int, default=3, help="one-turn questions per user, one after another")
    g.add_argument("--images", type=positive_int, default=2, help="distinct images; user u asks about image u %% M")
    g.add_argument("--turns", type=positive_int, default=2, help="turns of each user's chat (after the questions)")
    g.add_argument("--image-size", type=parse_size, default="640x480", metavar="WxH", help="size of every image")


def main(args) -> int:
    result = run(args)
    name = f"{args.model}-shared-media-u{args.users}-q{args.questions}-i{args.images}-t{args.turns}"
    write_results(result, args.out_dir, name, markdown(result))
    if not result["identical"]:
        log(f"answers differ with caches on and off: {', '.join(result['mismatches'])}")
        return 1
    return 0
