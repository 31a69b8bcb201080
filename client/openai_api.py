"""`potluck serve`: an OpenAI-compatible HTTP API whose model runs through the swarm.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (with
``stream`` as Server-Sent Events in OpenAI's chunk format, ending with ``[DONE]``). Errors use
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: unknown model 404, bad
parameters 400 naming the field (parameters this server does not implement too, unless left
"off": no answer silently lacks what was asked for), wrong API key 401, no live chain 503 naming
the blocks, unknown paths 404, a bug 500.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import replace
from typing import AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from potluck.protocol.errors import NoRoute, NodeUnavailable, PotluckError

from .openai_schema import ChatRequest, CompletionRequest, OpenAIRequest
from . import openai_replies as replies
from .serve_metrics import ServeMetrics
from .serving import Completion, PromptError, Scored, TextGenerator

logger = logging.getLogger(__name__)
BODY_BYTES, BODY_BYTES_PER_POSITION = 1 << 20, 64  # the largest request body: 1 MiB and 64 bytes a position
MAX_LOGPROBS = 1 << 17  # log-probabilities in one answer (about 12 MB of JSON)
DISCONNECT_CHECK_S = 0.5  # how often a whole (not streamed) answer checks that its client is still there
UNREADABLE_BODY = "There was an error parsing the body"  # FastAPI's 400 for a body it cannot decode (not UTF-8)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=headers)


def _prompt_error(error: PromptError, chat: bool) -> ApiError:
    param = "messages" if chat and error.param == "prompt" else error.param
    return ApiError(400, f"{param}: {error}", "invalid_request_error", param=param, code="invalid_value")


def _internal(error: Exception) -> ApiError:
    """A bug in this server: the client hears its name, the server goes on serving."""
    return ApiError(500, f"internal error in the server: {type(error).__name__}: {error}", "server_error",
                    code="internal_error")


def _swarm_error(error: PotluckError) -> ApiError:
    if isinstance(error, (NoRoute, NodeUnavailable)):
        return ApiError(503, f"the swarm cannot serve this model right now: {error}", "service_unavailable",
                        code="no_live_chain")
    return ApiError(502, f"the swarm refused the request: {error}", "api_error", code=type(error).__name__)


async def _abandon(firsts: list[asyncio.Future], streams: list[AsyncIterator]) -> None:
    """Stop the choices of an answer that will not be given: their requests leave the loop."""
    for first in firsts:
        first.cancel()
    await asyncio.gather(*firsts, return_exceptions=True)
    for stream in streams:
        await stream.aclose()


def _seed(seed: int, choice: int) -> int:
    """Choice ``choice``'s seed: ``seed`` + ``choice``, wrapped past the largest seed a generator takes."""
    return seed + choice if seed + choice < 1 << 64 else seed + choice - (1 << 64)


def create_app(generator: TextGenerator, api_key: str | None = None, allowed_origins: Sequence[str] = ()) -> FastAPI:
    app = FastAPI(title="Potluck", description="OpenAI-compatible API over a Potluck swarm")
    app.add_middleware(BodyLimit, limit=BODY_BYTES + BODY_BYTES_PER_POSITION * generator.max_length)
    if api_key is not None:  # outside the body limit: a caller without the key learns nothing more
        app.add_middleware(KeyCheck, key=api_key)
    if allowed_origins:  # an ASGI middleware: it answers preflights itself and adds headers, per response
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first["type"] == "json_invalid":  # its location is a character of the body, not a field
            return ApiError(400, f"the request body is not valid JSON ({first['msg']} at character "
                                 f"{first['loc'][-1]})", "invalid_request_error", code="invalid_json").response()
        param = ".".join(str(p) for p in first["loc"] if p != "body")
        if not param:  # the body as a whole
            return ApiError(400, "the request body must be a JSON object (sent with Content-Type: "
                                 "application/json)", "invalid_request_error", code="invalid_body").response()
        message = first["msg"].removeprefix("Value error, ")
        return ApiError(400, f"{param}: {message}", "invalid_request_error", param=param,
                        code="invalid_value").response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 400 and error.detail == UNREADABLE_BODY:  # bytes that are not text (UTF-8)
            return ApiError(400, "the request body is not valid JSON (it is not UTF-8 text)", "invalid_request_error",
                            code="invalid_json").response()
        message = {404: f"there is no {request.url.path} here (endpoints: GET /v1/models, POST "
                        f"/v1/chat/completions, POST /v1/completions)",
                   405: f"{request.url.path} does not take {request.method}"}.get(error.status_code, error.detail)
        return ApiError(error.status_code, message, "invalid_request_error",
                        code=str(error.detail).lower().replace(" ", "_")).response(error.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        return _internal(error).response()

    async def routed() -> None:
        """Raises the routing error (a PotluckError) unless a live chain serves the model now."""
        view = generator.model.swarm_view
        await run_in_threadpool(view.swarm.call, view.route())

    @app.get("/v1/models")
    async def models() -> dict:
        try:
            await routed()
            served = [{"id": generator.name, "object": "model", "created": 0, "owned_by": "potluck"}]
        except PotluckError:
            served = []  # not every block has a live node right now
        return {"object": "list", "data": served}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        check_model(name)
        try:  # as the list says: a model no live chain serves now is not there (503 says why)
            await routed()
        except PotluckError as error:
            raise _swarm_error(error) from None
        return {"id": generator.name, "object": "model", "created": 0, "owned_by": "potluck"}

    page = ServeMetrics(generator)

    @app.get("/metrics")
    async def metrics() -> Response:  # Prometheus's text format: requests active and waiting, tokens, rounds
        return page.response()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_model(body.model)
        # tokenizing runs beside the event loop: a huge prompt does not hold up the answers streaming
        try:
            ids = await run_in_threadpool(generator.chat_ids, [m.model_dump() for m in body.messages])
        except PromptError as error:
            raise _prompt_error(error, chat=True) from None
        return await respond(body, ids, True, request)

    @app.post("/v1/completions")
    async def complete(body: CompletionRequest, request: Request):
        check_model(body.model)
        try:
            ids = await run_in_threadpool(generator.text_ids, body.prompt)
        except PromptError as error:
            raise _prompt_error(error, chat=False) from None
        return await respond(body, ids, False, request)

    def check_model(name: str) -> None:
        if name != generator.name:
            raise ApiError(404, f"the model {name!r} does not exist here; this server runs {generator.name!r}",
                           "invalid_request_error", param="model", code="model_not_found")

    async def respond(body: OpenAIRequest, ids: list[int], chat: bool, request: Request):
        max_tokens = body.requested_tokens()
        per_token = (body.n or 1) * ((body.logprob_count() or 0) + 1)  # log-probabilities a token of the answer has
        if max_tokens is None:  # as many as asked by default, or as fit after the prompt (and the log-probabilities)
            room = generator.max_length - len(ids)
            if body.logprob_count() is not None:
                room = min(room, MAX_LOGPROBS // per_token)
            max_tokens = max(1, room if body.default_tokens is None else min(body.default_tokens, room))
        params = body.sampling(max_tokens)
        try:
            generator.check_prompt(ids, max_tokens)
            generator.check_sampling(params)
        except PromptError as error:
            raise _prompt_error(error, chat) from None
        if params.logprobs is not None and max_tokens * per_token > MAX_LOGPROBS:  # an answer of a gigabyte
            raise ApiError(400, f"max_tokens: {max_tokens} tokens x {per_token} log-probabilities each (n x (1 + the "
                                f"most likely tokens asked for)) is over {MAX_LOGPROBS}: ask for fewer",
                           "invalid_request_error", param="max_tokens", code="invalid_value")
        # each of the n choices is a request of its own in the batch; choice i samples with seed + i
        streams = [generator.stream(ids, params if params.seed is None else replace(params, seed=_seed(params.seed, i)))
                   for i in range(body.n or 1)]
        firsts = [asyncio.ensure_future(anext(stream)) for stream in streams]
        while not any(first.done() for first in firsts):  # the answer starts with any choice's first piece
            await asyncio.wait(firsts, timeout=DISCONNECT_CHECK_S, return_when=asyncio.FIRST_COMPLETED)
            if not any(first.done() for first in firsts) and await request.is_disconnected():
                await _abandon(firsts, streams)  # waiting for a place: it leaves without one
                return JSONResponse({}, status_code=499)
        failed = next((f.exception() for f in firsts if f.done() and f.exception() is not None), None)
        if failed is not None:  # errors before the first token become proper HTTP errors
            await _abandon(firsts, streams)
            if isinstance(failed, PotluckError):
                raise _swarm_error(failed) from None
            raise failed
        choices = replies.merged(firsts, streams)
        reply_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        tokens = generator if params.logprobs is not None else None  # the tokens' texts, for log-probabilities
        if body.stream:
            return StreamingResponse(_sse(reply_id, body.model, chat, choices, len(streams), body.include_usage,
                                          tokens), media_type="text/event-stream")
        dones: list[Completion | None] = [None] * len(streams)

        async def rest() -> None:
            async for index, item in choices:
                if isinstance(item, Completion):
                    dones[index] = item

        collecting = asyncio.ensure_future(rest())
        try:
            while not collecting.done():  # a client that leaves frees its place in the batch, as a stream's does
                await asyncio.wait({collecting}, timeout=DISCONNECT_CHECK_S)
                if not collecting.done() and await request.is_disconnected():
                    collecting.cancel()
                    await asyncio.gather(collecting, return_exceptions=True)
                    await choices.aclose()
                    return JSONResponse({}, status_code=499)  # nobody reads it
            collecting.result()
        except PotluckError as error:  # the swarm lost every replica of some block mid-answer
            raise _swarm_error(error) from None
        finally:
            await choices.aclose()
        return replies.whole(reply_id, body.model, chat, dones, tokens)

    return app


class KeyCheck:
    """Refuses a request without the API key with a 401 before anything else is done with it (its
    body is not read, so a bad body does not answer first). A pure ASGI middleware: streamed
    answers pass it untouched (Starlette's HTTP middlewares relay each chunk through a task)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        given = dict(scope.get("headers", ())).get(b"authorization", b"") if scope["type"] == "http" else None
        if given is not None and not hmac.compare_digest(given, self.expected):  # in a time that tells nothing
            refusal = ApiError(401, "incorrect API key provided", "invalid_request_error", code="invalid_api_key")
            return await refusal.response()(scope, _nothing_more, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """Refuses a request body larger than ``limit`` bytes with a 413, before it is read whole: no
    prompt that big fits the model's positions, and reading, parsing and tokenizing one took
    gigabytes (a 300 MB body got serve killed for memory). A pure ASGI middleware, so streamed
    answers pass it untouched."""

    class TooLarge(Exception):
        pass

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, send)
        received, over, answered = 0, False, False

        async def counted():
            nonlocal received, over
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # a body sent without its length (chunked): read no further
                over = True
                raise BodyLimit.TooLarge
            return message

        async def answer(message):
            nonlocal answered
            if over:  # whatever the app made of the cut body, the answer is the 413
                if not answered:
                    answered = True
                    await self._refuse(scope, send)
                return
            answered = True
            await send(message)

        try:
            await self.app(scope, counted, answer)
        except BodyLimit.TooLarge:
            pass
        if over and not answered:
            await self._refuse(scope, send)

    async def _refuse(self, scope, send) -> None:
        refusal = ApiError(413, f"the request body is over {self.limit} bytes: no prompt that long fits the model's "
                                "positions", "invalid_request_error", code="request_too_large")
        await refusal.response()(scope, _nothing_more, send)


async def _nothing_more() -> dict:
    return {"type": "http.disconnect"}


async def _sse(reply_id: str, model: str, chat: bool, choices: AsyncIterator[replies.Choice], count: int,
               include_usage: bool, tokens: TextGenerator | None = None) -> AsyncIterator[str]:
    """The answer as OpenAI's chunks, each choice's pieces as they come; with ``include_usage``
    every chunk has ``usage`` null, and a last one with no choices holds the counts; with
    ``tokens`` (logprobs asked for) each chunk has its tokens' log-probabilities."""
    created = int(time.time())

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False,
              scored: Sequence[Scored] = ()) -> str:
        logprobs = replies.logprobs(scored, chat, tokens)
        if chat:
            delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        return event([choice])

    def event(choices: list, usage: dict | None = None) -> str:
        payload = {"id": reply_id, "object": "chat.completion.chunk" if chat else "text_completion",
                   "created": created, "model": model, "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    try:
        if chat:
            for index in range(count):
                yield chunk(index, None, None, role=True)
        dones: list[Completion] = []
        async for index, item in choices:
            if isinstance(item, Completion):
                dones.append(item)
                yield chunk(index, None, item.finish_reason)
            else:
                yield chunk(index, item.text, None, scored=item.logprobs)
        if include_usage:
            yield event([], replies.usage(dones))
        yield "data: [DONE]\n\n"
    except Exception as error:  # the swarm lost every replica of some block mid-answer (or a bug): said in the stream
        if not isinstance(error, PotluckError):
            logger.error("a streamed answer failed", exc_info=error)  # uvicorn logs those raised before the stream
        api = _swarm_error(error) if isinstance(error, PotluckError) else _internal(error)
        yield f"data: {json.dumps({'error': {'message': str(api), 'type': api.kind, 'code': api.code}})}\n\n"
    finally:
        await choices.aclose()  # a client that left stops the generation and frees its sessions
