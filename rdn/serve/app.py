"""The HTTP side of ``rdn serve-chat``: an OpenAI-compatible chat-completions API and a chat page.

Routes (FastAPI):

* ``POST /v1/chat/completions`` -- the OpenAI request schema (``model``, ``messages``,
  ``temperature``, ``top_p``, ``max_tokens``/``max_completion_tokens``, ``stop``, ``n``,
  ``seed``, ``stream``, ``stream_options.include_usage``). ``model`` names a training stage
  (``rl``, ``sft``, ``mid``, ``base``); omitted, the server's default stage answers. With
  ``stream: true`` the reply is server-sent ``chat.completion.chunk`` events and
  ``data: [DONE]``. A calculator call runs on the server (the engine's safe evaluator) and
  shows in the content as ``[calc EXPR = VALUE]``, as ``rdn chat`` shows it; sent back in a
  later turn's assistant message, it is turned back into the tool-call tokens the model
  was trained on. ``usage`` counts prompt and completion tokens (tool output included).
* ``GET /v1/models`` -- the stages that have a checkpoint; ``GET /health``; ``GET /`` the chat
  page (``rdn/serve/static/index.html``), ``/static/...`` its files.

Limits: a request body over ``max_body_bytes`` gets 413; prompt + completion must fit the
model's context (its training ``sequence_len``) and ``max_tokens`` the configured maximum
(400 naming ``messages`` or ``max_tokens``); a request running longer than
``request_timeout`` seconds is stopped (504, or an ``error`` event when streaming). Bad input
gets a 4xx in OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, whose
message names the field. With an API key set, ``/v1/*`` needs ``Authorization: Bearer KEY``
(401 otherwise). A client that goes away (a closed stream, a dropped connection) has its
rows cancelled, which frees their batch slots before the next decode step.

Requests are served by one :class:`~rdn.serve.batcher.Batcher` per stage, loaded on first use.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from rdn.inference.reply import ReplyText, tool_calls_to_parts
from rdn.serve.batcher import Batcher, Row

log = logging.getLogger("rdn.serve")

STAGES = ("rl", "sft", "mid", "base")
STATIC = Path(__file__).resolve().parent / "static"
MAX_N = 8
MAX_STOP = 4


@dataclass
class ServeConfig:
    root: Path                       # the project: artifacts/tokenizer, artifacts/checkpoints/<stage>
    default_stage: str = "rl"
    api_key: str | None = None
    max_tokens_limit: int = 1024     # the largest max_tokens a request may ask for
    max_batch: int = 16              # rows decoded together per stage
    max_body_bytes: int = 1 << 20
    request_timeout: float = 300.0   # seconds per request
    device: str = "auto"


# --------------------------------------------------------------------------- errors

class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_response(status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return APIError(status, message, param, type, code).response(headers)


def _loc(loc: tuple) -> str:
    """``("body", "messages", 0, "role")`` -> ``messages.0.role``."""
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) if parts else "body"


# --------------------------------------------------------------------------- the request schema

class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences (got {len(stops)})")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops


def _conversation(messages: list[Message]) -> list[dict]:
    """The request's messages as a conversation of :mod:`rdn.tokenizer.chat`."""
    conv = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages.{i}.content.{j}: only text content parts are supported "
                                        f"(got type {part.type!r})", f"messages.{i}.content")
                texts.append(part.text)
            text = "".join(texts)
        else:
            text = m.content or ""
        if m.role in ("system", "developer"):
            if i != 0:
                raise APIError(400, f"messages.{i}: a {m.role} message may only come first", f"messages.{i}.role")
            conv.append({"role": "system", "content": text})
        elif m.role == "assistant":
            conv.append({"role": "assistant", "content": tool_calls_to_parts(text)})
        else:
            conv.append({"role": "user", "content": text})
    if conv[-1]["role"] != "user":
        raise APIError(400, f"messages.{len(conv) - 1}: the last message must be the user's (got "
                            f"{messages[-1].role!r}); the model answers a user message", "messages")
    return conv


def _validation_error(errors: list[dict]) -> APIError:
    """The first problem of a pydantic validation as a 400 naming its field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
    where = _loc(tuple(first.get("loc", ())))
    msg = first["msg"]
    if first.get("type") == "model_type" and where == "body":
        return APIError(400, f"the request body must be a JSON object (got {type(first.get('input')).__name__})")
    if where.startswith("messages.") and where.endswith(".role"):
        msg = f"unknown role {first.get('input')!r}; expected one of system, developer, user, assistant"
    elif first.get("type") == "missing":
        msg = "required"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return APIError(400, f"{where}: {msg}{more}", where.split(".")[0])


def _parse(raw: bytes) -> ChatRequest:
    """The request body as a :class:`ChatRequest` (any content type; the body must be JSON)."""
    from pydantic import ValidationError

    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


# --------------------------------------------------------------------------- the models

class Models:
    """The stages that have checkpoints; each stage's engine and batcher built on first use."""

    def __init__(self, config: ServeConfig):
        from rdn.artifacts import checkpoint_dir
        from rdn.checkpoint import latest_checkpoint

        self.config = config
        self.tokenizer_dir = config.root / "artifacts" / "tokenizer"
        self.checkpoints = {}
        for stage in STAGES:
            ckpt = latest_checkpoint(checkpoint_dir(config.root, stage))
            if ckpt is not None:
                self.checkpoints[stage] = ckpt
        self.default = config.default_stage
        self.created = int(time.time())
        self._batchers: dict[str, Batcher] = {}
        self.about: dict[str, str] = {}
        self._lock = threading.Lock()

    def batcher(self, stage: str) -> Batcher:
        """The stage's batcher, loading its checkpoint the first time (raises EngineLoadError)."""
        with self._lock:
            if stage not in self._batchers:
                from rdn.inference.load import load_engine

                t0 = time.perf_counter()
                engine, about = load_engine(self.checkpoints[stage].path.parent, self.tokenizer_dir,
                                            self.config.device)
                self._batchers[stage] = Batcher(engine, self.config.max_batch, stage)
                self.about[stage] = about
                log.info("serve-chat: loaded %s: %s in %.1fs", stage, about, time.perf_counter() - t0)
            return self._batchers[stage]

    def loaded(self) -> dict[str, Batcher]:
        with self._lock:
            return dict(self._batchers)

    def close(self) -> None:
        for b in self.loaded().values():
            b.close()


# --------------------------------------------------------------------------- one choice's text

class ChoiceText:
    """The visible text of one choice as tokens arrive, with the request's stop sequences: text
    that might be the start of a stop sequence is held back until it is known not to be."""

    def __init__(self, tok, stops: list[str]):
        self.reply = ReplyText(tok)
        self.stops = stops
        self.pending = ""
        self.text = ""
        self.stopped = False    # a stop sequence was met
        self.finish: str | None = None

    def _release(self, final: bool) -> str:
        for s in self.stops:
            at = self.pending.find(s)
            if at >= 0:
                out, self.pending, self.stopped = self.pending[:at], "", True
                self.text += out
                return out
        keep = 0
        if not final:
            for s in self.stops:
                for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                    if self.pending.endswith(s[:k]):
                        keep = max(keep, k)
                        break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        self.text += out
        return out

    def feed(self, token: int) -> str:
        if self.stopped:
            return ""
        self.pending += "".join(text for _, text in self.reply.feed(token))
        return self._release(final=False)

    def close(self) -> str:
        if self.stopped:
            return ""
        self.pending += "".join(text for _, text in self.reply.close())
        return self._release(final=True)


# --------------------------------------------------------------------------- batcher -> request

class _Inbox:
    """Events of one request's rows, from the batcher thread to the request's coroutine. The
    batcher appends; the event loop is woken once for whatever arrived since it last looked
    (not once per token), and :meth:`get` raises TimeoutError once the request's time is up."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float):
        self.loop = loop
        self.items: collections.deque = collections.deque()
        self.ready = asyncio.Event()
        self.expired = False
        self._armed = False
        self._lock = threading.Lock()
        self._timer = loop.call_later(timeout, self._expire)

    def sink(self, i: int):
        def put(event: tuple) -> None:  # on the batcher thread
            self.items.append((i, event))
            with self._lock:
                if self._armed:
                    return
                self._armed = True
            self.loop.call_soon_threadsafe(self._wake)
        return put

    def _wake(self) -> None:
        with self._lock:
            self._armed = False
        self.ready.set()

    def _expire(self) -> None:
        self.expired = True
        self.ready.set()

    async def get(self) -> list[tuple[int, tuple]]:
        """Every event that arrived since the last call (waits for at least one)."""
        while not self.items:
            if self.expired:
                raise TimeoutError
            self.ready.clear()
            if self.items:
                break
            await self.ready.wait()
        out = []
        while self.items:
            out.append(self.items.popleft())
        return out

    def close(self) -> None:
        self._timer.cancel()


# --------------------------------------------------------------------------- the app

def create_app(config: ServeConfig, models: Models | None = None) -> "BodyLimit":
    """The ASGI app: the FastAPI routes behind the request-body limit."""
    models = models or Models(config)
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        models.close()

    app = FastAPI(title="rdn chat", version="1", docs_url="/docs", redoc_url=None, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), type="not_found_error" if exc.status_code == 404
                              else "invalid_request_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if config.api_key and request.url.path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), config.api_key):
                what = "no API key given" if not header else "wrong API key"
                return error_response(401, f"{what}: send the header 'Authorization: Bearer <key>' with the key "
                                           "the server was started with (--api-key)",
                                      type="authentication_error", code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    # ------------------------------------------------------------------- pages and metadata

    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC / "index.html"
        if not page.is_file():
            return HTMLResponse("<p>rdn serve-chat: the chat page is missing; the API is at /v1</p>")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        path = (STATIC / name).resolve()
        if path.parent != STATIC or not path.is_file():
            raise APIError(404, f"no static file {name!r}", type="not_found_error")
        kind = {"js": "text/javascript", "css": "text/css", "svg": "image/svg+xml", "png": "image/png",
                "ico": "image/x-icon"}.get(path.suffix.lstrip("."), "application/octet-stream")
        return Response(path.read_bytes(), media_type=kind)

    @app.get("/health")
    async def health():
        loaded = models.loaded()
        return {"status": "ok", "default_model": models.default,
                "models": {stage: (loaded[stage].stats() if stage in loaded else {"loaded": False})
                           for stage in models.checkpoints}}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [
            {"id": stage, "object": "model", "created": models.created, "owned_by": "rdn",
             "step": ckpt.step, "default": stage == models.default,
             "context_length": (ckpt.meta.get("model_config") or {}).get("sequence_len")}
            for stage, ckpt in models.checkpoints.items()]}

    # ------------------------------------------------------------------- completions

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = _parse(await request.body())
        stage = body.model or models.default
        if stage not in models.checkpoints:
            raise APIError(404, f"model {stage!r} does not exist; this server has "
                                f"{', '.join(models.checkpoints)} (GET /v1/models)", "model",
                           type="not_found_error", code="model_not_found")
        conv = _conversation(body.messages)
        loop = asyncio.get_running_loop()
        batcher = await loop.run_in_executor(None, models.batcher, stage)
        tok = batcher.engine.tok
        from rdn.tokenizer.chat import ConversationError, render_for_completion

        try:
            prompt = render_for_completion(tok, conv)
        except ConversationError as e:
            raise APIError(400, f"messages: {e}", "messages") from None
        context = batcher.context
        if len(prompt) >= context:
            raise APIError(400, f"messages: the conversation is {len(prompt)} tokens; model {stage!r} takes at most "
                                f"{context} tokens of prompt and completion together", "messages",
                           code="context_length_exceeded")
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        room = context - len(prompt)
        if asked is None:
            max_tokens = min(config.max_tokens_limit, room)
        elif asked > config.max_tokens_limit:
            raise APIError(400, f"max_tokens: {asked} is above this server's limit of {config.max_tokens_limit}",
                           "max_tokens")
        elif asked > room:
            raise APIError(400, f"max_tokens: {asked} does not fit: the prompt is {len(prompt)} tokens and model "
                                f"{stage!r} takes {context} in all (at most {room} here)", "max_tokens",
                           code="context_length_exceeded")
        else:
            max_tokens = asked

        inbox = _Inbox(loop, config.request_timeout)
        seed = body.seed if body.seed is not None else secrets.randbelow(2 ** 31)
        rows = [Row(prompt=list(prompt), max_tokens=max_tokens, sink=inbox.sink(i), temperature=body.temperature,
                    top_p=body.top_p, seed=seed + i) for i in range(body.n)]
        texts = [ChoiceText(tok, body.stop or []) for _ in rows]
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        t0 = time.perf_counter()
        batcher.submit(rows)

        def cancel_all():
            for r in rows:
                r.cancel()

        def finish_log(reasons):
            done = sum(r.generated for r in rows)
            log.info("serve-chat: %s %s: %d prompt + %d completion tokens, n=%d, %.2fs (%s)", rid[:17], stage,
                     len(prompt), done, len(rows), time.perf_counter() - t0, ",".join(map(str, reasons)))

        async def events():
            """(choice, delta text, finish reason or None) as they come; stops at every choice's end."""
            open_ = set(range(len(rows)))
            while open_:
                for i, event in await inbox.get():
                    if i not in open_:
                        continue
                    kind = event[0]
                    if kind == "token":
                        delta = texts[i].feed(event[1])
                        if texts[i].stopped:
                            rows[i].cancel()
                            open_.discard(i)
                            texts[i].finish = "stop"
                            yield i, delta, "stop"
                        elif delta:
                            yield i, delta, None
                    elif kind == "end":
                        open_.discard(i)
                        tail = texts[i].close()
                        texts[i].finish = "stop" if texts[i].stopped or event[1] == "stop" else "length"
                        yield i, tail, texts[i].finish
                    else:  # error
                        raise RuntimeError(event[1])

        def failure(e: Exception) -> APIError:
            if isinstance(e, TimeoutError):
                return APIError(504, f"the request took longer than this server's limit of "
                                     f"{config.request_timeout:g}s (--request-timeout)", type="timeout_error")
            return APIError(500, f"generation failed: {e}", type="server_error")

        usage = lambda: {"prompt_tokens": len(prompt), "completion_tokens": sum(r.generated for r in rows),  # noqa: E731
                         "total_tokens": len(prompt) + sum(r.generated for r in rows)}
        fingerprint = f"rdn-{stage}-step{models.checkpoints[stage].step}"

        if not body.stream:
            async def watch_disconnect():
                while True:
                    await asyncio.sleep(0.25)
                    if await request.is_disconnected():
                        cancel_all()
                        return

            watcher = asyncio.create_task(watch_disconnect())
            try:
                async for _ in events():
                    pass
            except (TimeoutError, RuntimeError) as e:
                cancel_all()
                raise failure(e) from None
            finally:
                watcher.cancel()
                inbox.close()
            finish_log([t.finish for t in texts])
            return {"id": rid, "object": "chat.completion", "created": created, "model": stage,
                    "system_fingerprint": fingerprint,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": t.text},
                                 "logprobs": None, "finish_reason": t.finish} for i, t in enumerate(texts)],
                    "usage": usage()}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choices: list[dict], **extra) -> str:
            payload = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": stage,
                       "system_fingerprint": fingerprint, "choices": choices, **extra}
            return f"data: {json.dumps(payload)}\n\n"

        async def sse():
            try:
                for i in range(len(rows)):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                try:
                    async for i, delta, finish in events():
                        d = {"content": delta} if delta else {}
                        yield chunk([{"index": i, "delta": d, "logprobs": None, "finish_reason": finish}])
                except (TimeoutError, RuntimeError) as e:
                    yield f"data: {json.dumps(failure(e).body())}\n\n"
                if include_usage:
                    yield chunk([], usage=usage())
                yield "data: [DONE]\n\n"
                finish_log([t.finish for t in texts])
            finally:
                cancel_all()  # a client that went away frees its rows
                inbox.close()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return BodyLimit(app, config.max_body_bytes)


class BodyLimit:
    """ASGI wrapper: a request body over ``limit`` bytes gets 413 before the app reads it all."""

    def __init__(self, app: FastAPI, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(scope, receive, send)
        # Read the body first (at most limit + 1 bytes), then hand it to the app in one piece.
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await self._reject(scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send):
        error = APIError(413, f"the request body is larger than this server's limit of {self.limit} bytes",
                         code="request_too_large")
        await error.response()(scope, receive, send)
