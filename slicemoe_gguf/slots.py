"""The decoding slots of `slicemoe serve`: one thread owns the model's context and decodes every
request in flight together, one token of each per batch, so that the slice cache serves the union
of the experts they select (a missing slice is read once for every sequence routed to it).

A request arrives as a Task (its checked Job, the Reply to fill and how to hand pieces back); the
Decoder evaluates its prompt on a free sequence of the context, then runs it in every batch until
its reply ends. With one slot this is plain one-request-at-a-time decoding.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ._native import SliceMoEError
from .openai_request import Job
from .replies import COUNTERS, Reply, ReplyWriter, cache_counters
from .runtime import Model


@dataclass
class Task:
    job: Job
    reply: Reply
    cancel: threading.Event
    put: Callable[[tuple], None]     # hands ("piece", text), ("piece", None) at the end, or ("error", exc)
    release: Callable[[float], None]  # the slot is free again (seconds it was held); called once
    seq: int = -1
    last_token: int = -1
    writer: ReplyWriter | None = None
    started: float = field(default_factory=time.perf_counter)
    before: dict | None = None


class Decoder:
    """The thread that decodes every task in flight (at most n_slots: the caller admits them)."""

    def __init__(self, model: Model, n_slots: int, account: Callable[[Reply], None], release_idle_s: float = 0.0):
        self.model = model
        self.account = account
        self.release_idle_s = release_idle_s   # > 0: hand the pools back after this long without work
        self.releases = 0
        self.free = list(range(n_slots))
        self.active: dict[int, Task] = {}
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="slicemoe-decoder", daemon=True)
        self.thread.start()

    def submit(self, task: Task) -> None:
        self.inbox.put(task)

    def close(self, timeout_s: float) -> None:
        """Ends the thread once the tasks in flight have ended (cancel them first to end it at once)."""
        self.inbox.put(None)
        self.thread.join(timeout_s)

    def busy(self) -> int:
        return len(self.active)

    # -- the thread ---------------------------------------------------------------------------

    def _next(self):
        """The next item of the inbox: at once when busy; when idle, waiting for it, and handing the
        pools back first if it takes longer than release_idle_s (a phone's idle app keeps no pools
        for memory pressure to swap out; the next request reads its slices again)."""
        if self.active:
            return self.inbox.get_nowait()
        if self.release_idle_s > 0 and self.model.has_cache:
            try:
                return self.inbox.get(timeout=self.release_idle_s)
            except queue.Empty:
                self.model.release_cache()
                self.releases += 1
        return self.inbox.get()

    def _run(self) -> None:
        closing = False
        while not closing or self.active:
            try:
                # idle: wait for work; busy: take what has arrived and decode on
                item = self._next()
                while True:
                    if item is None:
                        closing = True
                    else:
                        self._start(item)
                    item = self.inbox.get_nowait()
            except queue.Empty:
                pass
            self._step()

    def _start(self, task: Task) -> None:
        task.seq = self.free.pop(0)
        self.active[task.seq] = task
        reply, job, model = task.reply, task.job, self.model
        reply.prompt_tokens = len(job.prompt)
        task.writer = ReplyWriter(model, reply, job.max_tokens, job.stop, job.top_logprobs)
        task.before = cache_counters(model)
        try:
            if task.cancel.is_set():
                task.writer.cancel()
                self._end(task)
                return
            model.reset_seq(task.seq)
            started = time.perf_counter()
            model.eval_seq(task.seq, job.prompt)
            reply.prefill_ms = 1000 * (time.perf_counter() - started)
            if task.writer.done:   # max_tokens 0: the prompt only
                self._end(task)
                return
            self._sample(task)
        except Exception as exc:   # noqa: BLE001 - the request's failure, reported to its client
            self._end(task, exc)

    def _take(self, task: Task, token: int, logits: np.ndarray | None) -> None:
        """The task's next sampled token."""
        if not task.reply.tokens:
            task.reply.ttft_ms = 1000 * (time.perf_counter() - task.started)
        piece = task.writer.add(token, logits)
        if piece:
            task.put(("piece", piece))
        task.last_token = token
        if task.writer.done:
            self._end(task)

    def _step(self) -> None:
        """One decode batch: a token of every task in flight that has not been cancelled."""
        for task in list(self.active.values()):
            if task.cancel.is_set():
                task.writer.cancel()
                self._end(task)
        tasks = list(self.active.values())
        if not tasks:
            return
        if len(tasks) > 1:
            for task in tasks:
                task.reply.shared = True
        started = time.perf_counter()
        try:
            self.model.decode_batch([t.seq for t in tasks], [t.last_token for t in tasks])
        except SliceMoEError as exc:
            if len(tasks) == 1:
                self._end(tasks[0], exc)
                return
            # the batch's experts do not fit the pools together: one sequence at a time this step
            for task in tasks:
                self._step_alone(task)
            return
        ms = 1000 * (time.perf_counter() - started)
        for task in tasks:
            task.reply.decode_ms += ms
            self._sample(task)

    def _step_alone(self, task: Task) -> None:
        started = time.perf_counter()
        try:
            self.model.decode_batch([task.seq], [task.last_token])
        except Exception as exc:   # noqa: BLE001
            self._end(task, exc)
            return
        task.reply.decode_ms += 1000 * (time.perf_counter() - started)
        self._sample(task)

    def _sample(self, task: Task) -> None:
        try:
            token = self.model.sample(task.job.sampler, task.seq)
            # the logits are copied only for a request that asked for logprobs
            logits = self.model.logits_seq(task.seq) if task.job.top_logprobs is not None else None
            self._take(task, token, logits)
        except Exception as exc:   # noqa: BLE001
            self._end(task, exc)

    def _end(self, task: Task, error: Exception | None = None) -> None:
        if self.active.pop(task.seq, None) is None:
            return
        reply = task.reply
        after = cache_counters(self.model)
        if task.before is not None and after is not None:
            reply.cache = {name: after[name] - task.before[name] for name in COUNTERS}
        self.model.reset_seq(task.seq)
        self.free.append(task.seq)
        try:
            self.account(reply)
            if error is not None:
                if not isinstance(error, SliceMoEError):
                    error = SliceMoEError(f"internal error: {error!r}", 8)
                task.put(("error", error))
            else:
                rest = task.writer.rest()
                if rest:
                    task.put(("piece", rest))
                task.put(("piece", None))
        finally:
            task.release(time.perf_counter() - task.started)

