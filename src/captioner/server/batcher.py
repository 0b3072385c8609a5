"""Concurrent caption requests captioned together: one model call for the images of every request
that is ready within a few milliseconds of another, each request still getting its own answer.

    request thread                              the batcher's thread
    ------------------------------------        ------------------------------------------------
    arriving()  (while its uploads decode)
    submit(images) -> waits for its turn    ->  takes the first request waiting; while others are
                                                still arriving, waits up to `wait_s` for them (never
                                                past `max_images` images); one model call for all;
                                                hands each request its own rows
    gets its captions, or TimeoutError (503)    (when no batch took it within the queue timeout)

A request alone (nobody else arriving) is captioned at once: the wait only happens while another
request is on its way, so batching costs a lone user nothing. A request that gave up waiting (its
client got a 503) is dropped before the model sees it. If the model call fails, every request of
that batch gets the error; bad uploads never reach it (each request checks its own files first).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import torch


class _Job:
    def __init__(self, images: list[torch.Tensor]):
        self.images = images
        self.started = threading.Event()  # taken into a batch: the model is on it
        self.done = threading.Event()
        self.results: list[dict] = []
        self.error: BaseException | None = None
        self.abandoned = False


class Batcher:
    """Runs `caption(stacked images) -> [result per image]` on a thread of its own, for the images
    of all requests gathered (see the module docstring)."""

    def __init__(self, caption: Callable[[torch.Tensor], list[dict]], *, max_images: int = 16, wait_s: float = 0.005):
        self.caption, self.max_images, self.wait_s = caption, max_images, wait_s
        self._waiting: collections.deque[_Job] = collections.deque()
        self._arriving = 0
        self._cond = threading.Condition()
        self.batches = 0  # model calls so far, and the requests they held (for tests and /health)
        self.requests = 0
        threading.Thread(target=self._loop, name="captioner-batcher", daemon=True).start()

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Around a request reading its uploads: the batcher waits for it while it does."""
        with self._cond:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify_all()

    def submit(self, images: list[torch.Tensor], timeout: float) -> list[dict]:
        """Caption `images` (preprocessed, one request's) with whatever else is waiting; raises
        TimeoutError when the model has not started on them within `timeout` seconds (the request
        is then dropped), or the model call's error."""
        job = _Job(images)
        with self._cond:
            self._waiting.append(job)
            self._cond.notify_all()
        if not job.started.wait(timeout):
            with self._cond:
                if not job.started.is_set():
                    job.abandoned = True
                    raise TimeoutError(f"no turn at the model within {timeout:g} s")
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.results

    def _gather(self) -> list[_Job]:
        """Wait for a request, then for the others still arriving (at most `wait_s` more)."""
        with self._cond:
            while not self._waiting:
                self._cond.wait()
            jobs = [self._waiting.popleft()]
            count = len(jobs[0].images)
            deadline = time.monotonic() + self.wait_s
            while count < self.max_images:
                if self._waiting:
                    if count + len(self._waiting[0].images) > self.max_images:
                        break  # it goes in the next batch
                    job = self._waiting.popleft()
                    jobs.append(job)
                    count += len(job.images)
                    continue
                left = deadline - time.monotonic()
                if self._arriving == 0 or left <= 0:
                    break
                self._cond.wait(left)
            jobs = [j for j in jobs if not j.abandoned]
            for j in jobs:
                j.started.set()
            return jobs

    def _loop(self) -> None:
        while True:
            jobs = self._gather()
            if not jobs:
                continue
            try:
                out = self.caption(torch.stack([x for j in jobs for x in j.images]))
                start = 0
                for j in jobs:
                    j.results = out[start:start + len(j.images)]
                    start += len(j.images)
                self.batches += 1
                self.requests += len(jobs)
            except BaseException as e:  # noqa: BLE001 - handed to each request, never lost with the thread
                for j in jobs:
                    j.error = e
            finally:
                for j in jobs:
                    j.done.set()
