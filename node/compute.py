"""The node's compute lane: every block computation runs here, one at a time, off the event loop.

One worker thread keeps torch work from blocking the RPC loop (re-announcements, new streams)
while steps of different sessions queue in arrival order. Batching the steps of many sessions
into one forward is the planned next step and belongs here.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class ComputeLane:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="potluck-compute")
        self.busy_seconds = 0.0  # total time spent computing, for the node's counters
        self.tasks_done = 0

    async def run(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, fn, args)

    def _timed(self, fn: Callable[..., T], args: tuple) -> T:
        began = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.busy_seconds += time.perf_counter() - began
            self.tasks_done += 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
