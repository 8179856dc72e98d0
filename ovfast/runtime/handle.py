"""``RequestHandle``: what ``Engine.submit`` returns, the caller's end of one request.

The scheduler thread produces (text pieces, then a ``Completion`` or an error); any number of
threads or asyncio tasks consume: ``for piece in handle``, ``handle.result()``, ``async for
piece in handle``, ``await handle.aresult()``. Asyncio consumers wait on futures the producer
resolves with ``call_soon_threadsafe``, so a server needs no thread per request.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # generation imports this module
    from .generation import Completion


class RequestHandle:
    def __init__(self, request_id: str, on_cancel: Callable[["RequestHandle"], None]):
        self.id = request_id
        self.submitted = time.perf_counter()
        self._on_cancel = on_cancel
        self._cond = threading.Condition()
        self._pieces: list[str] = []
        self._read = 0  # pieces already handed to the iterating consumer
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self._prepared = False  # preprocessing finished (well or not)
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self.cancelled = False

    # --- producer side (the engine) ------------------------------------------------------------

    def _notify(self) -> None:
        self._cond.notify_all()
        for loop, fut in self._waiters:
            loop.call_soon_threadsafe(_resolve, fut)
        self._waiters.clear()

    def _set_prepared(self) -> None:
        with self._cond:
            self._prepared = True
            self._notify()

    def _push(self, piece: str) -> None:
        if piece:
            with self._cond:
                self._pieces.append(piece)
                self._notify()

    def _finish(self, completion: Completion | None = None, error: BaseException | None = None) -> None:
        with self._cond:
            if self.done:
                return
            self._completion, self._error, self._prepared = completion, error, True
            self._notify()

    # --- consumer side -------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._completion is not None or self._error is not None

    def cancel(self) -> None:
        """Stop the request: it ends with finish_reason "cancelled" and frees its slot at the next step."""
        with self._cond:
            if self.done or self.cancelled:
                return
            self.cancelled = True
        self._on_cancel(self)

    def wait_prepared(self, timeout: float | None = None) -> None:
        """Block until the request is preprocessed; raises its input error if it had one."""
        with self._cond:
            self._cond.wait_for(lambda: self._prepared, timeout)
            if self._error is not None:
                raise self._error

    def result(self, timeout: float | None = None) -> Completion:
        """The completion, once finished; raises the request's error, or TimeoutError."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.id} not finished after {timeout} s")
            if self._error is not None:
                raise self._error
            return self._completion

    def __iter__(self):
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._read < len(self._pieces) or self.done)
                if self._read < len(self._pieces):
                    piece = self._pieces[self._read]
                    self._read += 1
                elif self._error is not None:
                    raise self._error
                else:
                    return
            yield piece

    def _wake_future(self) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiters.append((loop, fut))
        return fut

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        while True:
            with self._cond:
                if self._read < len(self._pieces):
                    self._read += 1
                    return self._pieces[self._read - 1]
                if self._error is not None:
                    raise self._error
                if self.done:
                    raise StopAsyncIteration
                fut = self._wake_future()
            await fut

    async def _until(self, ready) -> None:
        """Await ``ready()`` (checked under the lock); the request's error, if any, is raised first."""
        while True:
            with self._cond:
                if self._error is not None:
                    raise self._error
                if ready():
                    return
                fut = self._wake_future()
            await fut

    async def aprepared(self) -> None:
        """``wait_prepared`` for asyncio: returns once preprocessed; raises its input error if it had one."""
        await self._until(lambda: self._prepared)

    async def aresult(self) -> Completion:
        await self._until(lambda: self._completion is not None)
        return self._completion

    def __repr__(self) -> str:
        state = "done" if self.done else ("cancelled" if self.cancelled else "running")
        return f"<RequestHandle {self.id} {state}>"


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
