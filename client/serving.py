"""Text generation for the HTTP API: every request in its own inference session, advanced together.

``TextGenerator.stream`` hands a request to the ``DecodeLoop`` (one round per token for all
requests at once) and yields text deltas (each with the log-probabilities of the tokens whose text
it completes, when asked for), then a ``Completion``. Stop strings are held back
until they can be ruled out, so a client never sees part of one; a request that is abandoned
(client gone) leaves the loop at the next round, which closes its session on the nodes.
"""
from __future__ import annotations

import asyncio
import functools
import os
from dataclasses import dataclass
from typing import AsyncIterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .decode_loop import DecodeLoop, Request, TokenLogprob


_BYTE_OF = {char: byte for byte, char in bytes_to_unicode().items()}  # byte-level BPE's alphabet, reversed
GREEDY_BELOW = 1e-5  # a lower temperature is greedy decoding: the logits divided by it could overflow to inf


class PromptError(ValueError):
    """A prompt the model cannot take; ``param``: the request's field to change."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's: -2 to 2, on tokens generated so far
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely tokens'


Scored = tuple[TokenLogprob, int]  # a token's log-probabilities, and where its text starts in the answer


@dataclass(frozen=True)
class Delta:
    """The next piece of an answer's text, and the scores of the tokens whose text it completes."""

    text: str
    logprobs: tuple[Scored, ...] = ()


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (end of text or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[Scored, ...] = ()  # with ``logprobs`` asked for: the answer's tokens'


class _DeltaStreamer:
    """Decodes generated tokens incrementally; emits text that cannot be the start of a stop string,
    with the scores (``add``'s) of the tokens whose text it completes; the answer's last piece
    (``end``) carries the scores of the rest of its tokens (a token that starts inside a stop string has none,
    one that holds only part of a character starts where that character would).
    Each token decodes only the ids since the last text it gave, with the ids of that text before
    them as context (so that spaces and merges come out as in the whole text): a token costs the
    same however long the answer (a whole decode per token cost 0.14 ms at 256 tokens, 32 requests
    at once paying it in every round). The answer's text is the whole decode, once at the end: a
    tokenizer that cleans up spaces across tokens (transformers does so for WordPiece ones, as
    BERT's) can change text already streamed, which no stream can take back."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...], emit):
        self.tokenizer, self.stop, self.emit = tokenizer, stop, emit
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already emitted
        self.text = ""
        self.stopped = False  # a stop string appeared
        self._context = self._read = 0  # ids[_context:_read] gave the end of ``text``; ids[_read:] none yet
        self.scored: list[Scored] = []  # each scored token whose text is in ``text``, and where it starts
        self._waiting: list[TokenLogprob] = []  # scores of tokens whose text has not come out yet
        self._released = 0  # how many of ``scored`` were emitted

    def add(self, ids: list[int], score: TokenLogprob | None = None) -> None:
        if self.stopped:
            return
        self.ids.extend(ids)
        if score is not None:
            self._waiting.append(score)
        before = self._decode(self.ids[self._context:self._read])
        after = self._decode(self.ids[self._context:])
        if after.endswith("\ufffd"):
            return  # half of a multi-byte character: wait for the rest
        start, piece = len(self.text), after[len(before):]
        text = self.text = self.text + piece
        for n, waiting in enumerate(self._waiting):  # several: the first ones held parts of a character
            own = self._decode(self.ids[self._context:self._read + n])[len(before):] if n else ""
            self.scored.append((waiting, start + len(os.path.commonprefix([own, piece]))))
        self._waiting.clear()
        self._context, self._read = self._read, len(self.ids)
        cut = min((i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            self._send(cut)
            return
        self._send(len(text) - max((_held(text, s) for s in self.stop), default=0))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _send(self, upto: int, last: bool = False) -> None:
        released = self._release(upto, last)
        if upto > self.sent or released:
            self.emit(self.text[self.sent:upto], released)
            self.sent = upto

    def _release(self, upto: int, last: bool) -> tuple[Scored, ...]:
        """The scored tokens not emitted yet whose text ends by ``upto``; ``last``: all of them,
        but after a stop string only those whose text starts before it."""
        first = done = self._released
        while done < len(self.scored):
            start = self.scored[done][1]
            end = self.scored[done + 1][1] if done + 1 < len(self.scored) else len(self.text)
            if (start >= upto or end > upto) and not (last and (start < upto or not self.stopped)):
                break
            done += 1
        self._released = done
        return tuple(self.scored[first:done])

    @property
    def logprobs(self) -> list[Scored]:
        """The scored tokens emitted, in order."""
        return self.scored[:self._released]

    def end(self) -> None:
        whole = self._decode(self.ids)
        if not (self.stopped or whole.endswith("\ufffd")):  # an answer cut in a character ends before it
            self.text = whole
        self.scored.extend((waiting, len(self.text)) for waiting in self._waiting)  # parts of a character cut off
        self._waiting.clear()
        self._send(len(self.text), last=True)


def _held(text: str, stop: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``stop`` (held back until
    the next tokens tell). Only where ``stop``'s first character occurs is a match tried, each in
    one string comparison."""
    tail = text[max(0, len(text) - len(stop) + 1):] if len(stop) > 1 else ""
    start = tail.find(stop[0]) if tail else -1
    while start >= 0:
        if stop.startswith(tail[start:]):
            return len(tail) - start  # the earliest start is the longest match
        start = tail.find(stop[0], start + 1)
    return 0


class TextGenerator:
    """A swarm model and its tokenizer, shared by all requests (each in its own session)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, max_active: int = 64):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_length = getattr(model.config, "max_position_embeddings", 4096)
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.loop = DecodeLoop(model, self.eos_ids, max_active)
        self._token_texts: dict[int, str] = {}

    def chat_ids(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise PromptError(f"{self.name}'s tokenizer has no chat template, so messages cannot be put into tokens: "
                              "use /v1/completions with a prompt", "messages")
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return list(encoded["input_ids"])

    def text_ids(self, prompt: str | list[int]) -> list[int]:
        """A completion prompt's token ids: a text's, or ids given as they are (each checked)."""
        if isinstance(prompt, str):
            return self.tokenizer(prompt)["input_ids"]
        vocab = self.model.config.vocab_size
        if any(not 0 <= token < vocab for token in prompt):
            raise PromptError(f"token ids must be from 0 to {vocab - 1} (this model's vocabulary)", "prompt")
        return list(prompt)

    def check_prompt(self, prompt_ids: list[int], max_tokens: int) -> None:
        """PromptError unless the prompt has tokens, and room for ``max_tokens`` after it."""
        if not prompt_ids:
            raise PromptError("the prompt holds no tokens; give at least one", "prompt")
        if len(prompt_ids) >= self.max_length:
            raise PromptError(f"the prompt ({len(prompt_ids)} tokens) leaves no room in the model's "
                              f"{self.max_length} positions", "prompt")
        if len(prompt_ids) + max_tokens > self.max_length:
            raise PromptError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                              f"{self.max_length} positions", "max_tokens")

    def token_text(self, token: int) -> str:
        """One token's text, special tokens too (for log-probabilities), remembered once made. It is
        decoded after another token: alone, a SentencePiece word's leading space would be dropped."""
        text = self._token_texts.get(token)
        if text is None:
            anchor, before = self._anchor
            after = self.tokenizer.decode(anchor + [token])
            text = after[len(before):] if after.startswith(before) else self.tokenizer.decode([token])
            self._token_texts[token] = text
        return text

    @functools.cached_property
    def _anchor(self) -> tuple[list[int], str]:
        """The ids ``token_text`` decodes a token after, and their own text."""
        anchor = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        return anchor, self.tokenizer.decode(anchor)

    def token_bytes(self, token: int) -> list[int] | None:
        """One token's bytes, which for a token holding part of a character are not its text's: read
        from a byte-level BPE's pieces (GPT-2's alphabet) or a byte-fallback piece (<0xHH>); None
        where neither tells."""
        text = self.token_text(token)
        if "\ufffd" not in text:
            return list(text.encode())
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return [int(piece[3:5], 16)]
        decoder = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "decoder", None)
        if isinstance(piece, str) and type(decoder).__name__ == "ByteLevel" and all(c in _BYTE_OF for c in piece):
            return [_BYTE_OF[c] for c in piece]
        return None

    def check_sampling(self, params: SamplingParams) -> None:
        """PromptError unless every token the request biases is in the model's vocabulary."""
        vocab = self.model.config.vocab_size
        for token, _ in params.logit_bias:
            if token >= vocab:
                raise PromptError(f"token {token} is not in this model's vocabulary (ids 0 to {vocab - 1})",
                                  "logit_bias")

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta | Completion]:
        self.check_prompt(prompt_ids, params.max_tokens)
        loop, answers = asyncio.get_running_loop(), asyncio.Queue()
        def put(item) -> None:  # from the decode loop's thread
            try:
                loop.call_soon_threadsafe(answers.put_nowait, item)
            except RuntimeError:  # the server's loop closed (it stopped): nobody reads the answer any more
                pass
        streamer = _DeltaStreamer(self.tokenizer, params.stop, lambda text, scored: put(Delta(text, scored)))

        def on_token(token: int) -> bool:
            scored = params.logprobs is not None and token not in self.eos_ids  # the end of text has no entry
            streamer.add([token], request.score if scored else None)
            return streamer.stopped

        def on_end(error: BaseException | None) -> None:
            if error is not None:
                put(error)
                return
            streamer.end()
            tokens = request.tokens
            ended = bool(tokens) and tokens[-1] in self.eos_ids
            count = len(streamer.ids) if streamer.stopped else len(tokens)
            put(Completion(streamer.text, "stop" if streamer.stopped or ended else "length", len(prompt_ids), count,
                           tuple(streamer.logprobs)))

        generator = torch.Generator()  # the request's own: a seed gives the same text whoever else is served
        if params.seed is not None:
            generator.manual_seed(params.seed)
        else:
            generator.seed()
        temperature = params.temperature if params.temperature >= GREEDY_BELOW else 0.0
        request = Request(prompt_ids, params.max_tokens, temperature, params.top_p, generator, on_token, on_end,
                          params.presence_penalty, params.frequency_penalty, dict(params.logit_bias), params.logprobs)
        self.loop.submit(request)
        try:
            while True:
                item = await answers.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Completion):
                    break
        finally:
            request.cancelled.set()  # the client left, or we are done: it leaves the loop at the next round

    def close(self) -> None:
        self.loop.close()
