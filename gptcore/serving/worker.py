"""The engine's thread: every request's rows share one :class:`~gptcore.generation.engine.Engine`.

HTTP handlers run on the server's event loop; decoding runs here, on one thread that
owns the engine (it is not thread-safe) and steps it while any row is active. Handlers
talk to it through a thread-safe inbox (submit, cancel) and get their text back through
an ``asyncio.Queue`` per request, fed with ``loop.call_soon_threadsafe``. Between steps
the thread admits new rows and retires cancelled ones, so a client that disconnects
frees its rows at the next step, and a new request starts decoding without waiting for
the others to finish (continuous batching).

A failure inside a step (a bug, an out-of-memory) fails the requests that were decoding
with a server error and gives the engine a fresh start; the thread keeps serving.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
from dataclasses import dataclass, field

from ..generation.engine import Engine
from ..generation.sampling import SamplingConfig
from ..generation.scoring import score_tokens
from ..generation.text import TextPieces

SHUTDOWN = "shutdown"  # the finish reason of a row the server cut short as it stopped


class QueueFull(Exception):
    """More rows are waiting than the queue holds (retry later)."""


class TooLarge(Exception):
    """A request with more completions than the server ever holds (retrying cannot help)."""


@dataclass(eq=False)
class Job:
    """One request: ``len(prompts) * n`` completions. Events arrive on ``events`` as
    ``(choice index, text, None, None, scored)`` per token (the text may be "" while held
    back; ``scored`` is ``(token id, (log-probability, alternatives))`` with ``logprobs``,
    else None), ``(choice index, text, finish_reason, tokens produced, None)`` once a choice
    ends, or ``(None, message, "error", None, None)`` if decoding failed. With ``echo`` and
    ``logprobs``, ``prompt_scores[p]`` holds prompt p's tokens' scores (scoring.py) before
    the first event."""

    prompts: list[list[int]]
    cfg: SamplingConfig
    n: int
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    logprobs: int | None = None
    echo: bool = False
    rows: list = field(default_factory=list)
    prompt_scores: list = field(default_factory=list)

    def send(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


def _deliver(batch: list) -> None:
    """On the event loop: hand a step's events to their requests' queues."""
    for job, item in batch:
        job.events.put_nowait(item)


class Worker:
    """Owns the engine and its thread. ``max_rows`` decode side by side; up to
    ``max_queue`` more rows wait; past that :meth:`submit` raises :class:`QueueFull`."""

    def __init__(self, model, tokenizer, *, max_rows: int, max_queue: int, crop_to: int | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_rows, self.max_queue, self.crop_to = max_rows, max_queue, crop_to
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.outstanding = 0  # rows submitted and not yet finished (guarded by lock)
        self.on_step = None  # called with each step's seconds (the server's metrics)
        self.engine = self._new_engine()
        self.thread = threading.Thread(target=self._loop, name="gptcore-engine", daemon=True)
        self.thread.start()

    def _new_engine(self) -> Engine:
        return Engine(self.model, max_rows=self.max_rows, eot_id=self.tokenizer.eot_id,
                      vocab_size=self.tokenizer.vocab_size, crop_to=self.crop_to)

    # ------------------------------------------------------------ event-loop side

    def submit(self, prompts: list[list[int]], cfg: SamplingConfig, n: int, logprobs: int | None = None,
               echo: bool = False) -> Job:
        """Queue a request (call from the event loop)."""
        rows = len(prompts) * n
        if rows > self.max_rows + self.max_queue:
            raise TooLarge(f"{len(prompts)} prompt(s) x n={n} = {rows} completions; this server holds at most "
                           f"{self.max_rows + self.max_queue} at once (--max-batch {self.max_rows} + --max-queue "
                           f"{self.max_queue})")
        with self.lock:
            if self.outstanding + rows > self.max_rows + self.max_queue:
                raise QueueFull(f"the server is at capacity ({self.outstanding} completions decoding or "
                                f"queued; at most {self.max_rows} decode at once and {self.max_queue} wait)")
            self.outstanding += rows
        loop = asyncio.get_running_loop()
        job = Job(prompts, cfg, n, asyncio.Queue(), loop, logprobs, echo)
        self.inbox.put(("submit", job))
        return job

    def cancel(self, job: Job) -> None:
        """Stop a request's rows (its client is gone); they leave at the next step."""
        self.inbox.put(("cancel", job))

    def shutdown(self) -> None:
        """End every row now (the server is stopping): each choice gets its finish event, with
        the reason SHUTDOWN, so its handler can end the response properly."""
        self.inbox.put(("shutdown", None))

    def stats(self) -> dict:
        with self.lock:
            outstanding = self.outstanding
        return {"rows_in_flight": outstanding, "max_batch": self.max_rows, "max_queue": self.max_queue}

    # ------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        while True:
            # Idle: block until something arrives. Busy: take what is there and step.
            self._handle(self.inbox.get() if not self.engine.busy else None)
            while True:
                try:
                    self._handle(self.inbox.get_nowait())
                except queue.Empty:
                    break
            if self.engine.busy:
                self._step()

    def _handle(self, message) -> None:
        if message is None:
            return
        kind, job = message
        if kind == "submit":
            if job.echo and job.logprobs is not None and not self._score_prompts(job):
                return
            for p, ids in enumerate(job.prompts):
                for i in range(job.n):
                    cfg = job.cfg.for_sample(i)
                    row = self.engine.submit(ids, cfg, tag=(job, p * job.n + i, TextPieces(self.tokenizer, cfg.stop)),
                                             logprobs=job.logprobs)
                    job.rows.append(row)
                    if row.finished:  # max_tokens 0
                        job.send(self._finish(row))
        elif kind == "shutdown":
            for row in self.engine.active + list(self.engine.waiting):
                if not row.finished:
                    row.cancel(SHUTDOWN)
                    row.tag[0].send(self._finish(row))
        elif kind == "cancel":
            for row in job.rows:
                if not row.finished:
                    row.cancel("cancelled")
                    self._release()

    def _score_prompts(self, job: Job) -> bool:
        """The prompts' own log-probabilities (echo), on this thread: the model is not
        thread-safe. A failure fails this request alone."""
        try:
            job.prompt_scores = [score_tokens(self.model, ids, job.logprobs) for ids in job.prompts]
            return True
        except Exception as exc:  # noqa: BLE001 -- one failure must not stop the server
            print(f"gptcore serve: scoring a prompt failed ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
            for _ in range(len(job.prompts) * job.n):
                self._release()
            job.send((None, "the server failed while scoring the prompt", "error", None, None))
            return False

    def _release(self) -> None:
        with self.lock:
            self.outstanding -= 1

    def _finish(self, row) -> tuple:
        """Release a finished row; the event that ends its choice (the caller sends it)."""
        job, index, text = row.tag
        # Released before the client hears: one that has its whole answer and sends the
        # next request must not find this row still counted (a stale /health, a false 503).
        self._release()
        return index, text.finish(), row.finish_reason, row.produced, None

    def _step(self) -> None:
        try:
            t0 = time.perf_counter()
            events = self.engine.step()
            if self.on_step is not None:
                self.on_step(time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 -- one failure must not stop the server
            print(f"gptcore serve: decoding failed ({type(exc).__name__}: {exc}); "
                  "failing the requests in flight", file=sys.stderr, flush=True)
            for row in self.engine.active + list(self.engine.waiting):
                job = row.tag[0]
                if not row.finished:
                    row.cancel("error")
                    self._release()
                    job.send((None, "the server failed while decoding this request", "error", None, None))
            self.engine = self._new_engine()
            return
        # One wake-up of the event loop per step, not one per token: each wake-up takes the
        # GIL from this thread between two of its tensor operations, so with 8 rows
        # per-token sends slowed the step itself.
        batch: list = []
        for row, token in events:
            job, index, text = row.tag
            if token is not None:
                piece = text.push(token)
                if text.stopped:
                    row.cancel("stop")
                scored = (token, row.scored) if row.logprobs is not None else None
                batch.append((job, (index, piece, None, None, scored)))  # one event per token; its text may be held
            if row.finished:
                batch.append((job, self._finish(row)))
        if batch:
            batch[0][0].loop.call_soon_threadsafe(_deliver, batch)  # every job is on the one server loop
