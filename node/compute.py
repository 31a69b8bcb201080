"""The node's compute lane: every block computation runs here, one at a time, off the event loop.

One worker thread keeps long torch work from blocking the RPC loop (re-announcements, new
streams) while steps of different sessions queue in arrival order. A small job that finds the
lane idle runs right on the loop instead: a decoding step takes about as long as the two thread
hand-overs it would otherwise cost. Batching the steps of many sessions into one forward is the
planned next step and belongs here.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class ComputeLane:
    def __init__(self, inline_tokens: int = 8) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="potluck-compute")
        self.inline_tokens = inline_tokens  # jobs of at most this many tokens may run on the loop
        self.busy_seconds = 0.0  # total time spent computing, for the node's counters
        self.tasks_done = 0
        self._queued = 0  # jobs handed to the worker thread and not finished

    async def run(self, fn: Callable[..., T], *args, tokens: int | None = None) -> T:
        """Run ``fn(*args)`` in the lane; ``tokens`` (the job's size) lets small jobs run inline."""
        if tokens is not None and tokens <= self.inline_tokens and self._queued == 0:
            return self._timed(fn, args)
        self._queued += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, fn, args)
        finally:
            self._queued -= 1

    def _timed(self, fn: Callable[..., T], args: tuple) -> T:
        began = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.busy_seconds += time.perf_counter() - began
            self.tasks_done += 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
