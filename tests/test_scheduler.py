"""The scheduler's policy and lifecycle, driven with a fake model runner (no model, no device).

The fake records every call the scheduler makes, in order, so these tests can say what the loop
does in a turn: who is admitted, who advances, when decode steps run between vision pieces, and
what happens to each request's status when something fails or the engine closes.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from ovfast.errors import EngineBusyError, PromptError
from ovfast.runtime import scheduler as sched
from ovfast.runtime.block_pool import BlockPool
from ovfast.runtime.generation import Sequence, Status, Timings
from ovfast.runtime.handle import RequestHandle
from ovfast.runtime.request import PreparedRequest, SamplingParams

EOS = frozenset({0})


class FakeText:
    """The TextAssembler's surface: each token becomes one character."""

    def __init__(self):
        self.text, self.stopped, self._sent = "", False, 0

    def push(self, token: int) -> None:
        self.text += chr(ord("a") + token % 26)

    def close(self) -> None:
        pass

    def pending(self) -> str:
        out, self._sent = self.text[self._sent :], len(self.text)
        return out


@dataclass
class FakePending:
    stepped: dict
    constrained: bool = False


@dataclass
class FakeRunner:
    """Each request needs ``pieces`` advance() calls (vision pieces + prefill chunks) before its
    first token; token k of a request is k + 1 (never eos)."""

    pieces: dict = field(default_factory=dict)  # prompt length -> pieces it takes
    calls: list = field(default_factory=list)
    fail_advance: set = field(default_factory=set)  # prompt lengths whose advance raises
    fail_launch_at: int | None = None  # the n-th launch raises
    block: threading.Event | None = None  # advance() waits on it (a long device call)
    launches: int = 0
    constrained: bool = False  # every step has a constrained row (structured outputs)

    def begin(self, seq):
        self.calls.append(("begin", seq.handle.id))
        seq.text = FakeText()
        seq.done = 0

    def advance(self, seq, budget):
        self.calls.append(("advance", seq.handle.id))
        if self.block is not None:
            self.block.wait(10)
        n = len(seq.request.input_ids)
        if n in self.fail_advance:
            raise RuntimeError("simulated vision failure")
        seq.done += 1
        if seq.done < self.pieces.get(n, 1):
            return False
        seq.prefilled = seq.length = len(seq.context_ids())
        if seq.resuming:
            return True
        seq.last_token = seq.decode_start = time.perf_counter()
        seq.add_token(1, EOS)
        return True

    def start_decoding(self, seq):
        self.calls.append(("start_decoding", seq.handle.id))

    def retire(self, slot):
        self.calls.append(("retire", slot))

    def set_blocks(self, seq, first):
        self.calls.append(("set_blocks", seq.handle.id, len(seq.blocks)))

    def launch(self, active):
        self.launches += 1
        if self.fail_launch_at == self.launches:
            raise RuntimeError("simulated step failure")
        self.calls.append(("launch", tuple(sorted(s.handle.id for s in active.values()))))
        return FakePending(dict(active), self.constrained)

    def collect(self, pending):
        self.calls.append(("collect", self.launches))
        out = []
        for seq in pending.stepped.values():
            if seq.status is not Status.DECODING or seq.done_generating:
                continue
            seq.length += 1
            seq.previous_token, seq.last_token = seq.last_token, time.perf_counter()
            seq.add_token(len(seq.tokens) + 1, EOS)
            out.append(seq)
        return out

    def fatal(self):
        return None


def prepared(n: int, max_new_tokens: int = 3) -> PreparedRequest:
    return PreparedRequest([], list(range(1, n + 1)), SamplingParams.make(max_new_tokens=max_new_tokens), 0.0)


def make(runner, slots=2, max_queue=64, max_prepared=4, workers=1, blocks=1000, block_size=4) -> sched.Scheduler:
    return sched.Scheduler(runner, slots=slots, pool=BlockPool(blocks, block_size), prefix_caching=True,
                           max_queue=max_queue, prefill_chunk=8, preprocess_workers=workers, max_prepared=max_prepared)


def seq(submitted: float, status: Status) -> Sequence:
    s = Sequence(RequestHandle(f"r{submitted}", lambda h: None), status=status)
    s.handle.submitted = submitted
    return s


# --- policy functions ------------------------------------------------------------------------------


def test_policy_functions():
    a, b, c = seq(1.0, Status.DECODING), seq(2.0, Status.PREFILLING), seq(0.5, Status.PREFILLING)
    running = {0: a, 2: b, 3: c}
    assert sched.free_slots(running, 5) == [1, 4]
    assert sched.next_to_prefill(running) is c  # the oldest, not the lowest slot
    assert sched.decoding(running) == {0: a}
    a.finish_reason = "stop"
    assert sched.decoding(running) == {}  # finished at the last step: not stepped again
    ready = [seq(3.0, Status.READY), seq(4.0, Status.READY), seq(5.0, Status.READY)]
    assert sched.admissions(ready, [1, 4]) == [(ready[0], 1), (ready[1], 4)]
    assert sched.next_to_prefill({}) is None


# --- the loop with a fake runner -----------------------------------------------------------------------


def test_requests_go_through_every_status_in_order():
    runner = FakeRunner(pieces={5: 3})
    s = make(runner)
    h = s.submit(lambda: prepared(5))
    c = h.result(timeout=10)
    assert c.token_ids == [1, 2, 3] and c.finish_reason == "length"
    ids = [x for x in runner.calls if x[0] != "set_blocks" and (x[1] == h.id or x[0] == "retire")]
    assert ids == [("begin", h.id), ("advance", h.id), ("advance", h.id), ("advance", h.id),
                   ("start_decoding", h.id), ("retire", 0)]
    st = s.stats()
    assert st["running"] == st["waiting"] == st["prepared"] == 0 and st["free_slots"] == 2
    assert st["requests_finished"] == 1 and st["tokens_generated"] == 3
    s.close()


@pytest.mark.parametrize("constrained", [False, True])
def test_a_constrained_step_is_read_before_the_next_launch(constrained):
    """Steps are queued one ahead, except a step with a constrained row: its tokens set the next
    masks, so it is collected before the next launch."""
    runner = FakeRunner(constrained=constrained)
    s = make(runner)
    assert s.submit(lambda: prepared(3, max_new_tokens=6)).result(timeout=10).token_ids == [1, 2, 3, 4, 5, 6]
    steps = [c for c in runner.calls if c[0] in ("launch", "collect")]
    # ("collect", n): the n-th launch was the latest when it ran
    collected_late = [c for i, c in enumerate(steps) if c[0] == "collect" and steps[i - 1][0] == "launch"
                      and i >= 2 and steps[i - 2][0] == "launch"]
    if constrained:
        assert all(a[0] != b[0] for a, b in zip(steps, steps[1:])), steps  # launch, collect, launch, ...
    else:
        assert collected_late, steps  # launch, launch, collect: the overlap
    s.close()


def test_decode_steps_run_between_the_pieces_of_a_long_prefill():
    """A request whose vision takes 6 pieces: the stream already decoding gets a step after each."""
    runner = FakeRunner(pieces={7: 6})
    s = make(runner)
    streaming = s.submit(lambda: prepared(2, max_new_tokens=100000))
    it = iter(streaming)
    next(it)  # decoding now
    video = s.submit(lambda: prepared(7))
    video.result(timeout=10)
    turns = [c for c in runner.calls if c[0] in ("advance", "launch")]
    first = turns.index(("advance", video.id))
    pieces = [i for i, c in enumerate(turns) if c == ("advance", video.id)]
    assert len(pieces) == 6
    for a, b in zip(pieces, pieces[1:]):  # a decode step of the running stream between every two pieces
        assert any(c[0] == "launch" and streaming.id in c[1] for c in turns[a + 1 : b]), turns[first:]
    streaming.cancel()
    assert streaming.result(timeout=10).finish_reason == "cancelled"
    s.close()


def test_a_failing_piece_fails_only_its_request(caplog):
    runner = FakeRunner(fail_advance={9})
    s = make(runner)
    ok = s.submit(lambda: prepared(3, max_new_tokens=20))
    it = iter(ok)
    next(it)
    with caplog.at_level("ERROR", logger="ovfast"):
        bad = s.submit(lambda: prepared(9))
        with pytest.raises(RuntimeError, match="simulated vision failure"):
            bad.result(timeout=10)
    assert ok.result(timeout=10).finish_reason == "length"  # the other request never noticed
    assert any("prefill piece" in r.getMessage() for r in caplog.records)
    (defect,) = s.defects()
    assert defect["requests"] == [bad.id] and "simulated vision failure" in defect["error"]
    assert s.stats()["free_slots"] == 2
    s.close()


def test_a_failing_step_fails_the_decoding_requests_but_not_the_waiting_ones():
    runner = FakeRunner(fail_launch_at=2, block=None)
    s = make(runner, slots=1)
    first = s.submit(lambda: prepared(3, max_new_tokens=10))
    second = s.submit(lambda: prepared(4, max_new_tokens=2))  # waits for the slot
    with pytest.raises(RuntimeError, match="simulated step failure"):
        first.result(timeout=10)
    assert second.result(timeout=10).token_ids == [1, 2]
    assert ("retire", 0) in runner.calls
    s.close()


def test_input_errors_on_a_worker_end_the_request_and_free_the_pixel_budget():
    s = make(FakeRunner(), max_prepared=1)

    def bad():
        raise PromptError("the prompt is empty")

    handles = [s.submit(bad) for _ in range(3)]
    for h in handles:
        with pytest.raises(PromptError):
            h.result(timeout=10)
    assert s.submit(lambda: prepared(2)).result(timeout=10).finish_reason == "length"
    assert s.stats()["prepared"] == 0 and s.stats()["waiting"] == 0
    s.close()


def test_close_returns_promptly_with_a_full_queue_and_ends_every_handle():
    """Workers wait for the pixel budget while the only slot is busy; close() must still return."""
    block = threading.Event()
    runner = FakeRunner(block=block)
    s = make(runner, slots=1, max_prepared=1, workers=2)
    handles = [s.submit(lambda: prepared(3, max_new_tokens=5)) for _ in range(16)]
    time.sleep(0.2)
    t0 = time.perf_counter()
    closer = threading.Thread(target=s.close, kwargs={"timeout": 10})
    closer.start()
    time.sleep(0.1)
    block.set()  # the running request's device call returns
    closer.join(15)
    assert not closer.is_alive() and time.perf_counter() - t0 < 10
    done = [h.result(timeout=5) for h in handles]
    assert all(c.finish_reason in ("cancelled", "length") for c in done)
    assert sum(c.finish_reason == "cancelled" for c in done) >= 15
    with pytest.raises(EngineBusyError):
        s.submit(lambda: prepared(2))
    with pytest.raises(EngineBusyError):
        s.run_job(lambda: 1)


def test_jobs_run_while_every_slot_is_decoding():
    s = make(FakeRunner(), slots=1)
    running = s.submit(lambda: prepared(3, max_new_tokens=100000))
    it = iter(running)
    next(it)
    assert s.run_job(lambda: "ran") == "ran"  # no slot needed: it does not wait for the stream
    assert not running.done
    with pytest.raises(ZeroDivisionError):
        s.run_job(lambda: 1 / 0)
    assert s.defects()[-1]["where"] == "a device job"
    running.cancel()
    assert running.result(timeout=10).finish_reason == "cancelled"
    s.close()


def test_cancel_while_ready_never_takes_a_slot():
    block = threading.Event()
    runner = FakeRunner(block=block)
    s = make(runner, slots=1)
    first = s.submit(lambda: prepared(3, max_new_tokens=2))
    queued = s.submit(lambda: prepared(4, max_new_tokens=2))
    queued.wait_prepared(10)
    queued.cancel()
    block.set()
    c = queued.result(timeout=10)
    assert c.finish_reason == "cancelled" and c.token_ids == [] and c.prompt_tokens == 4
    first.result(timeout=10)
    assert ("begin", queued.id) not in runner.calls
    s.close()


def test_stats_are_consistent_while_requests_run():
    s = make(FakeRunner(pieces={3: 4}), slots=2)
    handles = [s.submit(lambda: prepared(3, max_new_tokens=30)) for _ in range(8)]
    seen = []
    while not all(h.done for h in handles):
        st = s.stats()
        seen.append(st)
        assert st["running"] + st["free_slots"] == 2 and st["running"] >= 0
        assert 0 <= st["prepared"] <= 4
    assert all(h.result().finish_reason == "length" for h in handles)
    assert s.stats()["requests_finished"] == 8
    s.close()


# --- pages ----------------------------------------------------------------------------------------------


def test_admission_waits_for_pages_and_pages_come_back():
    """9 usable pages of 4 positions: a 14-position prompt takes 4, so the second of two waits for
    the first to end even though a slot is free; every page is free again at the end."""
    s = make(FakeRunner(), slots=2, blocks=10, block_size=4)
    a = s.submit(lambda: prepared(14, max_new_tokens=8))
    b = s.submit(lambda: prepared(13, max_new_tokens=8))
    assert a.result(timeout=10).finish_reason == "length" and b.result(timeout=10).finish_reason == "length"
    st = s.stats()
    assert st["kv_blocks_used"] == 0 and st["kv_blocks_total"] == 9 and st["kv_tokens_total"] == 36
    s.pool.check()
    s.close()


def test_preemption_resumes_the_youngest_with_its_answer_intact():
    """Two long answers in 9 pages: the younger is preempted when pages run out, then resumes
    (recomputing prompt + answer so far, choosing nothing new) and ends with every token."""
    runner = FakeRunner(block=threading.Event())
    s = make(runner, slots=2, blocks=10, block_size=4)
    a = s.submit(lambda: prepared(3, max_new_tokens=14))
    b = s.submit(lambda: prepared(4, max_new_tokens=14))
    b.wait_prepared(10)
    runner.block.set()  # both are in before the first piece ends
    ca, cb = a.result(timeout=10), b.result(timeout=10)
    assert ca.token_ids == cb.token_ids == list(range(1, 15))  # the fake's k-th token is k
    assert s.stats()["preemptions"] >= 1
    assert s.stats()["kv_blocks_used"] == 0
    s.pool.check()
    s.close()


def test_a_follow_up_reuses_the_cached_prefix():
    s = make(FakeRunner(), blocks=100, block_size=4)
    first = s.submit(lambda: prepared(21, max_new_tokens=2)).result(timeout=10)
    again = s.submit(lambda: prepared(21, max_new_tokens=2)).result(timeout=10)
    assert first.cached_tokens == 0 and again.cached_tokens == 20  # all but the page of the last position
    assert s.stats()["prefix_cache_hit_tokens"] == 20
    s.close()
