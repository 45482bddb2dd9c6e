"""An OpenAI-compatible HTTP server with bounded memory per conversation.

    lminf serve --host 127.0.0.1 --port 8000 [--api-key KEY]

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with `stream: true` as
server-sent events), GET /v1/models, GET /health, GET /stats, GET /openapi.json, and GET / (a chat
page, lminf/serve/chat.html: no external assets).

This module holds the request schemas, the OpenAI-style errors and the FastAPI app; the
serving `Engine` (lminf.serve.engine) runs the requests. A request whose prompt extends an
earlier conversation reuses that conversation's cache (`usage.prompt_tokens_details.cached_tokens`
says how many tokens were not re-encoded).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import version
from importlib.resources import files
from typing import Annotated, Literal

from lminf.extras import SERVE, MissingExtra, hint

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema
except ImportError as error:
    raise MissingExtra(hint(SERVE, "serve")) from error

from lminf.serve.engine import Engine
from lminf.serve.scheduler import Job
from lminf.serve.session import Sampling

MAX_TOKENS_LIMIT = 32768
DISCONNECT_POLL_S = 0.25  # how often a plain (not streamed) request checks that its client is still there


# Strict: a value of another JSON type is refused (`"seed": false`, `"stream": 1`, `"max_tokens": "5"`), as
# the document says; an integer is still a number (`"temperature": 1`).
STRICT = ConfigDict(extra="ignore", strict=True)  # unknown fields are ignored, known ones are typed


def _whole(value):
    """JSON Schema counts 1.0 as an integer: a float with no fraction becomes one; others stay, to be refused."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(low: int, high: int):
    """An integer field in [low, high]; its JSON schema written out (pydantic cannot say it through the validator)."""
    bounds = {"type": "integer", "minimum": low, "maximum": high}
    return Annotated[int, BeforeValidator(_whole), Field(ge=low, le=high), WithJsonSchema(bounds)]


Tokens = integer(1, MAX_TOKENS_LIMIT)
Seed = integer(-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant"]
    content: str


class _Common(BaseModel):
    model_config = STRICT
    model: str
    max_tokens: Tokens | None = None
    max_completion_tokens: Tokens | None = None  # the newer name
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None  # up to 4 stop strings, each of any length
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    seed: Seed | None = None
    n: integer(1, 1) = 1


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error body: every refused request gets one."""

    error: ErrorDetail


ERRORS = {
    400: "the body is not JSON, or a field is missing, mistyped or out of range (`param` names it)",
    401: "the API key is missing or wrong (when the server has one)",
    404: "the model named is not this server's",
    413: "the body is larger than --max-body-bytes",
    500: "generation failed",
}
FIELD_NAMES = {name for model in (ChatRequest, CompletionRequest, Message) for name in model.model_fields}
# The bodies the two POST routes read (they parse the raw request themselves: its size first, then
# well-formed text, then the schema), documented under components/schemas for generated clients.
BODIES = {"ChatRequest": ChatRequest, "CompletionRequest": CompletionRequest}


def _documented(body: str) -> dict:
    """A POST route's OpenAPI: its JSON request body, its reply (one JSON object, or server-sent
    events with `stream: true`) and its OpenAI-style errors."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    event = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}  # a JSON chunk, or [DONE]
    reply = {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": event}}
    responses = {"200": {"description": "the reply; with stream: true, its chunks as server-sent events", "content": reply}}
    responses |= {str(code): {"description": why, "content": error} for code, why in ERRORS.items()}
    schema = {"$ref": f"#/components/schemas/{body}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}, "responses": responses}


def _openapi_with_bodies(app: FastAPI, model_name: str):
    """app.openapi, with the request bodies' schemas (and the ones they refer to) in components,
    and this server's model as the example of their `model` field."""
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = plain()
            components = document.setdefault("components", {}).setdefault("schemas", {})
            for name, model in {**BODIES, "ErrorBody": ErrorBody}.items():
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(schema.pop("$defs", {}))
                components[name] = schema
            for name in BODIES:
                components[name]["properties"]["model"]["examples"] = [model_name]
        return app.openapi_schema

    return openapi


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, code=None):
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def _error_response(e: ApiError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status)


def create_app(engine: Engine, api_key: str | None = None, max_body_bytes: int = 8 * 2**20) -> FastAPI:
    # /openapi.json documents every route; no docs pages (they load scripts from a CDN, and this runs offline)
    app = FastAPI(title="lminf", version=version("lminf"), docs_url=None, redoc_url=None)
    app.openapi = _openapi_with_bodies(app, engine.model_name)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    app.add_exception_handler(ApiError, _api_error)

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return HTMLResponse(files("lminf.serve").joinpath("chat.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def stats():
        return engine.stats()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": 0, "owned_by": "lminf"}]}

    @app.post("/v1/chat/completions", openapi_extra=_documented("ChatRequest"))
    async def chat_completions(request: Request):
        body = await _parse(request, ChatRequest, max_body_bytes)
        prompt, n_global = engine.chat_prompt([m.model_dump() for m in body.messages])
        return await _respond(engine, body, prompt, n_global, chat=True, request=request)

    @app.post("/v1/completions", openapi_extra=_documented("CompletionRequest"))
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest, max_body_bytes)
        return await _respond(engine, body, body.prompt, engine.n_global, chat=False, request=request)

    return app


class _Guard:
    """ASGI middleware: the API key (when one is set), then the declared body size. Plain ASGI, not
    Starlette's BaseHTTPMiddleware, which hides a client's disconnect from the routes (a request
    whose client left would run on)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            page = scope["method"] == "GET" and scope["path"] == "/"  # the page holds no data; its requests carry the key
            if self.api_key is not None and not page and headers.get(b"authorization") != f"Bearer {self.api_key}".encode():
                error = ApiError(401, "Invalid or missing API key.", "authentication_error", code="invalid_api_key")
                return await _error_response(error)(scope, receive, send)
            length = headers.get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_body_bytes:
                error = ApiError(413, f"Request body larger than {self.max_body_bytes} bytes.")
                return await _error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


async def _api_error(_: Request, e: ApiError) -> JSONResponse:
    return _error_response(e)


@dataclass(frozen=True)
class _Reply:
    """What every response to one request repeats: its id, time, model, and whether it is a chat."""

    id: str
    created: int
    model: str
    chat: bool

    def head(self, stream: bool) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def choice(self, text: str | None, finish: str | None, stream: bool) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        if stream:
            return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}


async def _respond(engine: Engine, body: _Common, prompt: str, n_global: int, chat: bool, request: Request):
    """Start the request's job, then answer with the whole reply or stream it."""
    if body.model != engine.model_name:
        raise ApiError(
            404,
            f"The model '{body.model}' does not exist; this server has '{engine.model_name}'.",
            param="model",
            code="model_not_found",
        )
    max_tokens = body.max_completion_tokens or body.max_tokens or engine.default_max_tokens
    sampling = Sampling(max_tokens, body.temperature, body.top_p, body.seed)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = engine.start(prompt, n_global, sampling, lambda e: loop.call_soon_threadsafe(events.put_nowait, e), chat, stops)
    reply = _Reply(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time()), engine.model_name, chat)
    if body.stream:
        return StreamingResponse(_sse(reply, job, events), media_type="text/event-stream")
    return await _collect(reply, job, events, request)


async def _collect(reply: _Reply, job: Job, events: asyncio.Queue, request: Request) -> dict:
    """The whole reply as one response; a client gone before the end cancels the job (checked every
    DISCONNECT_POLL_S: the server does not cancel a plain request's handler when its client leaves)."""
    parts = []
    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    raise ApiError(499, "The client closed the request.") from None
                continue
            if kind == "delta":
                parts.append(value)
            elif kind == "error":
                raise ApiError(500, value, "server_error")
            else:
                break
    except asyncio.CancelledError:
        job.cancelled.set()
        raise
    choice = reply.choice("".join(parts), value["finish_reason"], stream=False)
    return {**reply.head(stream=False), "choices": [choice], "usage": value["usage"]}


async def _sse(reply: _Reply, job: Job, events: asyncio.Queue):
    """Server-sent events: a chunk per piece of text, a last chunk with the usage, then [DONE]."""
    head = reply.head(stream=True)
    try:
        if reply.chat:
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            yield _event({**head, "choices": [first]})
        while True:
            kind, value = await events.get()
            if kind == "delta":
                yield _event({**head, "choices": [reply.choice(value, None, stream=True)]})
            elif kind == "error":
                yield _event({"error": {"message": value, "type": "server_error"}})
                break
            else:
                last = reply.choice(None, value["finish_reason"], stream=True)
                yield _event({**head, "choices": [last], "usage": value["usage"]})
                break
        yield "data: [DONE]\n\n"
    finally:  # the client went away, or we are done: either way the job may stop
        job.cancelled.set()


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _parse(request: Request, schema: type[BaseModel], max_body_bytes: int) -> BaseModel:
    """The body as `schema`, or an ApiError (400 or 413) that says what is wrong, naming the field."""
    raw = await request.body()
    if len(raw) > max_body_bytes:
        raise ApiError(413, f"Request body larger than {max_body_bytes} bytes.")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"The body is not valid JSON: {e}.") from None
    except RecursionError:
        raise ApiError(400, "The body is not valid JSON: nested too deeply.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The body must be a JSON object.")
    bad = _malformed_text_at(data)
    if bad is not None:
        message = f"Invalid request: {bad}: the text holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape)."
        raise ApiError(400, message, param=bad)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        # A value of one of a union's types that breaks that type's rule (5 stop strings) says more than
        # "not a string"; the union's members are left out of the field's path (stop, not stop.list[str]).
        first = next((x for x in errors if not x["type"].endswith("_type")), errors[0])
        param = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or p in FIELD_NAMES) or None
        raise ApiError(400, f"Invalid request: {param}: {first['msg']}.", param=param) from None


def _malformed_text_at(data: dict) -> str | None:
    """The path (e.g. `messages.0.content`) of the first string or key in parsed JSON that is
    not well-formed Unicode, or None. JSON's \\u escapes can spell a lone UTF-16 surrogate,
    which no tokenizer takes and no UTF-8 response can quote back."""
    todo = [((), data)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, str) and not _well_formed(value):
            return ".".join(path)
        if isinstance(value, dict):
            for key in value:
                if not _well_formed(key):
                    return ".".join((*path, key.encode("utf-8", "backslashreplace").decode()))
            items = [((*path, key), item) for key, item in value.items()]
        elif isinstance(value, list):
            items = [((*path, str(i)), item) for i, item in enumerate(value)]
        else:
            continue
        todo.extend(reversed(items))  # depth first, in document order
    return None


def _well_formed(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def api_key_from_env(flag: str | None) -> str | None:
    return flag or os.environ.get("LMINF_API_KEY") or None
