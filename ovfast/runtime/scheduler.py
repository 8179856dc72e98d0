"""The serving loop: one background thread owns the device; every caller shares its batch.

A request goes: ``submit`` (counted at once against ``max_queue``) -> a preprocessing worker
(decode, tile, tokenise; at most ``max_prepared`` requests hold pixels before admission) -> the
ready queue -> a free KV-cache slot at the next step boundary -> vision, once -> prefill in
chunks of at most ``prefill_chunk`` tokens, one chunk per loop turn between decode steps -> decode
steps with every other running sequence -> finished, cancelled or failed: the slot is free at once.

Decode steps are queued one ahead: while the device computes step t+1, the host turns step t's
tokens into text and checks stop conditions, synchronising once per step. A sequence found
finished at step t already had step t+1 computed; that token is dropped.
"""
from __future__ import annotations

import atexit
import itertools
import threading
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import EngineBusyError, EngineOverloadedError, OvfastError
from .generation import Sequence
from .handle import RequestHandle
from .request import PreparedRequest

_LIVE: "weakref.WeakSet[Scheduler]" = weakref.WeakSet()
_IDLE_EXIT_S = 5.0  # the loop thread exits after this long without work (and restarts on demand)
_LATENCY_SAMPLES = 4096


def _percentiles(samples) -> dict[str, float]:
    if not samples:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    xs = sorted(samples)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


class Scheduler:
    def __init__(self, engine, max_queue: int, prefill_chunk: int, preprocess_workers: int, max_prepared: int):
        self.engine = engine
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._pool = ThreadPoolExecutor(preprocess_workers, thread_name_prefix="ovfast-preprocess")
        self._prepared_gate = threading.BoundedSemaphore(max_prepared)
        self._waiting = 0  # accepted, not yet in a slot (preprocessing or ready)
        self._ready: deque[tuple[RequestHandle, PreparedRequest]] = deque()
        self._jobs: deque[tuple[Callable, RequestHandle]] = deque()  # device work outside generation
        self._sweep = False  # a handle was cancelled: look at the ready queue and the running slots
        self._running: dict[int, tuple[RequestHandle, Sequence]] = {}  # slot -> request
        self._thread: threading.Thread | None = None
        self._closed = False
        self.closed_reason: str | None = None  # set by abort(): why the engine can no longer run
        self.finished = 0
        self.tokens_generated = 0
        self._ttft: deque[float] = deque(maxlen=_LATENCY_SAMPLES)
        self._itl: deque[float] = deque(maxlen=_LATENCY_SAMPLES)
        self.errors: list[str] = []  # unexpected loop failures (tracebacks), for diagnosis
        _LIVE.add(self)

    # --- callers' side -------------------------------------------------------------------------

    def submit(self, prepare: Callable[[], PreparedRequest]) -> RequestHandle:
        """Accept a request (or refuse it at once) and preprocess it on a worker."""
        with self._cond:
            if self._closed:
                raise self._closed_error()
            if self._waiting >= self.max_queue:
                waiting = "1 request is" if self._waiting == 1 else f"{self._waiting} requests are"
                raise EngineOverloadedError(f"{waiting} already waiting (max_queue={self.max_queue}); retry later")
            self._waiting += 1
            handle = RequestHandle(f"req-{next(self._ids)}", self._cancel)
        self._pool.submit(self._preprocess, handle, prepare)
        return handle

    def run_on_device(self, fn: Callable[[int], object], needs_slot: bool = True):
        """Run ``fn(slot)`` on the loop thread between steps (a free slot lent for its duration)."""
        handle = RequestHandle(f"job-{next(self._ids)}", lambda h: None)
        with self._cond:
            if self._closed:
                raise self._closed_error()
            self._jobs.append((fn, handle))
            self._wake()
        return handle.result()

    def _cancel(self, handle: RequestHandle) -> None:
        with self._cond:
            self._sweep = True
            self._wake()

    def _preprocess(self, handle: RequestHandle, prepare: Callable[[], PreparedRequest]) -> None:
        self._prepared_gate.acquire()  # bounds the pixels held by requests waiting for a slot
        try:
            if handle.cancelled:
                raise _Cancelled
            req = prepare()
        except BaseException as e:  # input errors go to the caller; the engine is untouched
            self._prepared_gate.release()
            with self._cond:
                self._waiting -= 1
            if isinstance(e, _Cancelled):
                handle._finish(self.engine._cancelled_completion())
            else:
                handle._finish(error=e)
            return
        handle._set_prepared()
        with self._cond:
            self._ready.append((handle, req))
            self._sweep |= handle.cancelled  # cancelled while it was being prepared
            self._wake()

    def _wake(self) -> None:
        """(holding the lock) Notify the loop, starting it if it is not running."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ovfast-scheduler", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    def _closed_error(self) -> EngineBusyError:
        return EngineBusyError("the engine is closed" + (f": {self.closed_reason}" if self.closed_reason else ""))

    def abort(self, reason: str) -> None:
        """Stop for good because the engine cannot run any more (a tensor-parallel worker died): new
        requests are refused with ``reason``, the running and waiting ones fail with it. Callable
        from any thread; does not wait for the loop (it may be inside a failing collective)."""
        with self._cond:
            self._closed = True
            self.closed_reason = reason
            self._cond.notify_all()
            if self._thread is None:  # no loop to do it: fail what waits here
                self._fail_waiting()

    def _fail_waiting(self) -> None:
        """(holding the lock) The ready queue and the device jobs end with the abort's error."""
        error = self._closed_error()
        ready, self._ready = list(self._ready), deque()
        jobs, self._jobs = list(self._jobs), deque()
        for handle, _ in ready:
            self._waiting -= 1
            self._prepared_gate.release()
            handle._finish(error=error)
        for _, handle in jobs:
            handle._finish(error=error)

    def close(self, timeout: float | None = 30.0) -> None:
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=False)
        if thread is not None:
            thread.join(timeout)
        # Whatever was never admitted ends cancelled.
        with self._cond:
            ready, self._ready = list(self._ready), deque()
            jobs, self._jobs = list(self._jobs), deque()
        for handle, _ in ready:
            self._prepared_gate.release()
            handle._finish(self.engine._cancelled_completion())
        for _, handle in jobs:
            handle._finish(error=EngineBusyError("the engine is closed"))

    def stats(self) -> dict:
        with self._cond:
            running = list(self._running.values())
            waiting = self._waiting
        cache = self.engine.cache
        return {
            "running": len(running),
            "waiting": waiting,
            "free_slots": cache.slots - len(running),
            "kv_tokens_used": sum(seq.length for _, seq in running if seq is not None),
            "kv_tokens_total": cache.slots * self.engine.max_seq_len,
            "requests_finished": self.finished,
            "tokens_generated": self.tokens_generated,
            "ttft_ms": _percentiles(self._ttft),
            "inter_token_ms": _percentiles(self._itl),
        }

    # --- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        engine = self.engine
        if engine.device.type == "cuda":
            torch.cuda.set_device(engine.device)  # every launch of this thread goes to the engine's GPU
        in_flight = None
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._ready or self._running or self._jobs or self._sweep or in_flight):
                        if self._closed or not self._cond.wait(_IDLE_EXIT_S):
                            if self._ready or self._jobs:  # arrived just as the wait timed out
                                break
                            self._thread = None
                            return
                    closing = self._closed
                    if self.closed_reason is not None:  # aborted: nothing more can run
                        self._fail_waiting()
                        self._fail_all(self._closed_error())
                        in_flight = None
                        self._thread = None
                        return
                    if self._sweep or closing:
                        self._sweep = False
                        self._drop_cancelled_waiting()
                    free = [s for s in range(engine.cache.slots) if s not in self._running]
                    admitted = []
                    while free and self._ready and not closing:
                        slot = free.pop(0)
                        handle, req = self._ready.popleft()
                        self._waiting -= 1
                        admitted.append((slot, handle, req))
                        self._running[slot] = (handle, None)  # reserved; the sequence comes next
                    job = self._jobs.popleft() if (self._jobs and free) else None
                try:
                    self._drop_cancelled_running(closing)
                    for slot, handle, req in admitted:
                        self._admit(slot, handle, req)
                    if job is not None:
                        self._run_job(job, free[0])
                    self._prefill_one_chunk()
                    queued = self._queue_step()
                    if in_flight is not None:
                        self._collect(*in_flight)
                    in_flight = queued
                except Exception:  # a defect, not a request error: fail what runs, keep serving
                    self.errors.append(traceback.format_exc())
                    in_flight = None
                    if self._abort_if_fatal():
                        continue
                    self._fail_all(RuntimeError("ovfast: the engine failed during a step:\n" + self.errors[-1]))
                if closing and not self._running and in_flight is None:
                    with self._cond:
                        self._thread = None
                    return

    def _abort_if_fatal(self) -> bool:
        """After a defect: True, and aborted with the engine's reason, when the engine cannot go on
        (under tensor parallelism, a dead worker or a failed collective)."""
        reason = self.engine._fatal()
        if reason is not None:
            self.abort(reason)
        return reason is not None

    def _release(self, slot: int, completion=None, error=None) -> None:
        handle, seq = self._running.pop(slot)
        self.engine.runner.retire(slot)
        if seq is not None and completion is None and error is None:
            completion = seq.completion()
        if completion is not None:
            self.finished += 1
        handle._finish(completion, error)

    def _drop_cancelled_running(self, everything: bool = False) -> None:
        for slot, (handle, seq) in list(self._running.items()):
            if seq is not None and (handle.cancelled or everything):
                seq.cancel()
                self._release(slot)

    def _drop_cancelled_waiting(self) -> None:
        """(holding the lock) Cancelled requests still in the ready queue end now, never taking a slot.
        Those still preprocessing see ``handle.cancelled`` on their worker."""
        keep = deque()
        for handle, req in self._ready:
            if handle.cancelled:
                self._waiting -= 1
                self._prepared_gate.release()
                handle._finish(self.engine._cancelled_completion(len(req.input_ids)))
            else:
                keep.append((handle, req))
        self._ready = keep

    def _admit(self, slot: int, handle: RequestHandle, req: PreparedRequest) -> None:
        self._prepared_gate.release()  # the tiles are about to be consumed
        try:
            seq = self.engine._begin(req, slot, handle.submitted)
        except OvfastError as e:
            self._running.pop(slot)
            self.engine.runner.retire(slot)
            handle._finish(error=e)
            return
        except Exception as e:
            self._running.pop(slot)
            self.engine.runner.retire(slot)
            handle._finish(error=RuntimeError(f"ovfast: starting the request on the device failed: {e!r}"))
            self.errors.append(traceback.format_exc())
            self._abort_if_fatal()
            return
        self._running[slot] = (handle, seq)

    def _run_job(self, job, slot: int) -> None:
        fn, handle = job
        try:
            result = fn(slot)
        except OvfastError as e:
            handle._finish(error=e)
        except BaseException as e:
            handle._finish(error=e)
            self.errors.append(traceback.format_exc())
            self._abort_if_fatal()
        else:
            handle._finish(result)
        finally:
            self.engine.runner.retire(slot)

    def _prefill_one_chunk(self) -> None:
        """One chunk of the oldest prefilling sequence: running streams wait one chunk, not a prompt."""
        pending = [(seq.submitted, slot) for slot, (_, seq) in self._running.items() if seq and seq.prefilling]
        if not pending:
            return
        slot = min(pending)[1]
        handle, seq = self._running[slot]
        self.engine._prefill_chunk(seq, self.prefill_chunk)
        if seq.prefilling:
            return
        self._ttft.append((seq.last_token - seq.submitted) * 1e3)
        self.tokens_generated += 1
        handle._push(seq.text.pending())
        if seq.finish_reason:
            self._release(slot)
        else:
            self.engine.runner.admit(slot, seq.tokens[-1], seq.length)

    def _decoding(self) -> dict[int, Sequence]:
        return {slot: seq for slot, (_, seq) in self._running.items()
                if seq is not None and not seq.prefilling and not seq.finish_reason}

    def _queue_step(self):
        """Launch one decode step for the decoding slots; returns what ``_collect`` needs to read it."""
        active = self._decoding()
        if not active:
            return None
        general = not all(seq.request.params.plain_greedy for seq in active.values())
        return self.engine._queue_step(active, general)

    def _collect(self, host, event, stepped: dict[int, Sequence], general: bool, logprob_host) -> None:
        for seq in self.engine._collect(host, event, stepped, general, logprob_host):
            slot = seq.slot
            entry = self._running.get(slot)
            if entry is None or entry[1] is not seq:
                continue
            handle = entry[0]
            self.tokens_generated += 1
            self._itl.append((seq.last_token - seq.previous_token) * 1e3)
            handle._push(seq.text.pending())
            if seq.finish_reason:
                self._release(slot)

    def _fail_all(self, error: BaseException) -> None:
        for slot in list(self._running):
            self._release(slot, error=error)


class _Cancelled(Exception):
    pass


@atexit.register
def _close_all() -> None:
    """Interpreter exit: stop every loop thread first (none may be inside torch when it goes)."""
    for scheduler in list(_LIVE):
        scheduler.close(timeout=5.0)
