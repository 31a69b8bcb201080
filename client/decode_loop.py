"""The batching loop behind `potluck serve`: every active request advances one token per round.

A round takes each decoding request's last token, embeds them, sends every request's step to the
swarm at once (each request has its own inference session; their steps leave in one bundle per
node, and the nodes batch them), then runs the final norm and the lm_head for all of them as one
batch, together with the requests whose prompt came back since (a prompt's step runs beside the
rounds, so a long one holds up no one), and picks each request's next token with its own sampling parameters and
random generator. A request that ends (end of text, a stop string, its token limit) or whose
client leaves drops out at once and its session closes; new requests join at the next round.
One thread runs the rounds, so per-token Python work is paid once per round, not per request.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from .session import InferenceSession

logger = logging.getLogger(__name__)


@dataclass
class Request:
    """One request's state between rounds."""

    prompt: list[int]
    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    generator: torch.Generator  # its own: sampling does not depend on the other requests
    on_token: Callable[[int], bool]  # called with each new token; True: stop (e.g. a stop string)
    on_end: Callable[[BaseException | None], None]  # called once when it leaves the loop
    cancelled: threading.Event = field(default_factory=threading.Event)
    session: InferenceSession | None = None
    prefill: concurrent.futures.Future | None = None  # its prompt's step, in flight
    tokens: list[int] = field(default_factory=list)  # generated so far


class DecodeLoop:
    def __init__(self, model, eos_ids: set[int], max_active: int = 64):
        self.model, self.eos_ids, self.max_active = model, eos_ids, max_active
        self.view = model.swarm_view
        self._arrivals: queue.Queue[Request] = queue.Queue()
        self._active: list[Request] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="potluck-decode-loop", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        self._arrivals.put(request)

    def close(self) -> None:
        self._closed.set()
        self._arrivals.put(None)  # wake the loop
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._closed.is_set():
            self._admit(block=not self._active)
            if self._active:
                try:
                    self._round()
                except Exception as e:  # a bug: fail the requests of this round, keep serving
                    logger.exception("decode round failed")
                    for request in list(self._active):
                        self._finish(request, e)
        for request in list(self._active):
            self._finish(request, RuntimeError("the server is shutting down"))

    def _admit(self, block: bool) -> None:
        while len(self._active) < self.max_active:
            try:
                request = self._arrivals.get(block=block)
            except queue.Empty:
                return
            if request is None:  # close()
                return
            request.session = InferenceSession(self.view, len(request.prompt) + request.max_tokens)
            self._active.append(request)
            block = False

    def _round(self) -> None:
        """Every decoding request's next step, together; prompts run beside the rounds (a long one
        must not hold up the others' tokens) and their requests join once their step is back."""
        for request in [r for r in self._active if r.cancelled.is_set()]:
            self._finish(request, None)
        for request in self._active:
            if not request.tokens and request.prefill is None:
                request.prefill = self._start(request, request.prompt)
        decoding = [r for r in self._active if r.tokens]
        if not decoding:  # only prompts in flight: wait for the first to come back
            concurrent.futures.wait([r.prefill for r in self._active], timeout=0.05,  # then admit arrivals
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        results = []
        if decoding:
            hidden = self._embed([r.tokens[-1:] for r in decoding])  # every request's last token: [N, 1, H]
            steps = [self._step(r, row) for r, row in zip(decoding, hidden.split(1))]
            results = list(zip(decoding, self.view.swarm.call(_together(steps))))
        prompted = [r for r in self._active if not r.tokens and r.prefill.done()]
        results += [(r, r.prefill.exception() or r.prefill.result()) for r in prompted]
        done = []
        for request, out in results:
            if isinstance(out, BaseException):
                self._finish(request, out)
            else:
                done.append((request, out[0, -1]))
        if not done:
            return
        with torch.no_grad():
            last = torch.stack([out for _, out in done]).to(self.model.device)  # [N, H]
            logits = self.model.lm_head(self.model.model.norm(last)).float()  # [N, V]
            greedy = logits.argmax(-1).tolist()  # every row's greedy choice in one operation
            if any(request.temperature for request, _ in done):
                logits = logits.cpu()  # each sampling request's CPU generator draws from its row
        for row, (request, _) in enumerate(done):
            token = greedy[row] if request.temperature == 0 else self._choose(request, logits[row])
            request.tokens.append(token)
            stop = request.on_token(token)
            if stop or token in self.eos_ids or len(request.tokens) >= request.max_tokens:
                self._finish(request, None)

    def _embed(self, ids: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            return self.model.model.embed_tokens(torch.tensor(ids, device=self.model.device)).cpu()

    def _step(self, request: Request, hidden: torch.Tensor):
        """The coroutine of ``request``'s next step: new tokens' embeddings [1, T, H] through the swarm."""
        start = request.session.position
        return request.session.step_async(hidden, torch.arange(start, start + hidden.shape[1]).unsqueeze(0))

    def _start(self, request: Request, ids: list[int]) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(self._step(request, self._embed([ids])), self.view.swarm.loop)

    @staticmethod
    def _choose(request: Request, logits: torch.Tensor) -> int:
        """Greedy, or a sample after temperature and top-p (as transformers' warpers do them)."""
        if request.temperature == 0:
            return int(logits.argmax())
        logits = logits / request.temperature
        if request.top_p < 1.0:
            ordered, order = torch.sort(logits)  # ascending
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - request.top_p
            drop[-1] = False  # keep at least the most likely token
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        return int(torch.multinomial(logits.softmax(-1), 1, generator=request.generator))

    def _finish(self, request: Request, error: BaseException | None) -> None:
        self._active.remove(request)
        if request.prefill is not None and not request.prefill.done():
            request.prefill.cancel()
        try:
            request.session.close()
        except Exception as e:  # the nodes free an abandoned session when its stream ends anyway
            logger.debug("closing a session: %s", e)
        request.on_end(error)


async def _together(steps: list) -> list:
    """Await every step at once on the swarm's loop; a failed step is returned as its exception."""
    return await asyncio.gather(*steps, return_exceptions=True)
