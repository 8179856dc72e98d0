"""The serving loop: one background thread drives the model runner; every caller shares its batch.

Each request is one ``Sequence`` with one ``Status`` (docs/request-lifecycle.md):

    submit -> PREPROCESSING (a worker: decode, tile, tokenise) -> READY -> a free KV-cache slot
    -> PREFILLING (vision pieces, then prefill chunks; one piece per loop turn) -> DECODING
    (one step per loop turn with every other decoding sequence) -> FINISHED | CANCELLED | FAILED

A loop turn: admit ready sequences into free slots, run one waiting job (``run_job``: work that
needs the device but no slot), advance the oldest prefilling sequence by one piece, launch a
decode step, then collect the step launched the turn before. Steps are queued one ahead: while
the device computes step t+1, the host turns step t's tokens into text. A sequence found
finished at step t already had step t+1 computed; that token is dropped. A step with a
constrained row (structured outputs) is collected before the next launch instead: that row's
next token mask depends on the token it chose, so such batches give up the overlap.

Calls go one way: the scheduler calls the runner (``begin``, ``advance``, ``start_decoding``,
``launch``, ``collect``, ``retire``) and reads what it returns; the runner never calls back. The
choices themselves (who is admitted, who prefills next, who decodes) are the functions below,
which a test can drive with a fake runner.
"""
from __future__ import annotations

import atexit
import itertools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..errors import EngineBusyError, EngineOverloadedError, OvfastError
from .block_pool import BlockPool, MediaSpan, NoFreeBlocks, block_hashes
from .generation import Sequence, Status
from .handle import RequestHandle
from .kv_cache import blocks_for
from .request import PreparedRequest

log = logging.getLogger("ovfast")

_LIVE: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()
_IDLE_EXIT_S = 5.0  # the loop thread exits after this long without work (and restarts on demand)
_LATENCY_SAMPLES = 4096
_DEFECTS_KEPT = 16


# --- policy: pure functions of the sequences ----------------------------------------------------------

def free_slots(running: dict[int, Sequence], slots: int) -> list[int]:
    return [s for s in range(slots) if s not in running]


def admissions(ready: Iterable[Sequence], free: list[int]) -> list[tuple[Sequence, int]]:
    """First come, first served: the oldest ready sequences take the lowest free slots."""
    return list(zip(ready, free))


def next_to_prefill(running: dict[int, Sequence]) -> Sequence | None:
    """The oldest prefilling sequence: the others' streams wait one piece, never a whole prompt."""
    pending = [seq for seq in running.values() if seq.status is Status.PREFILLING]
    return min(pending, key=lambda seq: seq.submitted, default=None)


def decoding(running: dict[int, Sequence]) -> dict[int, Sequence]:
    """Slot -> sequence of those the next decode step advances."""
    return {slot: seq for slot, seq in running.items() if seq.status is Status.DECODING and not seq.done_generating}


def victim(running: dict[int, Sequence]) -> Sequence | None:
    """Whom to preempt when pages run out: the youngest running sequence (the least work lost,
    and the oldest keep their pace)."""
    return max(running.values(), key=lambda seq: seq.submitted, default=None)


def prefix_blocks(cached: list[int], context: int, block_size: int) -> list[int]:
    """The cached pages a sequence reuses: the matched ones, short of the page holding its last
    context position (that token is always recomputed: its logits choose the next token)."""
    return cached[: min(len(cached), (context - 1) // block_size)]


def _percentiles(samples) -> dict[str, float]:
    if not samples:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    xs = sorted(samples)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


class Scheduler:
    def __init__(self, runner, *, slots: int, pool: BlockPool, prefix_caching: bool, max_queue: int,
                 prefill_chunk: int, preprocess_workers: int, max_prepared: int, device: torch.device | None = None):
        self.runner = runner
        self.slots, self.pool, self.prefix_caching = slots, pool, prefix_caching
        self.block_size = pool.block_size
        # Pages kept free at admission, so that running sequences can grow a while before anyone
        # is preempted.
        self.watermark = max(1, (pool.num_blocks - 1) // 100)
        self.max_queue, self.prefill_chunk, self.max_prepared = max_queue, prefill_chunk, max_prepared
        self.device = device
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._pool = ThreadPoolExecutor(preprocess_workers, thread_name_prefix="ovfast-preprocess")
        # Everything below is shared between callers, workers and the loop: read and written under _cond.
        self._preprocessing: set[Sequence] = set()
        self._holding = 0  # sequences holding preprocessed pixels (being prepared, or READY): <= max_prepared
        self._ready: deque[Sequence] = deque()
        self._running: dict[int, Sequence] = {}  # slot -> PREFILLING or DECODING sequence
        self._jobs: deque[tuple[Callable[[], object], Future]] = deque()
        self._sweep = False  # a handle was cancelled: look for it in the queue and the slots
        self._thread: threading.Thread | None = None
        self._closed = False
        self.closed_reason: str | None = None  # set by abort(): why the engine can no longer run
        self._finished = 0
        self._tokens = 0
        self._ttft: deque[float] = deque(maxlen=_LATENCY_SAMPLES)
        self._itl: deque[float] = deque(maxlen=_LATENCY_SAMPLES)
        self._defects: deque[dict] = deque(maxlen=_DEFECTS_KEPT)
        self._prefix_hits = 0  # prompt tokens served from the prefix cache
        self._prefix_queries = 0  # prompt tokens looked up
        self._preemptions = 0
        _LIVE.add(self)

    # --- callers' side ---------------------------------------------------------------------------

    def submit(self, prepare: Callable[[], PreparedRequest]) -> RequestHandle:
        """Accept a request (or refuse it at once) and preprocess it on a worker."""
        with self._cond:
            if self._closed:
                raise self._closed_error()
            waiting = len(self._preprocessing) + len(self._ready)
            if waiting >= self.max_queue:
                what = "1 request is" if waiting == 1 else f"{waiting} requests are"
                raise EngineOverloadedError(f"{what} already waiting (max_queue={self.max_queue}); retry later")
            seq = Sequence(RequestHandle(f"req-{next(self._ids)}", self._cancelled))
            self._preprocessing.add(seq)
        log.debug("%s accepted", seq.handle.id)
        self._pool.submit(self._preprocess, seq, prepare)
        return seq.handle

    def run_job(self, fn: Callable[[], object]):
        """Run ``fn()`` on the loop thread between steps (device work outside generation, such as
        scoring a prompt) and return its result. Needs no KV-cache slot: never waits for one."""
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise self._closed_error()
            self._jobs.append((fn, fut))
            self._wake()
        return fut.result()

    def reset_caches(self) -> None:
        """Forget the prefix cache and the vision cache, between steps; running requests go on."""
        def reset():
            self.pool.reset()
            self.runner.encoder_cache.clear()

        self.run_job(reset)

    def _cancelled(self, handle: RequestHandle) -> None:
        with self._cond:
            self._sweep = True
            self._wake()

    def _preprocess(self, seq: Sequence, prepare: Callable[[], PreparedRequest]) -> None:
        with self._cond:  # bounds the pixels held by requests not yet admitted
            self._cond.wait_for(lambda: self._holding < self.max_prepared or self._closed or seq.handle.cancelled)
            if seq not in self._preprocessing:  # ended meanwhile (close)
                return
            if self._closed or seq.handle.cancelled:
                self._leave_preprocessing(seq)
                self._end_waiting(seq, Status.CANCELLED)
                return
            self._holding += 1
        try:
            req = prepare()
        except BaseException as e:  # input errors go to the caller; the engine is untouched
            with self._cond:
                self._holding -= 1
                self._cond.notify_all()
                if self._leave_preprocessing(seq):
                    self._end_waiting(seq, Status.FAILED, error=e)
            return
        with self._cond:
            if not self._leave_preprocessing(seq):  # closed while it was prepared
                self._holding -= 1
                self._cond.notify_all()
                return
            seq.request, seq.status = req, Status.READY
            self._ready.append(seq)
            self._sweep |= seq.handle.cancelled  # cancelled while it was being prepared
            self._wake()
        seq.handle._set_prepared()

    def _leave_preprocessing(self, seq: Sequence) -> bool:
        """(holding the lock) Whether ``seq`` was still preprocessing; it no longer is."""
        if seq in self._preprocessing:
            self._preprocessing.discard(seq)
            return True
        return False

    def _wake(self) -> None:
        """(holding the lock) Notify the loop, starting it if it is not running."""
        if self._thread is None and not (self._closed and not self._running):
            self._thread = threading.Thread(target=self._loop, name="ovfast-scheduler", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    def _closed_error(self) -> EngineBusyError:
        return EngineBusyError("the engine is closed" + (f": {self.closed_reason}" if self.closed_reason else ""))

    def abort(self, reason: str) -> None:
        """Stop for good because the engine cannot run any more (a tensor-parallel worker died): new
        requests are refused with ``reason``; running and waiting ones fail with it. Callable from
        any thread; does not wait for the loop (it may be inside a failing collective)."""
        log.error("engine aborted: %s", reason)
        with self._cond:
            self._closed = True
            self.closed_reason = reason
            self._end_all_waiting(Status.FAILED, self._closed_error())
            self._cond.notify_all()

    def close(self, timeout: float | None = 30.0) -> None:
        """Refuse new requests; whatever waits ends cancelled now, whatever runs at the next step
        boundary. Returns once the loop has stopped (or after ``timeout``), whatever is queued."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._end_all_waiting(Status.CANCELLED, EngineBusyError("the engine is closed"))
            self._cond.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _end_all_waiting(self, status: Status, job_error: BaseException) -> None:
        """(holding the lock) Every sequence not in a slot ends with ``status``; every job fails."""
        for seq in list(self._preprocessing):
            self._leave_preprocessing(seq)
            self._end_waiting(seq, status, error=job_error if status is Status.FAILED else None)
        while self._ready:
            seq = self._ready.popleft()
            self._holding -= 1
            self._end_waiting(seq, status, error=job_error if status is Status.FAILED else None)
        while self._jobs:
            _, fut = self._jobs.popleft()
            fut.set_exception(job_error)

    def _end_waiting(self, seq: Sequence, status: Status, error: BaseException | None = None) -> None:
        """(holding the lock) ``seq``, never admitted, ends: cancelled (an empty completion) or with ``error``."""
        seq.status = status
        log.debug("%s %s before admission", seq.handle.id, status.value)
        if status is Status.CANCELLED:
            seq.cancel()
            seq.handle._finish(seq.completion())
        else:
            seq.handle._finish(error=error)

    def stats(self) -> dict:
        with self._cond:
            running = list(self._running.values())
            return {
                "running": len(running),
                "waiting": len(self._preprocessing) + len(self._ready),
                "prepared": self._holding,
                "free_slots": self.slots - len(running),
                "kv_tokens_used": self.pool.used * self.block_size,
                "kv_tokens_total": (self.pool.num_blocks - 1) * self.block_size,
                "kv_blocks_used": self.pool.used,
                "kv_blocks_total": self.pool.num_blocks - 1,
                "prefix_cache_hit_tokens": self._prefix_hits,
                "prefix_cache_query_tokens": self._prefix_queries,
                "preemptions": self._preemptions,
                "requests_finished": self._finished,
                "tokens_generated": self._tokens,
                "ttft_ms": _percentiles(self._ttft),
                "inter_token_ms": _percentiles(self._itl),
            }

    def defects(self) -> list[dict]:
        """The most recent unexpected failures (newest last): when, where, what, and which requests."""
        with self._cond:
            return [dict(d) for d in self._defects]

    # --- the loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # every launch of this thread goes to the engine's GPU
        in_flight = None
        with torch.inference_mode():
            while True:
                with self._cond:
                    if not self._wait_for_work(in_flight is not None):
                        self._thread = None
                        return
                    if self.closed_reason is not None:  # aborted: nothing more can run
                        for seq in list(self._running.values()):
                            self._end_running(seq, error=self._closed_error())
                        self._thread = None
                        return
                    closing = self._closed
                    if self._sweep or closing:
                        self._sweep = False
                        self._drop_cancelled_ready()
                    admitted = [] if closing else self._admit()
                    job = self._jobs.popleft() if self._jobs else None
                    cancelled = [seq for seq in self._running.values()
                                 if seq not in admitted and (closing or seq.handle.cancelled)]
                try:
                    in_flight = self._turn(cancelled, admitted, job, in_flight)
                except Exception as e:  # a defect of the loop itself: what runs fails, the loop goes on
                    self._defect("the scheduler loop", e, list(self._running.values()))
                    in_flight = None
                if closing:
                    with self._cond:
                        if not self._running and in_flight is None:
                            self._thread = None
                            return

    def _turn(self, cancelled: list[Sequence], admitted: list[Sequence], job, in_flight):
        """One loop turn outside the lock; returns the step now in flight."""
        for seq in cancelled:
            seq.cancel()
            self._end_running(seq)
        for seq in admitted:
            self._begin(seq)
        if job is not None:
            self._run_job(*job)
        self._prefill_piece()
        if in_flight is not None and in_flight.constrained:  # its grammars need its tokens before the next step
            self._collect(in_flight)
            in_flight = None
        queued = self._launch()
        if in_flight is not None:
            self._collect(in_flight)
        return queued

    def _wait_for_work(self, in_flight: bool) -> bool:
        """(holding the lock) Until there is something to do: False when the loop should exit."""
        def work() -> bool:
            admissible = self._ready and len(self._running) < self.slots
            return bool(admissible or self._running or self._jobs or self._sweep or in_flight or self._closed)

        while not work():
            if not self._cond.wait(_IDLE_EXIT_S) and not work():
                return False
        return not (self._closed and not self._running and not in_flight and self.closed_reason is None)

    def _admit(self) -> list[Sequence]:
        """(holding the lock) Ready sequences into free slots, in order, while their pages fit
        (those from the prefix cache cost nothing); the first that does not fit waits, and so
        does everyone behind it."""
        out = []
        for seq, slot in admissions(self._ready, free_slots(self._running, self.slots)):
            if not self._take_pages(seq):
                break
            self._ready.popleft()
            self._holding -= 1  # its pixels are about to be consumed
            seq.slot, seq.status = slot, Status.PREFILLING
            self._running[slot] = seq
            out.append(seq)
        if out:
            self._cond.notify_all()  # preprocessing workers waiting for the pixel budget
        return out

    def _take_pages(self, seq: Sequence) -> bool:
        """Pages for ``seq``'s context: the cached prefix reused, the rest allocated. False (and
        nothing taken) when they do not fit beside the watermark."""
        context = seq.context_ids()
        cached = []
        if self.prefix_caching:
            self._hash_pages(seq, context)
            cached = prefix_blocks(self.pool.match(seq.block_hashes), len(context), self.block_size)
        fresh = blocks_for(len(context), self.block_size) - len(cached)
        reserve = self.watermark if self._running else 0
        revived = sum(self.pool.refcount(b) == 0 for b in cached)  # cached-free pages leave the free count
        if self.pool.free_count - revived < fresh + reserve:
            return False
        self.pool.take(cached)
        seq.blocks = cached + self.pool.allocate(fresh)
        seq.registered = len(cached)
        seq.prefilled = len(cached) * self.block_size
        if not seq.resuming:
            seq.cached_tokens = seq.prefilled
            self._prefix_hits += seq.prefilled
            self._prefix_queries += len(context)
        return True

    def _hash_pages(self, seq: Sequence, ids: list[int]) -> None:
        """Extend ``seq.block_hashes`` to every full page of ``ids`` (its prompt and answer so far)."""
        if len(seq.block_hashes) >= len(ids) // self.block_size:
            return
        spans = [MediaSpan(a, b, item.key) for (a, b), item in zip(seq.request.spans, seq.request.items)]
        seq.block_hashes += block_hashes(ids, spans, self.block_size, first_block=len(seq.block_hashes),
                                         parent=seq.block_hashes[-1] if seq.block_hashes else None)

    def _register_full_pages(self, seq: Sequence) -> None:
        """Hash and publish the pages of ``seq`` now full and written (prompt or answer), so later
        requests with the same prefix (a follow-up question, the next turn of a chat) reuse them."""
        if not self.prefix_caching:
            return
        written = seq.length if seq.status is Status.DECODING else seq.prefilled
        full = min(written // self.block_size, len(seq.blocks))
        if full <= seq.registered:
            return
        self._hash_pages(seq, (seq.request.input_ids + seq.tokens)[: full * self.block_size])
        for i in range(seq.registered, full):
            self.pool.register(seq.blocks[i], seq.block_hashes[i])
        seq.registered = full

    def _grow(self, active: dict[int, Sequence]) -> dict[int, Sequence]:
        """Pages for the next decode step of every decoding sequence (the step in flight writes
        position ``length``, the next one ``length + 1``); when they run out, the youngest running
        sequences are preempted until they fit. Returns who still decodes."""
        for seq in sorted(active.values(), key=lambda s: s.submitted):
            if seq.status is not Status.DECODING:
                continue  # preempted meanwhile
            need = blocks_for(seq.length + 2, self.block_size) - len(seq.blocks)
            while need > 0:
                try:
                    new = self.pool.allocate(need)
                except NoFreeBlocks:
                    out = victim(self._running)
                    self._preempt(out)
                    if out is seq:
                        break
                    continue
                first = len(seq.blocks)
                seq.blocks += new
                self.runner.set_blocks(seq, first)
                need = 0
        return {slot: seq for slot, seq in active.items() if seq.status is Status.DECODING}

    def _preempt(self, seq: Sequence) -> None:
        """``seq`` gives its pages back and waits at the head of the queue; when readmitted it
        recomputes its prompt and answer so far (much of it from the prefix cache) and decodes on,
        with exactly the tokens it would have had."""
        log.info("%s preempted (KV pages ran out) after %d tokens", seq.handle.id, len(seq.tokens))
        with self._cond:
            del self._running[seq.slot]
            self.runner.retire(seq.slot)
            self.pool.release(seq.blocks)
            seq.blocks, seq.registered, seq.slot = [], 0, -1
            seq.prefilled, seq.length, seq.embeds, seq.vision = 0, 0, None, None
            seq.resuming = bool(seq.tokens)
            seq.block_hashes = seq.block_hashes[: len(seq.context_ids()) // self.block_size]
            seq.status = Status.READY
            self._preemptions += 1
            self._holding += 1
            self._ready.appendleft(seq)

    def _drop_cancelled_ready(self) -> None:
        """(holding the lock) Cancelled requests still in the ready queue end now, never taking a slot.
        Those still preprocessing see ``handle.cancelled`` on their worker."""
        keep = deque()
        for seq in self._ready:
            if seq.handle.cancelled:
                self._holding -= 1
                self._end_waiting(seq, Status.CANCELLED)
            else:
                keep.append(seq)
        self._ready = keep
        self._cond.notify_all()

    def _begin(self, seq: Sequence) -> None:
        log.debug("%s admitted to slot %d", seq.handle.id, seq.slot)
        try:
            self.runner.begin(seq)
        except OvfastError as e:  # the request's own fault, found on the device side
            self._end_running(seq, error=e)
        except Exception as e:
            self._defect("starting a request", e, [seq])

    def _run_job(self, fn: Callable[[], object], fut: Future) -> None:
        try:
            result = fn()
        except Exception as e:
            if not isinstance(e, OvfastError):  # a request error is the caller's; anything else a defect
                self._defect("a device job", e, [])
            fut.set_exception(e)
        else:
            fut.set_result(result)

    def _prefill_piece(self) -> None:
        """One piece (vision or a prefill chunk) of the oldest prefilling sequence."""
        seq = next_to_prefill(self._running)
        if seq is None:
            return
        try:
            done = self.runner.advance(seq, self.prefill_chunk)
        except OvfastError as e:
            self._end_running(seq, error=e)
            return
        except Exception as e:
            self._defect("a prefill piece", e, [seq])
            return
        self._register_full_pages(seq)
        if not done:
            return
        if seq.resuming:  # back from a preemption: decodes on from its last token, nothing new to say
            seq.resuming = False
            self._start_decoding(seq)
            return
        with self._cond:
            self._ttft.append((seq.last_token - seq.submitted) * 1e3)
            self._tokens += 1
        seq.handle._push(seq.text.pending())
        if seq.done_generating:
            self._end_running(seq)
            return
        self._start_decoding(seq)

    def _start_decoding(self, seq: Sequence) -> None:
        try:
            self.runner.start_decoding(seq)
        except Exception as e:
            self._defect("starting to decode", e, [seq])
            return
        seq.status = Status.DECODING

    def _launch(self):
        try:
            active = self._grow(decoding(self._running))
            return self.runner.launch(active) if active else None
        except Exception as e:
            self._defect("a decode step", e, list(decoding(self._running).values()))
            return None

    def _collect(self, pending) -> None:
        try:
            stepped = self.runner.collect(pending)
        except Exception as e:
            self._defect("a decode step", e, [s for s in pending.stepped.values() if s.status is Status.DECODING])
            return
        with self._cond:
            self._tokens += len(stepped)
            self._itl.extend((seq.last_token - seq.previous_token) * 1e3 for seq in stepped)
        for seq in stepped:
            seq.handle._push(seq.text.pending())
            self._register_full_pages(seq)
            if seq.done_generating:
                self._end_running(seq)

    def _end_running(self, seq: Sequence, error: BaseException | None = None) -> None:
        """``seq`` leaves its slot: finished, cancelled, or failed with ``error``; its row stops."""
        with self._cond:
            if self._running.get(seq.slot) is not seq:
                return
            del self._running[seq.slot]
            if error is None:
                self._finished += 1
            self._cond.notify_all()
        try:
            self.runner.retire(seq.slot)
        finally:
            self.pool.release(seq.blocks)
            seq.blocks, seq.embeds, seq.vision = [], None, None
            if error is not None:
                seq.status = Status.FAILED
            else:
                seq.status = Status.CANCELLED if seq.finish_reason == "cancelled" else Status.FINISHED
            log.debug("%s %s", seq.handle.id, seq.status.value)
            if error is not None:
                seq.handle._finish(error=error)
            else:
                seq.handle._finish(seq.completion())

    def _defect(self, where: str, error: Exception, touched: list[Sequence]) -> None:
        """An unexpected failure (not a request's fault): logged, kept for ``info()``, and the
        requests it touched fail; under tensor parallelism, when the ranks can no longer agree,
        the engine aborts and everything fails."""
        log.error("defect in %s (requests %s)", where, [s.handle.id for s in touched], exc_info=error)
        with self._cond:
            self._defects.append({"time": time.time(), "where": where, "error": f"{type(error).__name__}: {error}",
                                  "requests": [s.handle.id for s in touched]})
        reason = self.runner.fatal()
        if reason is not None:
            self.abort(reason)
            return
        failure = RuntimeError(f"ovfast: {where} failed on the device: {error!r}")
        failure.__cause__ = error
        for seq in touched:
            self._end_running(seq, error=failure)


@atexit.register
def _close_all() -> None:
    """Interpreter exit: stop every loop thread first (none may be inside torch when it goes)."""
    for scheduler in list(_LIVE):
        scheduler.close(timeout=5.0)
