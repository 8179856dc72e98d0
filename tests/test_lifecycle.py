"""Lifecycle regressions on a real (tiny, random-weight) engine: each failed before the runtime
core was split into scheduler -> model runner (issue 21).

close() with a full queue, scoring and encode_media while every slot decodes, vision in pieces
between decode steps (and the same answer as vision in one go), a defect failing only the
request it touched, the "ovfast" logger and info()["defects"].
"""
from __future__ import annotations

import logging
import threading
import time

import pytest
import reference as ref

import ovfast

VIDEO = ovfast.Video(ref.video_frames(6, 60, 80, 21))


def _engine(path, **kw):
    return ovfast.load(path, dtype="float32", max_seq_len=32768, **kw)


def _decoding(handle):
    """Iterate ``handle`` until its first piece: it is decoding."""
    it = iter(handle)
    next(it)
    return it


def test_close_returns_promptly_with_many_requests_queued(checkpoint_dirs):
    """Default worker and pixel-budget settings, one slot busy, 16 queued: close() used to hang
    (workers blocked on the pixel budget while close waited for them before releasing it)."""
    engine = _engine(checkpoint_dirs["tiny"], max_batch_size=1)
    running = engine.submit(None, "Long.", max_new_tokens=30000, ignore_eos=True)
    _decoding(running)
    queued = [engine.submit(None, f"Queued {i}.", max_new_tokens=4) for i in range(16)]
    done = threading.Event()
    threading.Thread(target=lambda: (engine.close(), done.set()), daemon=True).start()
    assert done.wait(20), "close() did not return"
    for h in [running, *queued]:
        assert h.result(timeout=5).finish_reason == "cancelled"
    with pytest.raises(ovfast.EngineBusyError):
        engine.submit(None, "After close.")


def test_scoring_and_encode_media_never_wait_for_a_slot(checkpoint_dirs):
    engine = _engine(checkpoint_dirs["tiny"], max_batch_size=1)
    try:
        running = engine.submit(None, "Busy.", max_new_tokens=30000, ignore_eos=True)
        _decoding(running)
        feats = engine.encode_media([ref.synthetic_image(64, 80, 3)])
        logits = engine.logits(None, "Score me.")
        ll, _ = engine.loglikelihood(None, "Score me.", " yes")
        assert not running.done  # all of it ran beside the stream, which never gave up its slot
        assert feats[0].shape[0] > 0 and logits.shape[0] > 0 and ll < 0
        running.cancel()
        assert running.result(timeout=10).finish_reason == "cancelled"
        alone = _engine(checkpoint_dirs["tiny"], max_batch_size=1)
        try:  # the same numbers as on an idle engine
            assert (alone.logits(None, "Score me.") - logits).abs().max() < 1e-5
        finally:
            alone.close()
    finally:
        engine.close()


def test_vision_runs_in_pieces_between_decode_steps(checkpoint_dirs):
    """vision_chunk=1: a 6-frame video is 6 pieces, and the running stream steps between them."""
    engine = _engine(checkpoint_dirs["tiny"], max_batch_size=2, vision_chunk=1)
    events = []
    model, decode = engine.runner.model, engine.runner.decode
    real_encode, real_step = model.encode_tiles, decode.step
    model.encode_tiles = lambda *a, **k: events.append("vision") or real_encode(*a, **k)
    decode.step = lambda *a, **k: events.append("step") or real_step(*a, **k)
    try:
        stream = engine.submit(None, "Keep talking.", max_new_tokens=30000, ignore_eos=True)
        _decoding(stream)
        answer = engine.complete(VIDEO, "What happens?", max_new_tokens=3)
        stream.cancel()
        first, last = events.index("vision"), len(events) - 1 - events[::-1].index("vision")
        pieces = events[first : last + 1]
        assert pieces.count("vision") == 6
        assert "vision,vision" not in ",".join(pieces)  # a decode step between every two pieces
        assert answer.timings.vision_ms > 0 and answer.timings.prefill_ms > 0
    finally:
        model.encode_tiles, decode.step = real_encode, real_step
        engine.close()
    whole = _engine(checkpoint_dirs["tiny"], max_batch_size=2)  # vision_chunk 16: one piece
    try:
        assert whole.complete(VIDEO, "What happens?", max_new_tokens=3).token_ids == answer.token_ids
    finally:
        whole.close()


def test_a_defect_fails_only_the_request_it_touched(checkpoint_dirs, caplog):
    engine = _engine(checkpoint_dirs["tiny"], max_batch_size=2)
    model = engine.runner.model
    real = model.encode_tiles

    def broken(*a, **k):
        raise RuntimeError("simulated vision fault")

    try:
        stream = engine.submit(None, "Keep talking.", max_new_tokens=40, ignore_eos=True)
        _decoding(stream)
        model.encode_tiles = broken
        with caplog.at_level(logging.ERROR, logger="ovfast"):
            with pytest.raises(RuntimeError, match="simulated vision fault"):
                engine.complete(VIDEO, "What happens?", max_new_tokens=3)
        model.encode_tiles = real
        assert stream.result(timeout=60).finish_reason == "length"  # untouched by the other's failure
        assert any(r.name == "ovfast" and r.exc_info for r in caplog.records)
        (defect,) = engine.info()["defects"]
        assert "simulated vision fault" in defect["error"] and len(defect["requests"]) == 1
        assert engine.complete(VIDEO, "What happens?", max_new_tokens=3).finish_reason in ("length", "stop")
        assert engine.stats()["free_slots"] == 2
    finally:
        model.encode_tiles = real
        engine.close()


def test_lifecycle_events_are_logged(checkpoint_dirs, caplog):
    engine = _engine(checkpoint_dirs["tiny"], max_batch_size=1)
    try:
        with caplog.at_level(logging.DEBUG, logger="ovfast"):
            engine.complete(None, "Hello.", max_new_tokens=2)
        messages = [r.getMessage() for r in caplog.records if r.name == "ovfast"]
        assert any("accepted" in m for m in messages) and any("admitted" in m for m in messages)
        assert any("finished" in m for m in messages)
    finally:
        engine.close()


def test_stats_under_concurrent_load_stay_consistent(tiny):
    _, engine = tiny
    handles = [engine.submit(None, f"Question {i}?", max_new_tokens=6) for i in range(6)]
    deadline = time.monotonic() + 60
    while not all(h.done for h in handles) and time.monotonic() < deadline:
        st = engine.stats()
        assert st["running"] + st["free_slots"] == engine.max_batch_size
        assert st["kv_tokens_used"] <= st["kv_tokens_total"]
    assert all(h.result(timeout=30).finish_reason in ("length", "stop") for h in handles)
