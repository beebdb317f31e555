"""The engine of ``cctuning serve``: one thread owns the model and runs every forward pass.

Requests hand it sequences (:class:`~cctuning.serve.sequence.Sequence`, one per choice) and scoring
jobs; it admits waiting sequences into the running :class:`~cctuning.serve.batch.Batch` between two
decoding steps, up to ``max_batch_size`` rows, and reports through each sequence's ``sink``.

* An idle engine that gets a request waits ``gather_s`` (5 ms) for the others of a burst, so that
  requests arriving together are prefilled as one batch; later ones join the running batch.
* At most ``queue_size`` sequences wait to be admitted: :meth:`Engine.submit` refuses more at once
  (:class:`QueueFull`, answered 503 with ``Retry-After``), so a burst never makes a request hang.
* A cancelled sequence (its client went away) is skipped while it waits, and leaves the batch at
  the next step.
* The model's hooks (capture, injection) are armed by one forward at a time, which is why only this
  thread touches the model. Its forward passes run under ``torch.no_grad`` and the precision context
  the command line gives (``--bf16``: autocast is per thread).
* An exception in a forward pass fails the sequences it concerned, with the message, and the engine
  goes on with the next requests.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cctuning.errors import first_line
from cctuning.inference.generate import CCGenerator
from cctuning.serve.batch import Batch
from cctuning.serve.sequence import Event, Sequence

logger = logging.getLogger(__name__)

#: seconds an idle engine waits after a request for others arriving with it (one prefill for all)
GATHER_S = 0.005


class QueueFull(Exception):
    """The queue cannot take the sequences of a request now."""


@dataclass(eq=False)
class ScoreJob:
    """The log-probability of every token of ``ids`` given those before it (connection none), the
    ``top`` most likely tokens at each position, and the greedy next token: an echoed completion."""

    ids: list[int]
    top: int
    sink: Callable[[Event], None]
    cancelled: bool = False


@dataclass
class EngineStats:
    """Counters for tests, ``/health`` and the bench: steps run, the most rows in one step, sequences
    admitted and refused."""

    steps: int = 0
    largest_batch: int = 0
    admitted: int = 0
    refused: int = 0


class Engine:
    """The model's thread: a bounded queue of sequences and scoring jobs, and the running batch."""

    def __init__(
        self,
        generator: CCGenerator,
        max_batch_size: int = 8,
        queue_size: int = 64,
        precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        gather_s: float = GATHER_S,
    ):
        self.gen = generator
        self.gather_s = gather_s
        self.max_batch_size = max_batch_size
        self.queue_size = queue_size
        self.precision = precision
        self.batch = Batch(generator)
        self.pending: deque = deque()
        self.stats = EngineStats()
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="cctuning-serve-engine", daemon=True)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def load(self) -> dict[str, int]:
        """Sequences running and waiting now."""
        with self._lock:
            return {"running": len(self.batch.rows), "waiting": len(self.pending)}

    def submit(self, jobs: list) -> None:
        """Queue sequences and scoring jobs, all or none (:class:`QueueFull` when they do not fit)."""
        with self._lock:
            if self._stopping or (self._thread.ident is not None and not self._thread.is_alive()):
                raise QueueFull("the server is shutting down")
            if len(self.pending) + len(jobs) > self.queue_size:
                self.stats.refused += len(jobs)
                raise QueueFull(
                    f"the queue is full ({len(self.pending)} of {self.queue_size} places taken); retry later"
                )
            self.pending.extend(jobs)
            self._lock.notify_all()

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.no_grad(), self.precision():
            while True:
                jobs = self._next_jobs()
                if jobs is None:
                    break
                try:
                    self._work(jobs)
                except Exception as err:  # a failed forward must not end the server
                    logger.exception("the engine failed a step")
                    self._fail([j for j in jobs if isinstance(j, Sequence)] + self.batch.rows, err)
                    self.batch.clear()

    def _next_jobs(self) -> list | None:
        """Wait for work; the waiting jobs that may start now (None: stop)."""
        with self._lock:
            while not self._stopping and not self.pending and not self.batch.rows:
                self._lock.wait()
            self._gather()
            if self._stopping:
                for job in self.pending:
                    _fail_job(job, "the server is shutting down")
                self.pending.clear()
                for seq in self.batch.rows:
                    seq.fail("the server is shutting down")
                return None
            room = self.max_batch_size - len(self.batch.rows) if self.batch.joinable else 0
            taken = []
            for job in list(self.pending):
                if job.cancelled:
                    self.pending.remove(job)
                elif isinstance(job, ScoreJob) or room > 0:
                    self.pending.remove(job)
                    taken.append(job)
                    room -= isinstance(job, Sequence)
            return taken

    def _gather(self) -> None:
        """On an idle engine, wait up to ``gather_s`` for the requests arriving together with the first
        one, so that they are prefilled as one batch (the lock is held)."""
        if self.batch.rows:
            return
        deadline = time.monotonic() + self.gather_s
        while not self._stopping and len(self.pending) < self.max_batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._lock.wait(left)

    def _work(self, jobs: list) -> None:
        for job in jobs:
            if isinstance(job, ScoreJob):
                self._score(job)
        sequences = [j for j in jobs if isinstance(j, Sequence)]
        if sequences:
            waiting = self.batch.admit(sequences)
            self.stats.admitted += len(sequences) - len(waiting)
            with self._lock:  # back to the front of the queue, in their order
                self.pending.extendleft(reversed(waiting))
        self.batch.drop_done()  # cancelled while waiting for this step
        if self.batch.rows:
            self.stats.steps += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(self.batch.rows))
            self.batch.step()

    def _fail(self, sequences: list[Sequence], err: Exception) -> None:
        for seq in sequences:
            seq.fail(f"the model failed: {first_line(err)}")

    def _score(self, job: ScoreJob) -> None:
        try:
            job.sink(Event("scores", data=score_tokens(self.gen.model, job.ids, job.top)))
        except Exception as err:  # one bad job must not end the others
            logger.exception("a scoring job failed")
            job.sink(Event("error", text=f"the model failed: {first_line(err)}"))


def _fail_job(job, message: str) -> None:
    if isinstance(job, Sequence):
        job.fail(message)
    else:
        job.sink(Event("error", text=message))


def score_tokens(model, ids: list[int], top: int) -> dict:
    """One forward of the plain model (connection none) over ``ids``: the log-probability of each token
    after the first given the tokens before it, the ``top`` most likely tokens at each position, and
    the greedy next token with its log-probability (``next``, ``next_logprob``, ``next_top``)."""
    device = model.arch.embeddings.weight.device
    logits = model.base(input_ids=torch.tensor([ids], device=device)).logits[0].float()
    logprobs = F.log_softmax(logits, -1)
    target = torch.tensor(ids[1:], device=device)
    chosen = logprobs[:-1].gather(1, target[:, None])[:, 0] if len(ids) > 1 else logprobs[:0, 0]
    best = logprobs.topk(max(top, 1), -1)
    greedy = int(logprobs[-1].argmax())
    return {
        "token_logprobs": [None, *chosen.tolist()],
        "top": [list(zip(i.tolist(), v.tolist())) for i, v in zip(best.indices, best.values)],
        "next": greedy,
        "next_logprob": float(logprobs[-1, greedy]),
    }
