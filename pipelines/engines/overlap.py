"""Input and output overlapped with scoring in the in-memory engine.

Parquet decoding and encoding release the GIL, so one thread reads the next batch and one writes
the last while the main thread fits or scores (with one BLAS thread, ``core.threads``, the second
core is free for them). Both keep order: one reader, one writer, first in first out.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
_END = object()


def read_ahead(items: Iterator[T], depth: int = 1) -> Iterator[T]:
    """``items``, produced by a thread up to ``depth`` ahead of the consumer; its errors re-raised here."""
    ready: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put((_END, exc))

    thread = threading.Thread(target=produce, name="poisonguard-read", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()  # the reader stops after the batch it is reading (Ctrl-C, SIGTERM, an error here)
        thread.join()
        close = getattr(items, "close", None)
        if close is not None:
            close()  # the reader's open files, now that no thread runs it


class Writer:
    """Calls ``sink`` on its own thread, in order, with at most ``depth`` calls waiting; its first
    error is raised by a later call or at exit, and no call after it runs."""

    def __init__(self, sink: Callable[..., None], depth: int = 1):
        self.sink, self.depth = sink, depth
        self.pending: deque = deque()
        self.failed = False

    def __enter__(self) -> "Writer":
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="poisonguard-write")
        return self

    def __call__(self, *args) -> None:
        self.pending.append(self.executor.submit(self._write, *args))
        while len(self.pending) > self.depth:
            self.pending.popleft().result()

    def _write(self, *args) -> None:
        if self.failed:
            return
        try:
            self.sink(*args)
        except BaseException:
            self.failed = True
            raise

    def __exit__(self, kind, value, traceback) -> None:
        try:
            while kind is None and self.pending:
                self.pending.popleft().result()
        finally:
            self.executor.shutdown(wait=True, cancel_futures=True)
