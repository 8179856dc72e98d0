"""The serving runtime: many callers share one engine (continuous batching, chunked prefill),
cancellation, backpressure, chat messages, the new sampling parameters, and the decode-row
bookkeeping that a GPU would otherwise be the first to see."""
from __future__ import annotations

import asyncio
import base64
import io
import threading
import time

import pytest
import reference as ref
import torch

import ovfast
from ovfast.runtime import sampling
from ovfast.runtime.request import SamplingParams

IMAGE = ref.synthetic_image(90, 120, 11)
REQUESTS = [
    (None, "A text question that is a little longer than the others, to need several chunks.", 9),
    ([IMAGE], "Describe.", 7),
    ([ref.synthetic_image(64, 80, 12), ref.synthetic_image(50, 50, 13)], "Compare.", 6),
    (ovfast.Video(ref.video_frames(2, 60, 80, 14)), "And this?", 5),
]


def _wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def solo(tiny):
    """Each request's greedy answer alone."""
    _, engine = tiny
    return [engine.complete(im, p, max_new_tokens=n).token_ids for im, p, n in REQUESTS]


@pytest.fixture(scope="module")
def small(checkpoint_dirs):
    """A short-context engine: requests can end exactly at max_seq_len."""
    with ovfast.load(checkpoint_dirs["tiny"], dtype="float32", max_seq_len=160, max_batch_size=3) as engine:
        yield engine


# --- continuous batching -------------------------------------------------------------------------


def test_chunked_prefill_gives_identical_greedy_tokens(checkpoint_dirs, solo, monkeypatch):
    with ovfast.load(checkpoint_dirs["tiny"], dtype="float32", max_seq_len=12288, prefill_chunk=7) as chunked:
        chunks = []
        real = chunked.runner._prefill_chunk
        monkeypatch.setattr(chunked.runner, "_prefill_chunk", lambda seq, budget: chunks.append(budget) or real(seq, budget))
        got = [chunked.complete(im, p, max_new_tokens=n).token_ids for im, p, n in REQUESTS]
        assert got == solo
        assert len(chunks) > 4 * len(REQUESTS) and set(chunks) == {7}  # every prompt went in several chunks
        assert chunked.complete_many([(im, p, {"max_new_tokens": n}) for im, p, n in REQUESTS]) and True


def test_chunked_prefill_attention_equals_one_pass():
    """ops.attention_chunk over (cache + chunk) equals the rows of one causal pass over the whole prompt."""
    torch.manual_seed(3)
    t, hq, hkv, d, start = 23, 6, 2, 16, 9
    q, k, v = torch.randn(t, hq, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    whole = ovfast.ops.attention_prefill(q, k, v, torch.tensor([0, t], dtype=torch.int32), t, causal=True)
    # A paged cache (pages of 8; 0 is the null block) with garbage outside the sequence: its 23
    # positions live in pages 5, 2 and 4, in that order; the table's last entry is padding.
    bs, table = 8, torch.tensor([5, 2, 4, 0], dtype=torch.int32)
    cache_k, cache_v = torch.randn(7, bs, hkv, d), torch.randn(7, bs, hkv, d)
    padded = -(-t // bs) * bs
    cache_k[table[:3].long()] = torch.cat([k, torch.randn(padded - t, hkv, d)]).view(3, bs, hkv, d)
    cache_v[table[:3].long()] = torch.cat([v, torch.randn(padded - t, hkv, d)]).view(3, bs, hkv, d)
    part = ovfast.ops.attention_chunk(q[start:], cache_k, cache_v, table, start)
    torch.testing.assert_close(part, whole[start:], rtol=1e-5, atol=1e-5)


def test_requests_joining_mid_flight_keep_their_solo_answers(tiny, solo):
    _, engine = tiny
    first = engine.submit(*REQUESTS[0][:2], max_new_tokens=REQUESTS[0][2])
    it = iter(first)
    next(it)  # the first request is decoding
    others = [engine.submit(im, p, max_new_tokens=n) for im, p, n in REQUESTS[1:]]
    assert first.result().token_ids == solo[0]
    assert [h.result().token_ids for h in others] == solo[1:]


def test_seeded_sampling_is_independent_of_the_batch(tiny):
    _, engine = tiny
    kw = dict(max_new_tokens=10, temperature=0.9, top_p=0.95, top_k=50, min_p=0.01, seed=7)
    alone = engine.complete(None, "Sample something.", **kw).token_ids
    busy = [engine.submit(im, p, max_new_tokens=n + 3) for im, p, n in REQUESTS]
    joined = engine.submit(None, "Sample something.", **kw)
    assert joined.result().token_ids == alone
    for h in busy:
        h.result()


def test_many_threads_share_one_engine(tiny, solo):
    _, engine = tiny
    results: dict[int, list[int]] = {}

    def worker(i):
        im, p, n = REQUESTS[i % len(REQUESTS)]
        results[i] = engine.complete(im, p, max_new_tokens=n).token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]  # 8 callers, 4 slots
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(8)] == [solo[i % len(REQUESTS)] for i in range(8)]
    assert engine.stats()["requests_finished"] >= 8


def test_asyncio_tasks_need_no_thread_per_request(tiny, solo):
    _, engine = tiny

    async def one(i):
        im, p, n = REQUESTS[i]
        handle = engine.submit(im, p, max_new_tokens=n)
        text = "".join([piece async for piece in handle])
        done = await handle.aresult()
        assert text == done.text
        return done.token_ids

    async def main():
        return await asyncio.gather(*(one(i) for i in range(len(REQUESTS))))

    assert asyncio.run(main()) == solo


# --- cancellation, backpressure, lifecycle --------------------------------------------------------


def test_cancel_a_running_request_frees_its_slot(tiny):
    _, engine = tiny
    handle = engine.submit(None, "Go on and on.", max_new_tokens=400, ignore_eos=True)
    it = iter(handle)
    next(it)
    handle.cancel()
    done = handle.result(timeout=30)
    assert done.finish_reason == "cancelled" and 0 < len(done.token_ids) < 400
    _wait_for(lambda: engine.stats()["running"] == 0)
    assert not engine.runner.decode.active.any()


def test_closing_a_stream_early_cancels_it(tiny):
    _, engine = tiny
    stream = engine.stream(None, "Go on and on.", max_new_tokens=400, ignore_eos=True)
    next(stream)
    stream.close()
    _wait_for(lambda: engine.stats()["running"] == 0)


def test_max_queue_refuses_at_once_and_cancelled_waiters_never_run(checkpoint_dirs):
    with ovfast.load(checkpoint_dirs["tiny"], dtype="float32", max_seq_len=1024, max_batch_size=1, max_queue=2) as e:
        running = e.submit(None, "Long.", max_new_tokens=500, ignore_eos=True)
        _wait_for(lambda: e.stats()["running"] == 1)
        waiting = [e.submit(None, f"Wait {i}.", max_new_tokens=3) for i in range(2)]
        assert e.stats()["waiting"] == 2
        t0 = time.perf_counter()
        with pytest.raises(ovfast.EngineOverloadedError, match="max_queue=2"):
            e.submit([IMAGE] * 3, "Refused before any decoding.", max_new_tokens=3)
        assert time.perf_counter() - t0 < 1.0
        waiting[0].cancel()
        assert waiting[0].result(timeout=10).finish_reason == "cancelled"
        assert waiting[0].result().token_ids == []
        running.cancel()
        assert waiting[1].result(timeout=30).finish_reason == "length"
        assert e.stats()["waiting"] == 0
        assert e.stats()["prepared"] == 0  # every pixel-holding permit came back


def test_bad_input_on_a_worker_leaks_nothing(tiny):
    _, engine = tiny
    before = engine.stats()
    handle = engine.submit(b"not an image", "What?", max_new_tokens=2)
    with pytest.raises(ovfast.ImageReadError):
        handle.result(timeout=10)
    with pytest.raises(ovfast.ImageReadError):  # stream raises at the call, not at the first next()
        engine.stream(b"not an image", "What?", max_new_tokens=2)
    after = engine.stats()
    assert after["waiting"] == before["waiting"] == 0 and after["free_slots"] == engine.max_batch_size


def test_close_cancels_and_refuses(checkpoint_dirs):
    engine = ovfast.load(checkpoint_dirs["tiny"], dtype="float32", max_seq_len=1024, max_batch_size=1)
    running = engine.submit(None, "Long.", max_new_tokens=500, ignore_eos=True)
    queued = engine.submit(None, "Queued.", max_new_tokens=5)
    _wait_for(lambda: engine.stats()["running"] == 1)
    engine.close()
    assert running.result(timeout=10).finish_reason == "cancelled"
    assert queued.result(timeout=10).finish_reason == "cancelled"
    with pytest.raises(ovfast.EngineBusyError, match="closed"):
        engine.submit(None, "After.", max_new_tokens=2)


def test_stats_report_the_runtime(tiny):
    _, engine = tiny
    engine.complete(None, "Count me.", max_new_tokens=4)
    s = engine.stats()
    for key in ("running", "waiting", "free_slots", "kv_tokens_used", "kv_tokens_total", "requests_finished",
                "tokens_generated"):
        assert isinstance(s[key], int), key
    assert s["kv_tokens_total"] == engine.info()["kv_cache_tokens"] >= engine.max_batch_size * engine.max_seq_len
    assert s["ttft_ms"]["p50"] > 0 and s["inter_token_ms"]["p99"] >= s["inter_token_ms"]["p50"] > 0


# --- decode-row bookkeeping (GPU defect 1) --------------------------------------------------------


def test_requests_ending_at_max_seq_len_beside_others(small):
    """A request whose prompt + max_new_tokens == max_seq_len ends while another row continues,
    and later calls pad buckets with its row: idle rows must stay inside the cache and RoPE table."""
    prompt = "Fill the context."
    n_prompt = len(small.requests.prepare(None, prompt, True, SamplingParams.make(max_new_tokens=1)).input_ids)
    exact = 160 - n_prompt
    alone = small.complete(None, prompt, max_new_tokens=exact, ignore_eos=True)
    assert alone.finish_reason == "length" and len(alone.token_ids) == exact
    other = small.submit(None, "Another, longer running question here.", max_new_tokens=40, ignore_eos=True)
    edge = small.submit(None, prompt, max_new_tokens=exact, ignore_eos=True)
    assert edge.result(timeout=60).token_ids == alone.token_ids
    other.result(timeout=60)
    # Retired rows park on position 0 of the null page with length 0, never past the cache.
    assert small.cache.tokens >= small.max_seq_len + 1
    assert small.model.language_model.cos_sin.shape[0] >= small.max_seq_len + 1
    assert torch.all(small.runner.decode.positions == 0) and not small.runner.decode.block_tables.any()
    three = small.complete_many([(None, "a", {"max_new_tokens": 2}), (None, "b", {"max_new_tokens": 3}),
                                 (None, prompt, {"max_new_tokens": exact, "ignore_eos": True})])
    assert three[2].token_ids == alone.token_ids


def test_idle_rows_have_length_zero_in_a_step(small):
    runner = small.runner.decode
    runner.step(3, sampling=False)  # every row idle
    assert torch.all(runner.seq_lens[:3] == 0) and torch.all(runner.positions == 0)


# --- messages --------------------------------------------------------------------------------------


def _data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_chat_single_turn_equals_complete(tiny):
    _, engine = tiny
    expected = engine.complete([IMAGE], "Describe.", max_new_tokens=6).token_ids
    parts = [{"type": "image_url", "image_url": {"url": _data_uri(IMAGE)}}, {"type": "text", "text": "Describe."}]
    assert engine.chat([{"role": "user", "content": parts}], max_new_tokens=6).token_ids == expected
    parts = [{"type": "image", "image": IMAGE}, {"type": "text", "text": "Describe."}]
    assert engine.chat([{"role": "user", "content": parts}], max_new_tokens=6).token_ids == expected


def test_chat_multi_turn_renders_the_template(tiny):
    _, engine = tiny
    frames = ref.video_frames(2, 60, 80, 15)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": [{"type": "text", "text": "And the video?"}, {"type": "video", "video": frames}]},
    ]
    req = engine.requests.prepare_messages(messages, SamplingParams.make())
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A picture."}]},
        {"role": "user", "content": [{"type": "text", "text": "And the video?"}, {"type": "video"}]},
    ]
    text = engine.requests.template.render(conversation, add_generation_prompt=True, tools=None, documents=None,
                                           **engine.tokenizer.special_tokens_map)
    assert "Be brief." in text and "A picture." in text
    expected = engine.requests.prepare(
        [IMAGE, ovfast.Video(frames)], text, False, SamplingParams.make()).input_ids
    assert req.input_ids == expected
    assert engine.chat(messages, max_new_tokens=3).finish_reason in ("stop", "length")


@pytest.mark.parametrize("bad", [[], "hello", [{"role": "robot", "content": "x"}],
                                 [{"role": "user", "content": [{"type": "audio"}]}],
                                 [{"role": "assistant", "content": [{"type": "image", "image": IMAGE}]}]])
def test_bad_messages_are_typed_errors(tiny, bad):
    _, engine = tiny
    with pytest.raises(ovfast.UnsupportedInputError):
        engine.chat(bad, max_new_tokens=2)


# --- sampling parameters ----------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(min_p=1.5), dict(repetition_penalty=0), dict(presence_penalty=3),
                                dict(frequency_penalty=float("nan")), dict(logprobs=21), dict(top_q=0.5)])
def test_bad_sampling_params_raise_at_submit(tiny, kw):
    _, engine = tiny
    with pytest.raises(ovfast.GenerationParamsError):
        engine.submit(None, "x", **kw)
    assert engine.stats()["waiting"] == 0


def test_min_p_one_is_greedy_and_penalties_change_greedy(tiny):
    _, engine = tiny
    greedy = engine.complete(None, "Anything at all.", max_new_tokens=12).token_ids
    assert engine.complete(None, "Anything at all.", max_new_tokens=12, temperature=3.0, min_p=1.0,
                           seed=1).token_ids == greedy
    neutral = engine.complete(None, "Anything at all.", max_new_tokens=12, repetition_penalty=1.0,
                              frequency_penalty=0.0, logprobs=3).token_ids
    assert neutral == greedy  # the general step with neutral parameters is the greedy step
    penalised = engine.complete(None, "Anything at all.", max_new_tokens=12, frequency_penalty=2.0,
                                presence_penalty=2.0).token_ids
    assert len(set(penalised)) > len(set(greedy))  # repeats were penalised away


def test_penalties_match_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(5)
    logits = torch.randn(3, 40)
    prompt = [torch.tensor([1, 5, 5, 9]), torch.tensor([0]), torch.tensor([7, 8])]
    output = [[3, 3, 5], [], [8, 2, 2, 2]]
    seen = torch.zeros(3, 40, dtype=torch.bool)
    counts = torch.zeros(3, 40, dtype=torch.int32)
    for r in range(3):
        seen[r, prompt[r]] = True
        for t in output[r]:
            seen[r, t] = True
            counts[r, t] += 1
    rep = torch.tensor([1.3, 1.0, 0.7])
    pres, freq = torch.tensor([0.0, 0.5, -0.4]), torch.tensor([0.2, 0.0, 1.1])
    ours = sampling.apply_penalties(logits, counts, seen, rep, pres, freq)
    for r in range(3):
        ids = torch.cat([prompt[r], torch.tensor(output[r], dtype=torch.long)])[None]
        expected = RepetitionPenaltyLogitsProcessor(float(rep[r]))(ids, logits[r : r + 1].clone())[0]
        c = counts[r].float()
        expected = expected - freq[r] * c - pres[r] * (c > 0).float()
        torch.testing.assert_close(ours[r], expected, rtol=1e-6, atol=1e-6)
    neutral = sampling.apply_penalties(logits, counts, seen, torch.ones(3), torch.zeros(3), torch.zeros(3))
    assert torch.equal(neutral, logits)


def _reference_choice(logits, temperature, top_p, top_k, min_p, noise):
    """Full sort: top-k, then top-p over the renormalised top k, then min-p, then the race (noise by token id)."""
    out = []
    for r in range(logits.shape[0]):
        if temperature[r] == 0:
            out.append(int(logits[r].argmax()))
            continue
        x = logits[r] / temperature[r]
        order = x.argsort(descending=True)
        p_full = x.softmax(-1)[order]
        k = int(top_k[r]) or x.shape[0]
        keep = torch.zeros_like(p_full, dtype=torch.bool)
        keep[:k] = True
        pk = torch.where(keep, p_full, 0.0)
        pk = pk / pk.sum()
        before = pk.cumsum(-1) - pk
        keep &= (before < top_p[r]) | (torch.arange(len(pk)) == 0)
        keep &= p_full >= min_p[r] * p_full[0]
        race = torch.where(keep, p_full / noise[r][order], -1.0)
        out.append(int(order[race.argmax()]))
    return torch.tensor(out)


def test_candidate_prefilter_equals_a_full_sort():
    torch.manual_seed(9)
    rows, vocab = 64, 50
    logits = torch.randn(rows, vocab) * 3
    temperature = torch.rand(rows) + 0.3
    temperature[:4] = 0
    top_k = torch.randint(0, 8, (rows,))  # within the candidates, or off
    top_p = torch.where(torch.rand(rows) < 0.5, torch.rand(rows) * 0.5 + 0.1, torch.ones(rows))
    top_k[top_p == 1] = torch.randint(1, 8, (int((top_p == 1).sum()),))  # keep every nucleus inside 8 candidates
    top_p[top_k == 0] = 0.2
    min_p = torch.where(torch.rand(rows) < 0.3, torch.full((rows,), 0.05), torch.zeros(rows))
    noise = sampling.keyed_noise(torch.arange(rows), torch.full((rows,), 3), vocab)
    expected = _reference_choice(logits, temperature, top_p, top_k, min_p, noise)
    # Rows with a nucleus wider than 8 candidates go to the full race; keep those out of this check.
    probs = (logits / temperature.clamp_min(1e-6)[:, None]).softmax(-1).sort(-1, descending=True).values
    inside = (top_k > 0) | (probs[:, :8].sum(-1) >= top_p)
    got = sampling.choose(logits, temperature, top_p, top_k, min_p, noise, candidates=8)
    assert inside.sum() > rows // 2
    assert torch.equal(got[inside], expected[inside])
    assert torch.equal(sampling.choose(logits, temperature, top_p, top_k, min_p, noise), expected)  # C >= V: exact


def test_keyed_noise_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].expand(20000, 4)
    n = logits.shape[0]
    noise = sampling.keyed_noise(torch.arange(n), torch.zeros(n, dtype=torch.long), 4)
    picks = sampling.choose(logits, torch.ones(n), torch.ones(n), torch.zeros(n, dtype=torch.long), torch.zeros(n),
                            noise)
    freq = torch.bincount(picks, minlength=4).float() / n
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    again = sampling.keyed_noise(torch.arange(n), torch.zeros(n, dtype=torch.long), 4)
    assert torch.equal(noise, again)  # a pure function of (seed, position, token)


def test_logprobs_are_the_models(tiny):
    _, engine = tiny
    c = engine.complete(None, "Score me.", max_new_tokens=5, logprobs=4)
    assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
    first = torch.log_softmax(engine.logits(None, "Score me.")[-1], -1)
    torch.testing.assert_close(torch.tensor(c.logprobs[0].logprob), first[c.token_ids[0]], rtol=1e-5, atol=1e-5)
    for lp, token in zip(c.logprobs, c.token_ids):
        assert lp.token_id == token and len(lp.top) == 4
        assert lp.top[0][0] == token and lp.top[0][2] == pytest.approx(lp.logprob, abs=1e-6)  # greedy: the best
        assert [t[2] for t in lp.top] == sorted((t[2] for t in lp.top), reverse=True)
    assert engine.complete(None, "Score me.", max_new_tokens=5).logprobs is None


def test_m_bucket_keys_the_vision_autotuning():
    from ovfast.kernels._runtime import m_bucket

    assert [m_bucket(m) for m in (1, 64, 65, 729, 1458, 11664)] == [64, 64, 128, 1024, 2048, 16384]


def test_max_new_tokens_none_fills_the_context(small):
    prompt = "Fill the context."
    n_prompt = len(small.requests.prepare(None, prompt, True, SamplingParams.make(max_new_tokens=1)).input_ids)
    c = small.complete(None, prompt, max_new_tokens=None, ignore_eos=True)
    assert c.finish_reason == "length" and c.prompt_tokens + len(c.token_ids) == small.max_seq_len == 160
    assert len(c.token_ids) == 160 - n_prompt


def test_aprepared_raises_input_errors_before_any_token(tiny):
    _, engine = tiny

    async def main():
        bad = engine.submit(b"not an image", "Describe.", max_new_tokens=2)
        with pytest.raises(ovfast.ImageReadError):
            await bad.aprepared()
        good = engine.submit(None, "Hello", max_new_tokens=2)
        await good.aprepared()
        return await good.aresult()

    assert len(asyncio.run(main()).token_ids) == 2
    assert engine.stats()["running"] == 0
