"""Progress bars for long work (loading weights, writing checkpoints, benchmarks, a long prefill).

One switch for all of them: a bar is drawn (tqdm, on stderr) only when stderr is a terminal,
``enabled`` is true (the command line's ``--quiet`` clears it) and this process is not a
tensor-parallel rank > 0 (the ranks share rank 0's terminal). Otherwise every helper here is a
silent passthrough, so logs, pipes and tests see nothing.
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

enabled = True


def set_enabled(on: bool) -> None:
    """Allow bars (the default) or not (``--quiet``)."""
    global enabled
    enabled = on


def active() -> bool:
    """Whether a bar would be drawn now."""
    if not enabled or not sys.stderr.isatty():
        return False
    dist = sys.modules.get("torch.distributed")  # not imported here: only a process that joined a group asks
    return dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0


class _Silent:
    """What ``progress`` returns when no bar is drawn: iterates ``iterable``, ignores the rest."""

    def __init__(self, iterable: Iterable | None):
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it", **options):
    """A tqdm bar over ``iterable`` (or one to ``update`` by hand; ``options`` go to tqdm), or a silent stand-in."""
    if not active():
        return _Silent(iterable)
    from tqdm import tqdm

    # leave=False: the bar is erased when done, so it never mixes with the output that follows.
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False,
                dynamic_ncols=True, **options)


@contextmanager
def spinner(desc: str):
    """An indeterminate bar (the elapsed time ticking) for a block with no steps to count.

    Yields a ``stop()`` that erases it early (e.g. when the first streamed piece arrives)."""
    if not active():
        yield lambda: None
        return
    from tqdm import tqdm

    bar = tqdm(desc=desc, total=None, bar_format="{desc} {elapsed}", file=sys.stderr, leave=False)
    done = threading.Event()
    lock = threading.Lock()

    def tick() -> None:
        while not done.wait(0.2):
            with lock:
                if not done.is_set():
                    bar.refresh()

    def stop() -> None:
        with lock:
            if not done.is_set():
                done.set()
                bar.close()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop()
        thread.join()
