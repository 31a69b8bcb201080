"""The batching loop behind `potluck serve`: every active request advances one token per round.

A round takes each decoding request's last token, embeds them, sends every request's step to the
swarm at once (each request has its own inference session; their steps leave in one bundle per
node, and the nodes batch them). When the round is back, the final norm and the lm_head run for
all of its requests as one batch, together with the requests whose prompt came back since (a
prompt's step runs beside the rounds, so a long one holds up no one, and so does a step that a slow
or hung node holds long past the rest of its round); each request's next token is
picked with its own sampling parameters (logit bias, presence and frequency penalties, temperature,
top-p) and random generator, the next round leaves, and only
once its steps are written to the nodes' streams are the tokens handed out: detokenizing and
streaming them overlap the nodes' work instead of holding up the round's way out (the threads
share one GIL). A request that ends (end of text, its token limit) or whose client leaves drops
out and its session closes; one that meets a stop string is answered at once and leaves when its
step in flight is back. New requests join at the next round. One thread runs the rounds, so
per-token Python work is paid once per round, not per request.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from potluck.protocol.errors import NodeUnavailable
from potluck.protocol.families import rope_switch

from .session import InferenceSession

logger = logging.getLogger(__name__)
SEND_WAIT_S = 0.05  # the longest a round's tokens wait for its steps to be written (a busy swarm loop)
LEAVE_CHECK_S = 0.5  # how often the loop, waiting on a long round, looks for requests whose client left
STRAGGLER_MIN_S = 0.02  # a round waits at least this long past its first answer for the rest (``_together``)
LOGITS_CHUNK_BYTES = 1 << 18  # float32 logits of the vocabulary chunk the lm_head computes at once (``_choices``)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (its raw logits, before any bias,
    penalty or temperature), and the most likely tokens' (most likely first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


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
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of each token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: times how often each token was generated so far
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to those tokens' logits
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely tokens'
    cancelled: threading.Event = field(default_factory=threading.Event)
    session: InferenceSession | None = None
    step: concurrent.futures.Future | None = None  # its step in flight: its prompt's, the round's, its own if left
    # behind by its round
    row: int = 0  # its result's index in what ``step`` gives (one per request sent with it)
    tokens: list[int] = field(default_factory=list)  # generated so far
    counts: Counter = field(default_factory=Counter)  # how often each token was generated (for the penalties)
    score: TokenLogprob | None = None  # with ``logprobs``: its last token's (the streamer keeps them)
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # ``logit_bias`` as ids and values, made once
    ended: bool = False  # on_end was called

    @property
    def needs_logits(self) -> bool:
        """Whether its next token needs the whole vocabulary's logits (not only the best of them)."""
        return bool(self.temperature or self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.logprobs is not None)


class DecodeLoop:
    def __init__(self, model, eos_ids: set[int], max_active: int = 64):
        self.model, self.eos_ids, self.max_active = model, eos_ids, max_active
        self.view = model.swarm_view
        self.rope_switch = rope_switch(model.config)  # past it a sequence is computed again from its start
        self._arrivals: queue.Queue[Request] = queue.Queue()
        self._active: list[Request] = []
        self._round: concurrent.futures.Future | None = None  # the steps of the last round sent
        self.counters: Counter[str] = Counter()  # what the loop has done, for serve's metrics (read, not reset)
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
                    self._turn()
                except Exception as e:  # a bug: fail the requests in the loop, keep serving
                    logger.exception("decode turn failed")
                    for request in list(self._active):
                        self._finish(request, e)
        for request in list(self._active):
            self._finish(request, NodeUnavailable("potluck serve is shutting down"))  # typed: no traceback

    def _admit(self, block: bool) -> None:
        while len(self._active) < self.max_active:
            try:
                request = self._arrivals.get(block=block)
            except queue.Empty:
                return
            if request is None:  # close()
                return
            if request.cancelled.is_set():  # its client left while it waited for a place
                self.counters["requests_left"] += 1
                self._end(request, None)
                continue
            request.session = InferenceSession(self.view, len(request.prompt) + request.max_tokens)
            self._active.append(request)
            self.counters["prompt_tokens"] += len(request.prompt)
            block = False

    def _turn(self) -> None:
        """Wait for the round (or, with none in flight, a prompt's step) to come back; choose the
        next token of every request that is back, then send their next steps as the next round."""
        # a request whose client left goes now, its step in flight cancelled (a hung node's, say), unless that
        # step shares its future with other requests' (the round's): then it goes when the round is back
        leaving = [r for r in self._active if r.cancelled.is_set()]
        if leaving:
            sharing = Counter(id(r.step) for r in self._active if r.step is not None)
            for request in [r for r in leaving if not self._in_round(r) or sharing[id(r.step)] == 1]:
                self._finish(request, None)
        for request in [r for r in self._active if r.step is None]:  # new: its prompt's step runs beside the rounds
            try:
                self._send([request], self._embed([request.prompt]))
            except Exception as e:  # a prompt that slipped past the checks fails its own request only
                logger.exception("a request's prompt could not be sent")
                self._finish(request, e)
        if self._round is not None and not self._round.done():  # steps back meanwhile join the round's tokens
            concurrent.futures.wait({self._round}, timeout=LEAVE_CHECK_S)
            if not self._round.done():  # a long round (a hung node): see who left, and admit, in the meantime
                return
        else:  # wake up now and then to admit new requests
            concurrent.futures.wait({r.step for r in self._active}, timeout=0.05,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        back = []
        for request in [r for r in self._active if r.step.done()]:
            out = request.step.result()[request.row]
            if isinstance(out, concurrent.futures.Future):  # left behind by its round: it comes back on its own
                request.step, request.row = out, 0
            elif isinstance(out, BaseException):
                self._finish(request, out)
            elif request.cancelled.is_set():
                self._finish(request, None)
            else:
                back.append((request, out[0, -1]))
        if back:
            self._advance(back)

    def _advance(self, back: list[tuple[Request, torch.Tensor]]) -> None:
        """Choose each request's next token from its last hidden state (one lm_head for all) and
        send the steps of those that go on; then hand out the tokens (detokenizing and streaming
        them is the nodes' time, not the round's)."""
        sampled = [row for row, (request, _) in enumerate(back) if request.needs_logits]
        with torch.no_grad():
            greedy, logits = self._choices(torch.stack([out for _, out in back]).to(self.model.device), sampled)
        columns = dict(zip(sampled, logits.unbind(1))) if sampled else {}  # each such row's logits [V]
        chosen = []  # each request whose next token was picked, and whether it goes on
        for row, (request, _) in enumerate(back):
            try:
                token = self._choose(request, columns[row]) if request.needs_logits else greedy[row]
                if request.logprobs is not None:
                    request.score = _scored(token, columns[row], request.logprobs)
            except Exception as e:  # a bug in one request's sampling ends that request only
                logger.exception("picking a request's next token failed")
                self._finish(request, e)
                continue
            request.tokens.append(token)
            if request.presence_penalty or request.frequency_penalty:
                request.counts[token] += 1
            request.step = None
            chosen.append((request, token not in self.eos_ids and len(request.tokens) < request.max_tokens))
        going_on = [request for request, more in chosen if more]
        switching = [r for r in going_on if self.rope_switch is not None and r.session.position == self.rope_switch]
        for request in switching:  # its rope switches to the long factors: all its tokens again, as transformers
            request.session.rewind(0)  # does (Phi-3), beside the round
            self._send([request], self._embed([request.prompt + request.tokens]))
        going_on = [request for request in going_on if request not in switching]
        self.counters["tokens"] += len(chosen)
        if going_on:
            self.counters["rounds"] += 1
            self.counters["round_rows"] += len(going_on)
            written = self._send(going_on, self._embed([r.tokens[-1:] for r in going_on]))
            self._round = going_on[0].step
            written.wait(SEND_WAIT_S)
        for request, more in chosen:
            stop = request.on_token(request.tokens[-1])
            if not more:
                self._finish(request, None)
            elif stop:  # a stop string: the answer is complete; the request leaves once its step is back
                self._end(request, None)
                request.cancelled.set()

    def _choices(self, last: torch.Tensor, sampled: list[int]) -> tuple[list[int], torch.Tensor | None]:
        """The final norm and the lm_head of last hidden states [N, H]: each row's greedy token, and the
        float logits [V, len(sampled)] of the rows in ``sampled`` (those that sample, or bias or penalize
        tokens: on the CPU, where each request's generator draws; None if none). A ``PackedHead`` (the CPU's
        float32 lm_head) computes the whole logits at once. A plain ``nn.Linear`` (a GPU's, or a CPU's in
        bfloat16) runs a chunk of the vocabulary at a time (``logits_chunk``), keeping each chunk's best
        token per row. Each chunk is weight @ hidden^T, which a CPU computes 1.5x as fast as hidden @
        weight^T for 4 to 32 rows."""
        head, normed = self.model.lm_head, self.model.model.norm(last)
        if type(head) is not torch.nn.Linear:  # a ``PackedHead`` reads its weight fast enough whole
            logits = head(normed).float().t()
            # max's indices are argmax's (the first of equal maxima) in 0.9 ms for 32 rows of 49152, argmax's 2.4
            return logits.max(0).indices.tolist(), logits[:, sampled].cpu() if sampled else None
        columns, step = normed.t(), logits_chunk(len(last), head.weight)
        best, where, kept = [], [], []
        for begin in range(0, head.weight.shape[0], step):
            logits = torch.mm(head.weight[begin:begin + step], columns)
            if head.bias is not None:
                logits += head.bias[begin:begin + step].unsqueeze(1)
            logits = logits.float()
            value, index = logits.max(0)  # the first of equal maxima, as argmax
            best.append(value)
            where.append(index)
            if sampled:
                kept.append(logits[:, sampled])
        chunk = torch.stack(best).argmax(0)  # [N] the chunk of each row's best token (the first, on ties)
        greedy = torch.stack(where).gather(0, chunk.unsqueeze(0))[0] + chunk * step
        return greedy.tolist(), torch.cat(kept).cpu() if sampled else None

    def _embed(self, ids: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            return self.model.model.embed_tokens(torch.tensor(ids, device=self.model.device)).cpu()

    def _send(self, requests: list[Request], hidden: torch.Tensor) -> threading.Event:
        """Start the next step of each of ``requests`` (its new tokens' embeddings, a row of ``hidden``)
        on the swarm's loop; their steps leave together, so the nodes batch them. The event is set
        once they are written to their streams (``_together``)."""
        steps = []
        for row, (request, rows) in enumerate(zip(requests, hidden.split(1))):
            start = request.session.position
            steps.append(request.session.step_async(rows, torch.arange(start, start + rows.shape[1]).unsqueeze(0)))
            request.row = row
        written = threading.Event()
        step = asyncio.run_coroutine_threadsafe(_together(steps, written), self.view.swarm.loop)
        for request in requests:
            request.step = step
        return written

    @staticmethod
    def _in_round(request: Request) -> bool:
        """Whether ``request``'s decoding step is in flight (with the round's other steps)."""
        return request.step is not None and bool(request.tokens) and not request.step.done()

    @staticmethod
    def _choose(request: Request, logits: torch.Tensor) -> int:
        """Greedy, or a sample after temperature and top-p (as transformers' warpers do them), on the
        logits with the request's bias and penalties (``_adjusted``)."""
        logits = _adjusted(request, logits)
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

    def waiting(self) -> int:
        """Requests submitted and not yet admitted (``max_active`` are generating)."""
        return self._arrivals.qsize()

    def active(self) -> int:
        return len(self._active)

    def _finish(self, request: Request, error: BaseException | None) -> None:
        self._active.remove(request)
        left = request.cancelled.is_set() and not request.ended  # its client went away (not a stop string)
        self.counters["requests_" + ("failed" if error is not None else "left" if left else "answered")] += 1
        if request.step is not None and not request.step.done():
            request.step.cancel()  # a prompt's step (or, when the loop fails, every step in flight)
        try:
            request.session.close()
        except Exception as e:  # the nodes free an abandoned session when its stream ends anyway
            logger.debug("closing a session: %s", e)
        self._end(request, error)

    @staticmethod
    def _end(request: Request, error: BaseException | None) -> None:
        """Tell the request's client its answer is complete (once)."""
        if not request.ended:
            request.ended = True
            request.on_end(error)


def _adjusted(request: Request, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` [V] with the request's logit bias added and its penalties taken off as OpenAI
    defines them: a token generated c times so far loses c x frequency_penalty, plus
    presence_penalty once c > 0 (the prompt's tokens are not counted)."""
    if not request.logit_bias and not request.counts:
        return logits
    logits = logits.clone()
    if request.logit_bias:
        if request.bias is None:
            ids, biases = zip(*request.logit_bias.items())
            request.bias = torch.tensor(ids), torch.tensor(biases, dtype=logits.dtype)
        logits.index_add_(0, *request.bias)
    if request.counts:
        ids, counts = zip(*request.counts.items())
        penalty = torch.tensor(counts, dtype=logits.dtype) * request.frequency_penalty + request.presence_penalty
        logits.index_add_(0, torch.tensor(ids), -penalty)
    return logits


def _scored(token: int, logits: torch.Tensor, top: int) -> TokenLogprob:
    """``token``'s log-probability under ``logits`` [V], and the ``top`` most likely tokens'."""
    logprobs = torch.log_softmax(logits, 0)
    best = logprobs.topk(top) if top else None
    pairs = tuple(zip(best.indices.tolist(), best.values.tolist())) if best is not None else ()
    return TokenLogprob(token, float(logprobs[token]), pairs)


def logits_chunk(rows: int, weight: torch.Tensor) -> int:
    """How many tokens of the vocabulary the lm_head ``weight`` computes at once for ``rows``
    hidden states. On a CPU, a chunk whose float logits fit ``LOGITS_CHUNK_BYTES``: a round's whole
    logits (6 MB for 32 rows of a 49k vocabulary) would not stay in its caches (32 rows on this
    2-core CPU, 512 KB of L2 a core: 21.5 instead of 31 ms at hidden 256, 34 instead of 50 at
    SmolLM2's 576; one row of a vocabulary up to 64k is one chunk). Elsewhere the whole vocabulary:
    a GPU computes a chunk in microseconds but launches each of its few kernels from Python, so 63
    chunks (32 rows of a 128k vocabulary) would cost more to start than one product to run."""
    if weight.device.type != "cpu":
        return weight.shape[0]
    return max(1, LOGITS_CHUNK_BYTES // (4 * rows))


async def _together(steps: list, written: threading.Event) -> list:
    """Await the steps on the swarm's loop; each gives its output, its exception, or, for a step
    still out once the round's first answer has taken as long again (``STRAGGLER_MIN_S`` at
    least), a future of [its outcome]: a hung or slow node holds up only the requests it serves,
    not every request's next token until its sessions fail over. ``written`` is set once each
    step has run up to its first wait, which for a session with its chain open is its answer (its
    frame was written to a stream in that turn of the loop), and the streams have flushed those
    frames (``FrameBatcher`` does it in the next turn)."""
    loop = asyncio.get_running_loop()
    began, running = loop.time(), [asyncio.ensure_future(step) for step in steps]
    try:
        await asyncio.sleep(0)  # every step runs to its first wait
        await asyncio.sleep(0)  # the flushes they queued run
        pending = set(running)
        written.set()  # the decode loop goes on
        while pending and not any(t.done() and not t.cancelled() and t.exception() is None for t in running):
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)  # failures wait on
        if pending:
            await asyncio.wait(pending, timeout=max(STRAGGLER_MIN_S, loop.time() - began))
    except asyncio.CancelledError:
        for task in running:
            task.cancel()
        raise
    finally:
        written.set()
    return [_outcome(task) if task.done() else _later(task) for task in running]


def _outcome(task: asyncio.Task):
    if task.cancelled():
        return asyncio.CancelledError()
    return task.exception() or task.result()


def _later(task: asyncio.Task) -> concurrent.futures.Future:
    """A future of [the outcome of ``task``], a step left behind by its round; cancelling it
    cancels the step."""
    future, loop = concurrent.futures.Future(), asyncio.get_running_loop()

    def settle(task: asyncio.Task) -> None:
        if future.set_running_or_notify_cancel():
            future.set_result([_outcome(task)])

    def cancel(future: concurrent.futures.Future) -> None:
        if future.cancelled() and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)

    task.add_done_callback(settle)
    future.add_done_callback(cancel)
    return future
