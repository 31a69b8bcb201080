"""`potluck serve`: an OpenAI-compatible HTTP API whose model runs through the swarm.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (with
``stream`` as Server-Sent Events in OpenAI's chunk format, ending with ``[DONE]``). Errors use
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: unknown model 404, bad
parameters 400 naming the field, wrong API key 401, no live chain 503 naming the blocks.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, field_validator
from starlette.concurrency import run_in_threadpool

from potluck.protocol.errors import NoRoute, NodeUnavailable, PotluckError

from .serving import Completion, SamplingParams, TextGenerator


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class _Common(BaseModel):
    model: str
    max_tokens: int = Field(256, ge=1, le=32768)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and (len(stop) > 4 or not all(stop)):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stop

    def sampling(self) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(self.max_tokens, self.temperature, self.top_p, stop, self.seed)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str
    max_tokens: int = Field(16, ge=1, le=32768)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _swarm_error(error: PotluckError) -> ApiError:
    if isinstance(error, (NoRoute, NodeUnavailable)):
        return ApiError(503, f"the swarm cannot serve this model right now: {error}", "service_unavailable",
                        code="no_live_chain")
    return ApiError(502, f"the swarm refused the request: {error}", "api_error", code=type(error).__name__)


def create_app(generator: TextGenerator, api_key: str | None = None) -> FastAPI:
    async def check_key(request: Request) -> None:
        # a dependency of every route, not an HTTP middleware: those relay each streamed chunk through a task
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise ApiError(401, "incorrect API key provided", "invalid_request_error", code="invalid_api_key")

    app = FastAPI(title="Potluck", description="OpenAI-compatible API over a Potluck swarm",
                  dependencies=[Depends(check_key)])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body")
        return ApiError(400, f"{param}: {first['msg']}", "invalid_request_error", param=param,
                        code="invalid_value").response()

    @app.get("/v1/models")
    async def models() -> dict:
        try:
            view = generator.model.swarm_view
            await run_in_threadpool(view.swarm.call, view.route())
            served = [{"id": generator.name, "object": "model", "created": 0, "owned_by": "potluck"}]
        except PotluckError:
            served = []  # not every block has a live node right now
        return {"object": "list", "data": served}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        check_model(body.model)
        ids = generator.chat_ids([m.model_dump() for m in body.messages])
        return await respond(body, ids, chat=True)

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest):
        check_model(body.model)
        return await respond(body, generator.text_ids(body.prompt), chat=False)

    def check_model(name: str) -> None:
        if name != generator.name:
            raise ApiError(404, f"the model {name!r} does not exist here; this server runs {generator.name!r}",
                           "invalid_request_error", param="model", code="model_not_found")

    async def respond(body: _Common, ids: list[int], chat: bool):
        if len(ids) + body.max_tokens > generator.max_length:
            raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens exceeds the model's "
                           f"{generator.max_length}", "invalid_request_error", param="max_tokens")
        stream = generator.stream(ids, body.sampling())
        try:
            first = await anext(stream)  # errors before the first token become proper HTTP errors
        except PotluckError as error:
            raise _swarm_error(error) from None
        reply_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if body.stream:
            return StreamingResponse(_sse(reply_id, body.model, chat, first, stream), media_type="text/event-stream")
        parts = [first]
        try:
            async for item in stream:
                parts.append(item)
        except PotluckError as error:  # the swarm lost every replica of some block mid-answer
            raise _swarm_error(error) from None
        done: Completion = parts[-1]
        return _whole(reply_id, body.model, chat, done)

    return app


def _whole(reply_id: str, model: str, chat: bool, done: Completion) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": done.finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": done.text}
    else:
        choice["text"] = done.text
    return {"id": reply_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": _usage(done)}


def _usage(done: Completion) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


async def _sse(reply_id: str, model: str, chat: bool, first, stream: AsyncIterator) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(text: str | None, finish: str | None, role: bool = False, usage: dict | None = None) -> str:
        if chat:
            delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        payload = {"id": reply_id, "object": "chat.completion.chunk" if chat else "text_completion",
                   "created": created, "model": model, "choices": [choice]}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    try:
        if chat:
            yield chunk(None, None, role=True)
        item = first
        while True:
            if isinstance(item, Completion):
                yield chunk(None, item.finish_reason, usage=_usage(item))
                break
            yield chunk(item, None)
            item = await anext(stream)
        yield "data: [DONE]\n\n"
    except PotluckError as error:
        api = _swarm_error(error)
        yield f"data: {json.dumps({'error': {'message': str(api), 'type': api.kind, 'code': api.code}})}\n\n"
    finally:
        await stream.aclose()  # a client that left stops the generation and frees its session
