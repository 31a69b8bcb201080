"""The answers of `potluck serve` in OpenAI's shapes: a whole completion, its usage counts, its
tokens' log-probabilities, and the choices of one request (``n``) merged into one stream.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Sequence

from .serving import Completion, Delta, Scored, TextGenerator

Choice = tuple[int, Delta | Completion]  # a choice's index, and its next piece or its end


def whole(reply_id: str, model: str, chat: bool, dones: Sequence[Completion],
          tokens: TextGenerator | None) -> dict[str, Any]:
    """The answer of a request that is not streamed, a choice for each of ``dones``."""
    choices = []
    for index, done in enumerate(dones):
        choice: dict[str, Any] = {"index": index, "finish_reason": done.finish_reason,
                                  "logprobs": logprobs(done.logprobs, chat, tokens)}
        if chat:
            choice["message"] = {"role": "assistant", "content": done.text}
        else:
            choice["text"] = done.text
        choices.append(choice)
    return {"id": reply_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(dones)}


def usage(dones: Sequence[Completion]) -> dict[str, int]:
    """The counts of a request's choices: its prompt once, and every choice's tokens."""
    prompt, completion = dones[0].prompt_tokens, sum(done.completion_tokens for done in dones)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def logprobs(scored: Sequence[Scored], chat: bool, tokens: TextGenerator | None) -> dict | None:
    """Tokens' log-probabilities in OpenAI's shape: chat's ``content`` entries (each token's text and
    bytes from ``tokens``), or completions' four lists (``text_offset`` counted in the answer's
    text); None if not asked for (``tokens`` None) or none."""
    if tokens is None or not scored:
        return None
    text_of, bytes_of = tokens.token_text, tokens.token_bytes
    if chat:
        def entry(token: int, logprob: float) -> dict[str, Any]:
            return {"token": text_of(token), "logprob": _finite(logprob), "bytes": bytes_of(token)}
        return {"content": [entry(s.token, s.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in s.top]}
                            for s, _ in scored], "refusal": None}
    return {"tokens": [text_of(s.token) for s, _ in scored], "token_logprobs": [_finite(s.logprob) for s, _ in scored],
            "top_logprobs": [{text_of(t): _finite(lp) for t, lp in (*s.top, (s.token, s.logprob))} for s, _ in scored],
            "text_offset": [offset for _, offset in scored]}


def _finite(logprob: float) -> float:
    """A log-probability JSON can carry (OpenAI's -9999.0 for a token of no probability)."""
    return max(logprob, -9999.0)


async def merged(firsts: Sequence[asyncio.Future], streams: Sequence[AsyncIterator]) -> AsyncIterator[Choice]:
    """The choices' pieces as they come, each with its index, from each choice's first item (a
    future of it) and the rest of its stream, until every choice has ended; the first error raises.
    Closing this closes every stream (their sessions leave the batch)."""
    if len(streams) == 1:  # one choice: no task and queue in the way of each token
        try:
            item = await firsts[0]
            while True:
                yield 0, item
                if isinstance(item, Completion):
                    return
                item = await anext(streams[0])
        finally:
            await streams[0].aclose()
    arrived: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, first: asyncio.Future, stream: AsyncIterator) -> None:
        try:
            item = await first
            while True:
                arrived.put_nowait((index, item))
                if isinstance(item, Completion):
                    return
                item = await anext(stream)
        except Exception as error:  # handed on to the reader
            arrived.put_nowait((index, error))

    pumps = [asyncio.ensure_future(pump(i, first, stream)) for i, (first, stream) in enumerate(zip(firsts, streams))]
    try:
        left = len(pumps)
        while left:
            index, item = await arrived.get()
            if isinstance(item, Exception):
                raise item
            left -= isinstance(item, Completion)
            yield index, item
    finally:
        for task in [*pumps, *firsts]:
            task.cancel()
        await asyncio.gather(*pumps, *firsts, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
