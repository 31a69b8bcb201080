"""Which block work a node runs next: a scheduler that holds no tensors (unit-testable alone).

The node's compute loop is three verbs, as in vLLM v1: ``schedule()`` picks a ``Batch`` from the
waiting jobs, the compute lane executes it, ``update(batch)`` records what it did and returns the
jobs that are finished. Decoding steps (one new token on a session's cache) that wait at the same
moment run as one batch, whatever their cache lengths, as long as they go through the same blocks.
Longer steps (prefills) run in chunks of at most ``prefill_chunk`` tokens; short ones of one
sequence each (a burst of new prompts) that wait together and go through the same blocks run
whole as one batch, padded to the longest, within ``prefill_chunk`` tokens in all. Short prompts
waiting behind a long one take every other prefill turn with its chunks.
Cache-less forwards run whole; those waiting together that go through the same blocks with the
same length run as one batch, up to ``forward_tokens`` in all (the first whatever its size).
Decoding batches and the longer work take turns whenever both wait, so a long prompt neither
stalls the sessions that are decoding nor starves behind them.
"""
from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Hashable


class JobKind(enum.Enum):
    DECODE = "decode"  # one new token of one sequence on a session's cache: batches with others
    PREFILL = "prefill"  # several new tokens (or a batch of sequences) on a session's cache: chunked
    FORWARD = "forward"  # a cache-less forward pass: runs whole, batches with forwards like it


@dataclass
class Job:
    id: int
    kind: JobKind
    tokens: int  # new tokens per sequence: 1 for DECODE; a PREFILL is split along these
    group: Hashable  # jobs batch only within a group (same span, same blocks; forwards: same length too)
    session: Hashable = None  # a session's jobs run one at a time, in arrival order (None: any order)
    done: int = 0  # tokens run so far (a PREFILL's chunks)
    rows: int = 1  # sequences (a FORWARD's batch size: what it counts against the token budget)
    joinable: bool = False  # a PREFILL that may run with others like it (one sequence, no padding mask)


@dataclass(frozen=True)
class Batch:
    kind: JobKind
    jobs: tuple[Job, ...]  # every job of the batch (a long PREFILL: exactly one)
    begin: int = 0  # PREFILL of one job: the chunk is tokens begin:end of it; of several: each whole
    end: int = 1


class Scheduler:
    def __init__(self, max_batch: int = 64, prefill_chunk: int = 512, forward_tokens: int = 8192):
        self.max_batch = max_batch  # decoding jobs (or forwards) in one batch
        self.prefill_chunk = prefill_chunk  # most tokens of a prefill run in one go
        self.forward_tokens = forward_tokens  # most tokens (rows x length) of forwards run together
        self.waiting: deque[Job] = deque()  # in arrival order
        self.running: Batch | None = None  # scheduled, not yet updated
        self._prefill_turn = False  # a decoding batch just ran while a longer job waited
        self._chunk_ran = False  # the last prefill turn went to a long prompt's chunk

    def add(self, job: Job) -> None:
        self.waiting.append(job)

    def schedule(self) -> Batch | None:
        """The next batch, or None when nothing waits (or a batch is still running)."""
        if self.running is not None or not self.waiting:
            return None
        ready = self._ready()
        decoding = [j for j in ready if j.kind is JobKind.DECODE]
        others = [j for j in ready if j.kind is not JobKind.DECODE]
        if decoding and not (self._prefill_turn and others):
            group = decoding[0].group  # the oldest decoding job's group first: no group starves
            jobs = tuple(j for j in decoding if j.group == group)[: self.max_batch]
            self.running = Batch(JobKind.DECODE, jobs)
            self._prefill_turn = bool(others)
        elif others[0].kind is JobKind.FORWARD:
            self.running = Batch(JobKind.FORWARD, self._forwards(others), 0, others[0].tokens)
            self._prefill_turn = False
        else:
            jobs = self._prefills(others)
            job = jobs[0]
            end = max(j.tokens for j in jobs) if len(jobs) > 1 else min(job.tokens, job.done + self.prefill_chunk)
            self.running = Batch(job.kind, jobs, job.done, end)
            self._prefill_turn = False
        return self.running

    def _forwards(self, others: list[Job]) -> tuple[Job, ...]:
        """The oldest waiting forward and those like it, within max_batch jobs and forward_tokens."""
        first, jobs = others[0], [others[0]]
        budget = self.forward_tokens - first.rows * first.tokens
        for job in others[1:]:
            if len(jobs) == self.max_batch:
                break
            if job.kind is JobKind.FORWARD and job.group == first.group and job.rows * job.tokens <= budget:
                jobs.append(job)
                budget -= job.rows * job.tokens
        return tuple(jobs)

    def _prefills(self, others: list[Job]) -> tuple[Job, ...]:
        """The oldest waiting prefill, with the short joinable prefills of its blocks waiting with
        it when it is one too: at most max_batch, their rows x longest within prefill_chunk. When
        it is long, every other turn goes to the short ones waiting behind it instead."""
        first = others[0]
        if not self._whole(first):
            behind = [job for job in others[1:] if self._whole(job)]
            self._chunk_ran = not (self._chunk_ran and behind)
            if self._chunk_ran:
                return (first,)
            first, others = behind[0], behind  # short prompts behind a long one: every other turn
        jobs, longest = [first], first.tokens
        for job in others[1:]:
            if len(jobs) == self.max_batch:
                break
            wider = max(longest, job.tokens)
            if self._whole(job) and job.group == first.group and wider * (len(jobs) + 1) <= self.prefill_chunk:
                jobs.append(job)
                longest = wider
        return tuple(jobs)

    def _whole(self, job: Job) -> bool:
        return job.kind is JobKind.PREFILL and job.joinable and job.done == 0 and job.tokens <= self.prefill_chunk

    def _ready(self) -> list[Job]:
        """Waiting jobs that no earlier job of the same session is ahead of."""
        seen, ready = set(), []
        for job in self.waiting:
            if job.session is None or job.session not in seen:
                ready.append(job)
            seen.add(job.session)
        return ready

    def update(self, batch: Batch) -> list[Job]:
        """Record that ``batch`` ran; return the jobs it finished (they leave the queue)."""
        assert batch is self.running, "update() takes the batch schedule() returned"
        self.running = None
        for job in batch.jobs:
            job.done = batch.end if batch.kind is not JobKind.DECODE and len(batch.jobs) == 1 else job.tokens
        finished = [job for job in batch.jobs if job.done >= job.tokens]
        for job in finished:
            self.waiting.remove(job)
        return finished

    def drop(self, batch: Batch) -> list[Job]:
        """``batch`` failed: its jobs leave the queue (their requests get the error)."""
        assert batch is self.running
        self.running = None
        for job in batch.jobs:
            self.waiting.remove(job)
        return list(batch.jobs)

    def in_prefill(self) -> bool:
        """Whether some prefill has run part of its chunks and waits for the rest."""
        return any(j.kind is JobKind.PREFILL and 0 < j.done < j.tokens for j in self.waiting)
