"""The HTTP layer of ``tunex serve``: OpenAI's chat completions, completions and models endpoints.

Built on starlette (ASGI, served by uvicorn): its ``StreamingResponse`` sends server-sent events as
they are made and cancels the stream when the client disconnects, which is how a streaming job is
cancelled. Every handler only checks the request, queues a :class:`tunex.serve.Job` and turns its
events into JSON; generation itself runs on the engine's worker thread. Errors are OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, with a 4xx status for a bad request; one log
line per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tunex.serve.engine import Engine, Job, JobResult, ServeError

log = logging.getLogger("tunex.serve")

ERROR_TYPES = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}


def error(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def create_app(engine: Engine, api_key: str | None = None) -> Starlette:
    """The ASGI app serving ``engine``; with ``api_key`` every /v1 route needs ``Authorization: Bearer KEY``."""

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "queued": engine.pending(), "running": engine.running()})

    async def models(request: Request) -> Response:
        created = int(time.time())
        data = [{"id": m, "object": "model", "created": created, "owned_by": "tunex"} for m in engine.models()]
        return JSONResponse({"object": "list", "data": data})

    async def chat_completions(request: Request) -> Response:
        body = await _json_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ServeError("messages: a non-empty list of {role, content} messages is required", param="messages")
        plain = [_plain_message(i, m) for i, m in enumerate(messages)]
        model, adapter = _model(body)
        prompt_ids = engine.chat_prompt(plain)
        job = _job(body, prompt_ids, adapter, chat=True)
        return await _answer(request, body, job, model, "chat.completion")

    async def completions(request: Request) -> Response:
        body = await _json_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ServeError(
                "prompt: one string is required (token-id and multi-prompt lists are not served)", param="prompt"
            )
        model, adapter = _model(body)
        job = _job(body, engine.text_prompt(prompt), adapter, chat=False)
        return await _answer(request, body, job, model, "text_completion")

    def _model(body: dict) -> tuple[str, str | None]:
        model = body.get("model")
        if not isinstance(model, str):
            raise ServeError(f"model: a string is required, one of: {', '.join(engine.models())}", param="model")
        return model, engine.adapter_of(model)

    def _job(body: dict, prompt_ids: list[int], adapter: str | None, chat: bool) -> Job:
        n = body.get("n", 1)
        if n not in (1, None):
            raise ServeError("n: only n=1 is served", param="n")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
            raise ServeError(f"max_tokens: an integer >= 1 is required, got {max_tokens!r}", param="max_tokens")
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0:
            raise ServeError("top_p: must be > 0", param="top_p")
        seed = body.get("seed")
        if seed is not None and not _is_int(seed):
            raise ServeError(f"seed: an integer is required, got {seed!r}", param="seed")
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise ServeError("stop: a string or a list of up to 4 non-empty strings is required", param="stop")
        if not prompt_ids:
            raise ServeError("the prompt is empty", param="prompt")
        max_new = engine.check_length(len(prompt_ids), max_tokens)
        return Job(prompt_ids, adapter, max_new, float(temperature), float(top_p), seed, stop, chat)

    async def _answer(request: Request, body: dict, job: Job, model: str, kind: str) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.emit = lambda k, v: loop.call_soon_threadsafe(events.put_nowait, (k, v))
        info = request.scope.setdefault("tunex", {})
        info["model"] = model
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ServeError("stream: true or false is required", param="stream")
        engine.submit(job)
        if stream:
            options = body.get("stream_options") or {}
            usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
            return StreamingResponse(
                _stream(job, events, rid, created, model, kind, usage, info),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        checked = time.monotonic()
        while True:
            try:
                what, value = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                what = None
            if time.monotonic() - checked >= 0.5:  # text events keep coming: look at the client now and then
                checked = time.monotonic()
                if await request.is_disconnected():
                    job.cancel()
                    info["cancelled"] = True
                    return Response(status_code=499)
            if what == "error":
                raise value
            if what == "done":
                break
        result: JobResult = value
        _note(info, result)
        if kind == "chat.completion":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
        return JSONResponse(
            {
                "id": rid,
                "object": kind,
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": _usage(result),
            }
        )

    async def _stream(
        job: Job, events: asyncio.Queue, rid: str, created: int, model: str, kind: str, usage: bool, info: dict
    ) -> AsyncIterator[str]:
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"

        def chunk(choices: list, **extra) -> str:
            data = {"id": rid, "object": chunk_kind, "created": created, "model": model, "choices": choices, **extra}
            return f"data: {json.dumps(data)}\n\n"

        def piece(text: str | None, finish: str | None, first: bool = False) -> str:
            if kind == "chat.completion":
                delta = {} if text is None else {"role": "assistant", "content": text} if first else {"content": text}
                return chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
            return chunk([{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}])

        done = False
        try:
            if kind == "chat.completion":
                yield piece("", None, first=True)
            while True:
                what, value = await events.get()
                if what == "text":
                    yield piece(value, None)
                elif what == "error":
                    info["status"] = 500
                    message = {"message": f"generation failed: {value}", "type": "server_error", "code": None}
                    yield f"data: {json.dumps({'error': message})}\n\n"
                    break
                else:
                    result: JobResult = value
                    _note(info, result)
                    yield piece(None, result.finish_reason)
                    if usage:
                        yield chunk([], usage=_usage(result))
                    break
            yield "data: [DONE]\n\n"
            done = True
        finally:
            if not done:  # the client went away: free the worker
                job.cancel()
                info["cancelled"] = True

    async def on_serve_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServeError)
        request.scope.setdefault("tunex", {})["error"] = str(exc)
        return error(exc.status, str(exc), exc.code, exc.param)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        what = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error(exc.status_code, what.get(exc.status_code, str(exc.detail)))

    async def on_any_error(request: Request, exc: Exception) -> Response:
        log.exception("tunex serve: %s %s failed", request.method, request.url.path)
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        exception_handlers={ServeError: on_serve_error, HTTPException: on_http_error, Exception: on_any_error},
    )
    return _Guard(app, api_key)


class _Guard:
    """ASGI wrapper: the API key check and the one log line per request (method, path, status,
    model, tokens, time)."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        info = scope.setdefault("tunex", {})

        async def send_logged(message):
            if message["type"] == "http.response.start":
                info.setdefault("status", message["status"])
            await send(message)

        try:
            if self.api_key is not None and scope["path"].startswith("/v1") and not self._authorized(scope):
                await error(
                    401,
                    "Incorrect API key provided; send it as 'Authorization: Bearer KEY'.",
                    code="invalid_api_key",
                )(scope, receive, send_logged)
            else:
                await self.app(scope, receive, send_logged)
        finally:
            parts = [f"{scope['method']} {scope['path']}", str(info.get("status", "-"))]
            if "model" in info:
                parts.append(f"model={info['model']}")
            if "prompt_tokens" in info:
                parts.append(f"tokens={info['prompt_tokens']}+{info['completion_tokens']} {info['finish_reason']}")
            if info.get("cancelled"):
                parts.append("client gone, cancelled")
            if "error" in info:
                parts.append(f"error: {info['error']}")
            parts.append(f"{time.perf_counter() - start:.3f}s")
            log.info(" ".join(parts))

    def _authorized(self, scope) -> bool:
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                return value.decode("latin-1") == f"Bearer {self.api_key}"
        return False


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ServeError(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ServeError("The request body must be a JSON object")
    return body


def _plain_message(index: int, message) -> dict:
    """A chat message as {role, content: str}; OpenAI's list-of-parts content joins its text parts."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ServeError(f"messages[{index}]: a {{role, content}} object is required", param="messages")
    content = message.get("content")
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
            raise ServeError(f"messages[{index}].content: only text parts are served", param="messages")
        content = "".join(texts)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise ServeError(f"messages[{index}].content: a string is required", param="messages")
    return {"role": message["role"], "content": content}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ServeError(f"{key}: a number in [{low:g}, {high:g}] is required, got {value!r}", param=key)
    return float(value)


def _usage(result: JobResult) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _note(info: dict, result: JobResult) -> None:
    info.update(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        finish_reason=result.finish_reason,
    )
