"""A bounded job queue in front of one worker thread that owns the networks, with dynamic micro-batching.

Why one thread: the networks are not re-entrant-fast (two threads forwarding at once only split the same cores)
and a single owner keeps GPU/CPU memory bounded. Why micro-batching: a forward over 8 images' crops costs far less
than 8 forwards of one image's (fixed per-call overhead, better GEMM shapes), so while the worker is busy the
requests that arrive are run together: the worker takes the oldest job, then up to ``max_batch - 1`` more of the
same kind, waiting at most ``batch_wait_ms`` for them to arrive.

The event loop only ever touches ``submit`` (non-blocking; raises ``QueueFull`` instead of waiting) and the
``concurrent.futures.Future`` it returns. A future cancelled before its job starts (the client went away) is
dropped when the worker reaches it, so abandoned work never occupies the networks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("ircnn.service")


class QueueFull(Exception):
    """The queue holds ``queue_size`` jobs (or the worker is shutting down); the caller should answer 503."""


@dataclass
class Job:
    kind: str  # a key of the handlers, e.g. "classify" or "detect"
    payload: Any  # what the handler needs: the decoded image and the request's options
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


# handler(jobs) -> one result per job, in order; a result that is an Exception fails its job only; a raised
# exception fails the batch, whose jobs are then retried one by one
Handler = Callable[[list[Job]], list[Any]]


class BatchObserver:
    """Hooks the batcher calls (metrics); the default does nothing."""

    def batch(self, kind: str, size: int, seconds: float) -> None: ...

    def queue_wait(self, kind: str, seconds: float) -> None: ...

    def dropped(self, kind: str) -> None: ...


class MicroBatcher:
    def __init__(self, handlers: dict[str, Handler], queue_size: int = 64, max_batch: int = 8,
                 batch_wait_ms: float = 5.0, observer: BatchObserver | None = None) -> None:
        if queue_size < 1 or max_batch < 1 or batch_wait_ms < 0:
            raise ValueError(f"need queue_size >= 1, max_batch >= 1, batch_wait_ms >= 0; got {queue_size}, "
                             f"{max_batch}, {batch_wait_ms}")
        self.handlers = handlers
        self.queue_size = queue_size
        self.max_batch = max_batch
        self.batch_wait = batch_wait_ms / 1000.0
        self.observer = observer or BatchObserver()
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._inflight = 0
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()  # set once the warm-up has run
        self.warmup_error: Exception | None = None
        self.dropped = 0

    # ---- event-loop side (never blocks for long: one short lock) ------------------------------------------

    @property
    def depth(self) -> int:
        """Jobs waiting for the worker (not counting the batch it is running)."""
        return len(self._jobs)

    @property
    def inflight(self) -> int:
        """Jobs in the batch the worker is running now."""
        return self._inflight

    def has_room(self) -> bool:
        return not self._closing and len(self._jobs) < self.queue_size

    def submit(self, kind: str, payload: Any) -> Future:
        if kind not in self.handlers:
            raise ValueError(f"no handler for job kind {kind!r}")
        job = Job(kind, payload)
        with self._cond:
            if self._closing:
                raise QueueFull("the service is shutting down")
            if len(self._jobs) >= self.queue_size:
                raise QueueFull(f"the queue is full ({self.queue_size} jobs waiting)")
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    # ---- lifecycle -----------------------------------------------------------------------------------------

    def start(self, warmup: Callable[[], None] | None = None) -> None:
        """Start the worker thread; it runs ``warmup`` first (in the thread that owns the models), then jobs."""
        if self._thread is not None:
            raise RuntimeError("the batcher is already started")
        self._thread = threading.Thread(target=self._run, args=(warmup,), name="ircnn-inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Refuse new jobs, finish the queued ones, and join the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- worker side ---------------------------------------------------------------------------------------

    def _run(self, warmup: Callable[[], None] | None) -> None:
        if warmup is not None:
            try:
                warmup()
            except Exception as e:  # reported by /readyz; jobs still run (and fail with their own error)
                log.exception("warm-up failed")
                self.warmup_error = e
        self.ready.set()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._process(batch)

    def _take_live(self, kind: str | None) -> Job | None:
        """Pop the oldest job (of ``kind`` if given) whose client is still waiting; drop cancelled ones."""
        for job in list(self._jobs):
            if kind is not None and job.kind != kind:
                continue
            self._jobs.remove(job)
            if job.future.set_running_or_notify_cancel():
                return job
            self.dropped += 1
            self.observer.dropped(job.kind)
        return None

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            first = None
            while first is None:
                first = self._take_live(None)
                if first is None:
                    if self._closing:
                        return None
                    self._cond.wait()
            batch = [first]
            deadline = time.perf_counter() + self.batch_wait
            while len(batch) < self.max_batch:
                job = self._take_live(first.kind)
                if job is not None:
                    batch.append(job)
                    continue
                left = deadline - time.perf_counter()
                if left <= 0 or self._closing:
                    break
                self._cond.wait(left)
            self._inflight = len(batch)
            return batch

    def _process(self, batch: list[Job]) -> None:
        kind = batch[0].kind
        start = time.perf_counter()
        for job in batch:
            self.observer.queue_wait(kind, start - job.enqueued)
        try:
            results = self.handlers[kind](batch)
            if len(results) != len(batch):
                raise RuntimeError(f"{kind} handler returned {len(results)} results for {len(batch)} jobs")
        except Exception as e:
            if len(batch) == 1:
                batch[0].future.set_exception(e)
            else:  # one bad job must not fail its neighbours: run them alone
                for job in batch:
                    try:
                        result = self.handlers[kind]([job])[0]
                    except Exception as e1:
                        result = e1
                    if isinstance(result, Exception):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)
        else:
            for job, result in zip(batch, results):
                if isinstance(result, Exception):  # that job's own failure (e.g. a bad image)
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
        finally:
            self.observer.batch(kind, len(batch), time.perf_counter() - start)
            self._inflight = 0
