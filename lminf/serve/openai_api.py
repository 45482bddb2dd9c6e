"""An OpenAI-compatible HTTP server with bounded memory per conversation.

    lminf serve --host 127.0.0.1 --port 8000 [--api-key KEY]

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with `stream: true` as
server-sent events), GET /v1/models, GET /health, GET /stats.

One worker thread owns the model. Requests become jobs; the worker runs one step of each
active job in turn (a prefill chunk or one token), so concurrent clients share the model
fairly and a job whose client went away is dropped at its next turn. A request whose
prompt extends an earlier conversation reuses that conversation's cache
(`usage.prompt_tokens_details.cached_tokens` says how many tokens were not re-encoded).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lminf.patching import settings_of
from lminf.serve.session import ReplyText, Sampling, SessionStore, pinned_prefix_length, stream_tokens

MAX_TOKENS_LIMIT = 32768


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored, known ones are typed
    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)  # the newer name
    stop: str | list[str] | None = Field(None, max_length=4)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, code=None):
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def _error_response(e: ApiError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status)


@dataclass
class Job:
    """One request: its token generator, and the queue its events go to."""

    steps: object  # generator from stream_tokens
    on_event: object  # callable(event) -> None, thread-safe
    cancelled: threading.Event = field(default_factory=threading.Event)


class Worker(threading.Thread):
    """Runs every job one step at a time, round robin, on the thread that owns the model."""

    def __init__(self):
        super().__init__(daemon=True, name="lminf-worker")
        self._jobs: deque[Job] = deque()
        self._wake = threading.Condition()
        self.active = 0

    def submit(self, job: Job) -> None:
        with self._wake:
            self._jobs.append(job)
            self.active += 1
            self._wake.notify()

    def run(self) -> None:
        while True:
            with self._wake:
                while not self._jobs:
                    self._wake.wait()
                job = self._jobs.popleft()
            done = job.cancelled.is_set()
            if not done:
                try:
                    next(job.steps)
                except StopIteration:
                    done = True
                except Exception as error:  # a failing request must not take the server down
                    job.on_event(("error", f"{type(error).__name__}: {error}"))
                    done = True
            with self._wake:
                if done:
                    job.steps.close()  # runs the generator's cleanup (returns the session to the store)
                    self.active -= 1
                else:
                    self._jobs.append(job)


class Engine:
    """The model, its tokenizer, the conversation store and the worker."""

    def __init__(self, model, tokenizer, model_name: str, max_sessions: int = 8, default_max_tokens: int = 256):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.settings = settings_of(model)
        self.store = SessionStore(model, max_sessions)
        self.store_lock = threading.Lock()
        self.default_max_tokens = default_max_tokens
        self.stop_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.worker = Worker()
        self.worker.start()
        self.generated_tokens = 0

    def chat_prompt(self, messages: list[Message]) -> tuple[str, int]:
        """The prompt text, and how many of its first tokens to pin as global."""
        dicts = [m.model_dump() for m in messages]
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(dicts, add_generation_prompt=True, tokenize=False)
            return text, max(self.settings.n_global, pinned_prefix_length(self.tokenizer, dicts))
        return "\n".join(f"{m['role']}: {m['content']}" for m in dicts) + "\nassistant:", self.settings.n_global

    def start(self, prompt: str, n_global: int, sampling: Sampling, on_event, chat: bool, stops: list[str]) -> Job:
        """Queue a generation; `on_event` gets ("delta", text), then ("done", info) or ("error", message)."""
        job = Job(steps=None, on_event=on_event)
        job.steps = self._run(prompt, n_global, sampling, job, chat, stops)
        self.worker.submit(job)
        return job

    def _run(self, prompt, n_global, sampling, job, chat, stops):
        with self.store_lock:
            session = self.store.checkout(prompt, n_global)
        reused = len(session.tokens)
        # A chat template writes its own special tokens; a raw prompt gets the tokenizer's (BOS) once.
        new_tokens = session.take_text(prompt, self.tokenizer, add_special_tokens=not chat and not session.tokens)
        prompt_tokens = reused + len(new_tokens)
        reply = ReplyText(self.tokenizer)
        generated = reply.tokens
        sent = ""
        longest_stop = max((len(x) for x in stops), default=0)
        finish = "length"
        consistent = False  # an error inside a forward pass may leave the cache half updated
        try:
            for token in stream_tokens(self.model, session, new_tokens, sampling, self.stop_ids):
                if token is not None:
                    new = reply.add(token)
                    self.generated_tokens += 1
                    if token in self.stop_ids:
                        finish = "stop"
                    text = reply.text
                    # A stop string not seen before ends in the new text: search only from there.
                    lo = max(0, len(text) - len(new) - longest_stop)
                    cut = min((i for x in stops if (i := text.find(x, lo)) >= 0), default=-1)
                    if cut >= 0:  # a stop string: the reply ends before it
                        finish = "stop"
                        break
                    # Hold back half a character, and what could be the start of a stop string.
                    ready = len(text) - max(longest_stop - 1, 0)
                    if not text.endswith("\ufffd") and ready > len(sent):
                        job.on_event(("delta", text[len(sent) : ready]))
                        sent = text[:ready]
                yield
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
            cut = min((text.find(x) for x in stops if x in text), default=-1)
            text = text[:cut] if cut >= 0 else text
            if len(text) > len(sent):
                job.on_event(("delta", text[len(sent) :]))
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(generated),
                "total_tokens": prompt_tokens + len(generated),
                "prompt_tokens_details": {"cached_tokens": reused},
            }
            job.on_event(("done", {"finish_reason": finish, "usage": usage}))
            consistent = True
        except GeneratorExit:  # cancelled between two steps: the cache is whole
            consistent = True
            raise
        finally:
            session.take_reply(self.tokenizer, generated)
            if consistent:
                with self.store_lock:
                    self.store.checkin(session)

    def stats(self) -> dict:
        with self.store_lock:
            return {
                "sessions": len(self.store),
                "cache_bytes": self.store.memory_bytes(),
                "active_jobs": self.worker.active,
                "generated_tokens": self.generated_tokens,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }


def create_app(engine: Engine, api_key: str | None = None, max_body_bytes: int = 8 * 2**20) -> FastAPI:
    app = FastAPI(title="lminf", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return _error_response(ApiError(401, "Invalid or missing API key.", "authentication_error", code="invalid_api_key"))
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            return _error_response(ApiError(413, f"Request body larger than {max_body_bytes} bytes."))
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return _error_response(e)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def stats():
        return engine.stats()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": 0, "owned_by": "lminf"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _parse(request, ChatRequest, max_body_bytes)
        prompt, n_global = engine.chat_prompt(body.messages)
        return await _respond(request, body, prompt, n_global, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest, max_body_bytes)
        prompt, n_global = body.prompt, engine.settings.n_global
        return await _respond(request, body, prompt, n_global, chat=False)

    async def _respond(request: Request, body: _Common, prompt: str, n_global: int, chat: bool):
        if body.model != engine.model_name:
            raise ApiError(
                404,
                f"The model '{body.model}' does not exist; this server has '{engine.model_name}'.",
                param="model",
                code="model_not_found",
            )
        max_tokens = body.max_completion_tokens or body.max_tokens or engine.default_max_tokens
        sampling = Sampling(max_tokens, body.temperature, body.top_p, body.seed)
        stops = [body.stop] if isinstance(body.stop, str) else [x for x in body.stop or [] if x]
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = engine.start(prompt, n_global, sampling, lambda e: loop.call_soon_threadsafe(events.put_nowait, e), chat, stops)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str | None, finish: str | None, stream: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            if stream:
                return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}

        if not body.stream:
            parts = []
            try:
                while True:
                    kind_, value = await events.get()
                    if kind_ == "delta":
                        parts.append(value)
                    elif kind_ == "error":
                        raise ApiError(500, value, "server_error")
                    else:
                        break
            except asyncio.CancelledError:
                job.cancelled.set()
                raise
            result = {"id": rid, "object": kind, "created": created, "model": engine.model_name}
            return {**result, "choices": [choice("".join(parts), value["finish_reason"], False)], "usage": value["usage"]}

        async def sse():
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"
            head = {"id": rid, "object": chunk_kind, "created": created, "model": engine.model_name}
            try:
                if chat:
                    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    yield f"data: {json.dumps({**head, 'choices': [first]})}\n\n"
                while True:
                    kind_, value = await events.get()
                    if kind_ == "delta":
                        yield f"data: {json.dumps({**head, 'choices': [choice(value, None, True)]})}\n\n"
                    elif kind_ == "error":
                        yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                        break
                    else:
                        last = {**head, "choices": [choice(None, value["finish_reason"], True)], "usage": value["usage"]}
                        yield f"data: {json.dumps(last)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:  # the client went away, or we are done: either way the job may stop
                job.cancelled.set()

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


async def _parse(request: Request, schema: type[BaseModel], max_body_bytes: int) -> BaseModel:
    raw = await request.body()
    if len(raw) > max_body_bytes:
        raise ApiError(413, f"Request body larger than {max_body_bytes} bytes.")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"The body is not valid JSON: {e}.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The body must be a JSON object.")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"Invalid request: {param}: {first['msg']}.", param=param) from None


def api_key_from_env(flag: str | None) -> str | None:
    return flag or os.environ.get("LMINF_API_KEY") or None
