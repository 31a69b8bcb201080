"""Text generation for the HTTP API: one inference session per request, text streamed as it comes.

``TextGenerator.stream`` runs transformers' ``generate`` through the swarm on a worker thread and
yields text deltas, then a ``Completion``. Stop strings are held back until they can be ruled
out, so a client never sees part of one; a request that is abandoned (client gone) stops its
generation at the next token, which closes its session on the nodes.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

_SEEDED = threading.Lock()  # sampling uses torch's global generator: seeded requests take turns


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (end of text or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


class _DeltaStreamer(BaseStreamer):
    """Decodes generated tokens incrementally; emits text that cannot be the start of a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...], emit):
        self.tokenizer, self.stop, self.emit = tokenizer, stop, emit
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already emitted
        self.text = ""
        self.stopped = False  # a stop string appeared
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt
            self._prompt_seen = True
            return
        if self.stopped:
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # half of a multi-byte character: wait for the rest
        self.text = text
        cut = min((i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            self._send(cut)
            return
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._send(len(text) - hold)

    def _send(self, upto: int) -> None:
        if upto > self.sent:
            self.emit(self.text[self.sent:upto])
            self.sent = upto

    def end(self) -> None:
        self._send(len(self.text))


class _StopWhen(StoppingCriteria):
    def __init__(self, condition):
        self.condition = condition

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.condition(), dtype=torch.bool, device=input_ids.device)


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """With a seed: this request alone samples (torch's global generator), from that seed."""
    if seed is None:
        yield
        return
    with _SEEDED:
        torch.manual_seed(seed)
        yield


class TextGenerator:
    """A swarm model and its tokenizer, shared by all requests (each in its own session)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, workers: int = 32):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_length = getattr(model.config, "max_position_embeddings", 4096)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="potluck-generate")
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    def chat_ids(self, messages: list[dict]) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return list(encoded["input_ids"])

    def text_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[str | Completion]:
        loop, queue, cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        put = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731
        job = loop.run_in_executor(self._executor, self._generate, prompt_ids, params, cancel, put)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Completion):
                    break
        finally:
            cancel.set()  # the client left, or we are done: stop at the next token
            await asyncio.shield(job)

    def _generate(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event, put) -> None:
        try:
            put(self._run(prompt_ids, params, cancel, put))
        except BaseException as e:  # handed to the request's coroutine, which raises it there
            put(e)

    def _run(self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event, put) -> Completion:
        ids = torch.tensor([prompt_ids])
        streamer = _DeltaStreamer(self.tokenizer, params.stop, put)
        sampling = {"do_sample": False} if params.temperature == 0 else {
            "do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        stopping = StoppingCriteriaList([_StopWhen(lambda: cancel.is_set() or streamer.stopped)])
        with _seeded(params.seed), self.model.inference_session(len(prompt_ids) + params.max_tokens):
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_tokens,
                                      streamer=streamer, stopping_criteria=stopping,
                                      pad_token_id=next(iter(self.eos_ids), None), **sampling)
        new = out[0, len(prompt_ids):].tolist()
        ended = bool(new) and new[-1] in self.eos_ids
        tokens = len(streamer.ids) if streamer.stopped else len(new)
        finish = "stop" if streamer.stopped or ended else "length"
        return Completion(streamer.text, finish, len(prompt_ids), tokens)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
