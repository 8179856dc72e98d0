"""The paged KV cache, prefix caching and the vision-embedding cache on a real (tiny) engine.

Every answer is compared with an engine that has both caches off (or with the same request
alone), so reuse, eviction and preemption are checked for exactness, not just for happening.
"""
from __future__ import annotations

import pytest
import reference as ref
import torch

import ovfast
from ovfast.models.qwen2 import flat_slots

IMAGE = ref.synthetic_image(90, 120, 31)
OTHER = ref.synthetic_image(90, 120, 32)  # the same size: the same placeholder ids, other pixels


def _load(path, **kw):
    return ovfast.load(path, dtype="float32", max_seq_len=4096, **kw)


@pytest.fixture(scope="module")
def plain(checkpoint_dirs):
    """Both caches off: the reference answers."""
    with _load(checkpoint_dirs["tiny"], prefix_caching=False, encoder_cache_tokens=0) as engine:
        yield engine


@pytest.fixture
def cached(checkpoint_dirs):
    with _load(checkpoint_dirs["tiny"]) as engine:
        yield engine


def test_flat_slots_follow_non_contiguous_tables():
    tables = torch.tensor([[7, 3, 9, 0], [2, 8, 0, 0]], dtype=torch.int32)
    positions = torch.tensor([9, 4])
    assert flat_slots(tables, positions, 4).tolist() == [9 * 4 + 1, 8 * 4 + 0]


def test_idle_decode_rows_write_to_the_null_page_whatever_their_table_holds():
    """A row still prefilling has its (possibly shared) pages in its table but length 0: the
    decode step must not write its idle token over page 0 of its table."""
    from ovfast.models.qwen2 import ForwardBatch

    tables = torch.tensor([[5, 6], [7, 0]], dtype=torch.int32)
    batch = ForwardBatch.decode(torch.tensor([17, 0]), tables, 16, torch.tensor([18, 0], dtype=torch.int32))
    assert batch.slot_mapping.tolist() == [6 * 16 + 1, 0]


def test_a_follow_up_on_the_same_image_is_exact_and_served_from_the_cache(cached, plain):
    want = plain.complete(IMAGE, "Describe it.", max_new_tokens=8)
    first = cached.complete(IMAGE, "Describe it.", max_new_tokens=8)
    follow = cached.complete(IMAGE, "Describe it.", max_new_tokens=8)
    again = cached.complete(IMAGE, "What colour is it?", max_new_tokens=8)
    assert first.token_ids == follow.token_ids == want.token_ids
    assert again.token_ids == plain.complete(IMAGE, "What colour is it?", max_new_tokens=8).token_ids
    bs = cached.cache.block_size
    assert first.cached_tokens == 0
    assert follow.cached_tokens == (follow.prompt_tokens - 1) // bs * bs  # all but the last position's page
    assert again.cached_tokens >= 1000  # the image rows (the question differs after them)
    s = cached.stats()
    assert s["prefix_cache_hit_tokens"] == follow.cached_tokens + again.cached_tokens
    assert s["encoder_cache_misses"] == 1  # SigLIP ran once; the follow-ups needed no vision at all


def test_a_different_image_of_the_same_size_reuses_nothing_of_the_image(cached, plain):
    a = cached.complete(IMAGE, "Describe it.", max_new_tokens=6)
    b = cached.complete(OTHER, "Describe it.", max_new_tokens=6)
    assert b.token_ids == plain.complete(OTHER, "Describe it.", max_new_tokens=6).token_ids
    image_start = cached.requests.prepare(OTHER, "Describe it.", True, ovfast.runtime.request.SamplingParams.make()).spans[0][0]
    assert b.cached_tokens <= image_start  # only text pages before the image can match
    assert cached.stats()["encoder_cache_misses"] == 2
    assert a.token_ids != [] and b.prompt_tokens == a.prompt_tokens


def test_the_vision_cache_serves_the_same_image_at_another_position(cached, plain):
    cached.complete(IMAGE, "Describe it.", max_new_tokens=4)
    messages = [{"role": "system", "content": "You are terse and precise, and you answer in one line."},
                {"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What?"}]}]
    c = cached.chat(messages, max_new_tokens=6)
    assert c.token_ids == plain.chat(messages, max_new_tokens=6).token_ids
    s = cached.stats()
    assert s["encoder_cache_hits"] == 1 and s["encoder_cache_misses"] == 1


def test_a_multi_turn_chat_reuses_turn_one(cached, plain):
    turn1 = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "Describe it."}]}]
    one = cached.chat(turn1, max_new_tokens=8)
    turn2 = turn1 + [{"role": "assistant", "content": one.text}, {"role": "user", "content": "And the colour?"}]
    two = cached.chat(turn2, max_new_tokens=8)
    assert two.token_ids == plain.chat(turn2, max_new_tokens=8).token_ids
    assert two.cached_tokens >= one.prompt_tokens // cached.cache.block_size * cached.cache.block_size - \
        cached.cache.block_size


def test_a_small_budget_runs_many_short_requests_at_once(checkpoint_dirs, plain):
    prompts = [f"Question number {i} about the sky?" for i in range(8)]
    want = [plain.complete(None, p, max_new_tokens=12).token_ids for p in prompts]
    # 640 positions for 8 rows of up to 4096: far below max_batch_size x max_seq_len
    with _load(checkpoint_dirs["tiny"], max_batch_size=8, kv_cache_tokens=640) as engine:
        assert engine.info()["kv_cache_tokens"] == 640 and engine.context_limit == 639
        handles = [engine.submit(None, p, max_new_tokens=12) for p in prompts]
        peak = 0
        while not all(h.done for h in handles):
            peak = max(peak, engine.stats()["running"])
        assert [h.result().token_ids for h in handles] == want
        assert peak > 1
        with pytest.raises(ovfast.ContextLengthError):  # longer than the whole budget: refused up front
            engine.complete(None, "Too long.", max_new_tokens=700)


def test_a_budget_that_forces_preemption_gives_every_request_its_answer(checkpoint_dirs, plain):
    prompts = [f"Tell a long story number {i}." for i in range(4)]
    want = [plain.complete(None, p, max_new_tokens=60, ignore_eos=True).token_ids for p in prompts]
    with _load(checkpoint_dirs["tiny"], max_batch_size=4, kv_cache_tokens=192, kv_block_size=16) as engine:
        got = engine.complete_many([(None, p, {"max_new_tokens": 60, "ignore_eos": True}) for p in prompts])
        assert [c.token_ids for c in got] == want
        s = engine.stats()
        assert s["preemptions"] > 0 and s["kv_blocks_used"] == 0


def test_eviction_under_pressure_stays_exact(checkpoint_dirs, plain):
    with _load(checkpoint_dirs["tiny"], max_batch_size=2, kv_cache_tokens=256, kv_block_size=16) as engine:
        first = engine.complete(None, "The first question, long enough to fill pages of the cache.", max_new_tokens=4)
        for i in range(12):  # other prompts push the first one's pages out
            engine.complete(None, f"Filler prompt {i} with some words to take several pages here.", max_new_tokens=4)
        again = engine.complete(None, "The first question, long enough to fill pages of the cache.", max_new_tokens=4)
        assert again.token_ids == first.token_ids == plain.complete(
            None, "The first question, long enough to fill pages of the cache.", max_new_tokens=4).token_ids
        assert again.cached_tokens == 0  # evicted
        assert engine.stats()["kv_blocks_used"] == 0


def test_decode_rows_point_at_the_null_page_when_idle(cached):
    cached.complete_many([(None, "a", {"max_new_tokens": 3}), (None, "b", {"max_new_tokens": 20})])
    d = cached.runner.decode
    assert not d.block_tables.any() and not d.positions.any() and not d.active.any()


def test_options_are_checked(checkpoint_dirs):
    for bad in ({"kv_block_size": 24}, {"kv_cache_tokens": 0}, {"gpu_memory_utilization": 1.5},
                {"encoder_cache_tokens": -1}, {"prefix_caching": "yes"}):
        with pytest.raises(ovfast.ConfigError):
            _load(checkpoint_dirs["tiny"], **bad)


def test_reset_caches_makes_the_next_request_cold(cached):
    a = cached.complete(IMAGE, "Describe it.", max_new_tokens=4)
    cached.reset_caches()
    b = cached.complete(IMAGE, "Describe it.", max_new_tokens=4)
    assert b.token_ids == a.token_ids and b.cached_tokens == 0
    assert cached.stats()["encoder_cache_misses"] == 2
