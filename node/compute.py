"""The node's compute lane: all block work runs here, on one worker thread, batched across sessions.

Requests become jobs for the ``Scheduler``; one engine task on the event loop takes the next
batch (``schedule``), runs it on the worker thread (``batching``), records it (``update``) and
answers each job's request, then takes the next. Steps that arrive while a batch runs wait for
the next one, so under load decoding steps of many sessions go through the weights together
(continuous batching); only a lone decoding step or forward arriving at an idle lane waits a
moment (``gather_window``, 2 ms) for others sent along with it (bundled steps need no wait). A
decoding step of the only open session, with nothing else waiting, runs right on the loop
instead: a thread hand-over would cost about as much as the step. Other exclusive work (a speed
measurement) goes to the same thread between batches. With ``cuda_graphs`` every decoding pass,
a lone one too, runs at fixed shapes and is replayed from a CUDA graph (``graphs``).
"""
from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import torch

from .batching import ForwardWork, StepWork, decode_together, forward_together, prefill_together
from .scheduler import Batch, Job, JobKind, Scheduler
from .sessions import Session
from .span import BlockSpan

T = TypeVar("T")


class ComputeLane:
    def __init__(self, max_batch: int = 64, prefill_chunk: int = 512, gather_window: float = 0.002,
                 forward_tokens: int = 8192, cuda_graphs: bool = False) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="potluck-compute")
        self.scheduler = Scheduler(max_batch, prefill_chunk, forward_tokens)
        self.busy_seconds = 0.0  # total time spent computing, for the node's counters
        self.counters: Counter[str] = Counter()  # batches run, rows decoded, prefill chunks...
        self._work: dict[int, tuple[StepWork | ForwardWork, asyncio.Future]] = {}  # job id -> inputs, answer
        self._ids = itertools.count()
        self._engine: asyncio.Task | None = None
        self.gather_window = gather_window  # seconds a batch started from idle waits for steps arriving with it
        self.cuda_graphs = cuda_graphs  # decoding passes at fixed shapes, replayed from CUDA graphs (``graphs``)

    async def step(self, session: Session, hidden: torch.Tensor, positions: torch.Tensor,
                   mask: torch.Tensor | None, start: int, alone: bool = False) -> torch.Tensor:
        """Run a session's step (hidden [B, T, H]); ``alone``: no other session is open here."""
        return await self.submit_step(session, hidden, positions, mask, start, alone)

    def submit_step(self, session: Session, hidden: torch.Tensor, positions: torch.Tensor,
                    mask: torch.Tensor | None, start: int, alone: bool = False) -> asyncio.Future:
        """``step`` without a coroutine: the future of its output (done at once for a step run
        right here). A node's handlers serve a bundle's steps this way, with no task for each."""
        work = StepWork(session, hidden, positions, mask, start)
        batch, new_tokens = hidden.shape[:2]
        decoding = new_tokens == 1 and batch == 1 and mask is None
        if alone and decoding and self._idle():
            answer = asyncio.get_running_loop().create_future()
            self.counters["decode_batches"] += 1  # a batch of one, run right here
            self.counters["decode_rows"] += 1
            try:
                self._timed(self._decode, [work])
                answer.set_result(work.result())
            except Exception as e:
                answer.set_exception(e)
            return answer
        group = (id(session.span), session.request.start, session.request.end)
        kind = JobKind.DECODE if decoding else JobKind.PREFILL
        joinable = batch == 1 and mask is None  # a prompt of one sequence: may run with others' (``scheduler``)
        job = Job(next(self._ids), kind, new_tokens, group, id(session), joinable=joinable)
        return self._submit(job, work)

    async def forward(self, span: BlockSpan, hidden: torch.Tensor, positions: torch.Tensor,
                      mask: torch.Tensor | None, start: int, end: int) -> torch.Tensor:
        work = ForwardWork(span, hidden, positions, mask, start, end)
        batch, length = hidden.shape[:2]
        group = (id(span), start, end, length)
        return await self._submit(Job(next(self._ids), JobKind.FORWARD, length, group, rows=batch), work)

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Run ``fn(*args)`` on the compute thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, fn, *args)

    def _idle(self) -> bool:
        return not self.scheduler.waiting and self._engine_idle()

    def _engine_idle(self) -> bool:
        return self._engine is None or self._engine.done()

    def _submit(self, job: Job, work: StepWork | ForwardWork) -> asyncio.Future:
        answer = asyncio.get_running_loop().create_future()
        self._work[job.id] = (work, answer)
        self.scheduler.add(job)
        if self._engine_idle():
            self._engine = asyncio.create_task(self._drive())
        return answer

    async def _drive(self) -> None:
        """Run batches until nothing waits."""
        loop = asyncio.get_running_loop()
        # a decoding step or forward that arrived alone may have company one read behind it (other
        # clients' requests of the same moment): let it in before the first batch. Steps that came in
        # one bundle are all here already; later batches fill while the previous one runs
        if len(self.scheduler.waiting) == 1 and self.scheduler.waiting[0].kind is not JobKind.PREFILL:
            await asyncio.sleep(self.gather_window)
        while (batch := self.scheduler.schedule()) is not None:
            if batch.kind is JobKind.DECODE and self.scheduler.in_prefill():
                self.counters["decode_rows_during_prefill"] += len(batch.jobs)  # a long prompt stalls no one
            try:
                await loop.run_in_executor(self._executor, self._timed, self._execute, batch)
            except Exception as e:  # e.g. out of memory: every request of the batch gets the error
                for job in self.scheduler.drop(batch):
                    _, answer = self._work.pop(job.id)
                    if not answer.done():
                        answer.set_exception(e)
                continue
            for job in self.scheduler.update(batch):
                work, answer = self._work.pop(job.id)
                if answer.done():  # the request went away meanwhile
                    continue
                try:
                    answer.set_result(work.result())
                except Exception as e:  # a bug here must fail this request, not stop the lane
                    answer.set_exception(e)

    def _execute(self, batch: Batch) -> list[torch.Tensor]:
        """On the compute thread: run one batch; one output per job."""
        works = [self._work[job.id][0] for job in batch.jobs]
        self.counters["batches"] += 1
        if batch.kind is JobKind.DECODE:
            self.counters["decode_batches"] += 1
            self.counters["decode_rows"] += len(works)
            return self._decode(works)
        if batch.kind is JobKind.PREFILL:
            self.counters["prefill_chunks"] += 1
            if len(works) > 1:  # whole short prompts of several sessions
                self.counters["prefills_together"] += len(works)
                return prefill_together(works)
            return [works[0].chunk(batch.begin, batch.end)]
        self.counters["forward_batches"] += 1
        return forward_together(works)

    def _decode(self, works: list[StepWork]) -> list[torch.Tensor]:
        """One decoding pass, counted as a graph pass if its pool replayed it from a CUDA graph."""
        pool = works[0].session.pool
        before = pool.fixed.replays if pool.fixed is not None else 0
        rows = decode_together(works, self.cuda_graphs)
        if pool.fixed is not None:
            self.counters["graph_passes"] += pool.fixed.replays - before
        return rows

    def _timed(self, fn: Callable[..., T], *args) -> T:
        began = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.busy_seconds += time.perf_counter() - began

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)
