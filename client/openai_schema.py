"""The request bodies `potluck serve` takes, as OpenAI's API defines them, checked field by field.

A field left out or sent as ``null`` takes its default. What this server does not implement is
refused by name unless left at what means "off", so no answer silently lacks what was asked for.
Text must be valid Unicode (a lone surrogate, which JSON can carry, is refused here rather than
failing in the tokenizer).
"""
from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, StrictBool, ValidationInfo, field_validator

from .serving import SamplingParams

UNSUPPORTED = "is not supported by this server; leave it out"
OFF = (None, False, 0, "", [], {}, {"type": "text"}, "none", "auto", ["text"])  # what leaves a feature off
MAX_STOP_CHARS = 256  # each stop string is matched against the tail of the text at every token
Penalty = Annotated[float, Field(strict=True, ge=-2.0, le=2.0)]  # strict: "1" or true is no number here
MAX_CHOICES = 16  # choices of one request (n): each is a request of its own in the batch
MAX_LOGIT_BIAS = 1024  # tokens a request may bias: each is added to its logits at every token


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds a lone surrogate: not valid Unicode text") from None
    return text


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str  # a string, or parts of text, joined; images and audio are not taken

    @field_validator("content", mode="before")  # before pydantic's own check: errors name the field, not a type
    @classmethod
    def _text_only(cls, content: Any) -> str:
        if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                             and isinstance(part.get("text"), str) for part in content):
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise ValueError('takes text only: a string, or parts {"type": "text", "text": ...}')
        return _unicode(content)


class StreamOptions(BaseModel):
    include_usage: bool | None = None  # a last chunk with no choices and the usage counts


class OpenAIRequest(BaseModel):
    model: str
    max_tokens: int | None = Field(None, ge=1, le=32768)
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # default 1; 0 (or below 1e-5): greedy
    top_p: float | None = Field(None, ge=0.0, le=1.0)  # 0, as in OpenAI: the most likely token only
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)  # what a torch generator takes
    n: Annotated[int, Field(strict=True, ge=1, le=MAX_CHOICES)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, Annotated[float, Field(strict=True)]] | None = None  # token id (a string) -> -100 to 100
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None

    default_tokens: ClassVar[int | None] = None  # max_tokens when the client gives none (None: as many as fit)

    @field_validator("tools", "tool_choice", "functions", "function_call", "response_format", "modalities", "audio",
                     "echo", "suffix", check_fields=False)  # some are chat's or completions' only
    @classmethod
    def _not_asked_for(cls, value: Any) -> Any:
        if value not in OFF:
            raise ValueError(UNSUPPORTED)
        return value

    @field_validator("stream_options")
    @classmethod
    def _when_streaming(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("needs stream: true")
        return options

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if len(bias or {}) > MAX_LOGIT_BIAS:
            raise ValueError(f"takes at most {MAX_LOGIT_BIAS} tokens")
        seen = set()
        for key, value in (bias or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"keys are token ids written as whole numbers; {key[:20]!r} is not one")
            if int(key) in seen:
                raise ValueError(f"names token {int(key)} twice")
            seen.add(int(key))
            if not (math.isfinite(value) and -100 <= value <= 100):
                raise ValueError(f"biases are from -100 to 100; token {key} has {value}")
        return bias

    @field_validator("best_of", check_fields=False)  # completions'
    @classmethod
    def _one_choice(cls, count: int | None, info: ValidationInfo) -> int | None:
        if count not in (None, 1):
            raise ValueError(f"only {info.field_name}=1 is supported")
        return count

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or not all(0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"takes at most 4 strings, each of 1 to {MAX_STOP_CHARS} characters")
        for s in stops:
            _unicode(s)
        return stop

    def requested_tokens(self) -> int | None:
        """The limit on new tokens the client asked for; None if it gave none."""
        return self.max_tokens

    def sampling(self, max_tokens: int) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        temperature = 1.0 if self.temperature is None else self.temperature
        bias = tuple((int(token), value) for token, value in (self.logit_bias or {}).items())
        return SamplingParams(max_tokens, temperature, 1.0 if self.top_p is None else self.top_p, stop, self.seed,
                              self.presence_penalty or 0.0, self.frequency_penalty or 0.0, bias, self.logprob_count())

    def logprob_count(self) -> int | None:
        """None: no log-probabilities asked for; k: each token's, and the k most likely tokens'."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(OpenAIRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=32768)  # OpenAI's newer name for max_tokens
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=20)] | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, count: int | None, info: ValidationInfo) -> int | None:
        if count is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return count

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(OpenAIRequest):
    prompt: str | list[int] | list[str] | list[list[int]]  # one prompt: a text or token ids, or a list of one
    logprobs: Annotated[int, Field(strict=True, ge=0, le=5)] | None = None  # each token's, and this many best
    top_logprobs: Any = None  # chat's: refused here, where logprobs says how many
    echo: Any = None
    best_of: int | None = None
    suffix: Any = None

    default_tokens: ClassVar[int | None] = 16  # as OpenAI's completions

    def logprob_count(self) -> int | None:
        return self.logprobs

    @field_validator("top_logprobs")
    @classmethod
    def _chats_only(cls, value: Any) -> Any:
        if value not in OFF:
            raise ValueError("is chat's; completions take logprobs: N (up to 5)")
        return value

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("takes one prompt per request (a text or a list of token ids)")
            prompt = prompt[0]
        return _unicode(prompt) if isinstance(prompt, str) else prompt
