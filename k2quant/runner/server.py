"""`k2quant serve`: the runner behind an OpenAI-compatible HTTP API, with K2's tool calls.

Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (streaming as server-sent
events, or not), `GET /v1/models`, `GET /health` (no key needed). FastAPI + uvicorn +
pydantic: what vLLM's OpenAI server is built on, typed request validation for free.

Data flows one way: request (api.py) -> prompt ids (the model's own chat template, rendered
in a sandbox: formats/chat.py) -> a `Job` on a FIFO queue -> one worker thread that owns the
engine and turns token ids into text (text.py's TextStream: whole characters, stop strings)
-> events back to the request's coroutine -> K2's output split into content, reasoning and
tool calls (toolcalls.py) -> OpenAI responses or chunks. The worker runs one request at a
time; the engine keeps the KV caches of the most recent conversations (`prefix_cache`) and
reuses the longest common token prefix, reported as `usage.prompt_tokens_details.cached_tokens`.
A client that disconnects cancels its job between two tokens, so the next one starts.

Anything that reaches generation goes through a `Backend`: the runner, or in tests a scripted
model, as nanochat tests its engine. Errors are OpenAI error objects: 400 (bad request, named
field), 401 (key), 404 (model, route), 413 (body), 503 (queue full, with Retry-After), 500
(logged here, no traceback in the body); the server keeps serving after each.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from k2quant.errors import K2QuantError
from k2quant.formats.chat import ChatTemplate, ChatTemplateError
from k2quant.formats.tokenizer import K2Tokenizer

from . import api
from .engine import Sampling, Stats
from .text import THINK_OPEN, TextStream
from .toolcalls import ARGUMENT_BEGIN, CALL_BEGIN, SECTION_BEGIN, OutputStream, parse

log = logging.getLogger("k2quant.serve")
STOP_TOKENS = ("<|im_end|>", "[EOS]", "[EOT]")
DEFAULT_MAX_BODY = 4 << 20  # bytes
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may buffer a stream
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")


class Backend(Protocol):
    """What the server needs from a model: the runner implements it, tests script one."""

    tokenizer: K2Tokenizer
    ctx: int
    default_temperature: float

    def generate(self, prompt: list[int], sampling: Sampling) -> Iterator[int]: ...

    @property
    def stats(self) -> Stats: ...


@dataclass
class ServeOptions:
    model_name: str
    api_key: str | None = None
    max_queue: int = 64  # requests waiting behind the running one
    max_body: int = DEFAULT_MAX_BODY
    # bound to a loopback address: only requests whose Host is a loopback name are served, so a web page
    # cannot reach the server through DNS rebinding (the attack on local model servers without a key)
    loopback_only: bool = True


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers


def error_response(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    body = api.ErrorResponse(error=api.ErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# ---------------------------------------------------------------------------- the worker
@dataclass
class Piece:
    text: str


@dataclass
class Finished:
    reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Failed:
    error: BaseException


@dataclass
class Job:
    prompt: list[int]
    sampling: Sampling
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0  # time.monotonic() when the worker took it

    def post(self, event: Piece | Finished | Failed) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is gone (server shutting down)
            pass


class Worker:
    """One thread, one engine, jobs in FIFO order."""

    def __init__(self, backend: Backend, max_queue: int):
        self.backend, self.max_queue = backend, max_queue
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.lock = threading.Lock()
        self.pending = 0  # queued or running
        self.thread = threading.Thread(target=self._loop, name="k2quant-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> bool:
        """Queue `job`; False when `max_queue` requests already wait behind a running one."""
        with self.lock:
            if self.pending > self.max_queue:  # one running + max_queue waiting
                return False
            self.pending += 1
        self.jobs.put(job)
        return True

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                if not job.cancelled.is_set():
                    job.started = time.monotonic()
                    job.post(self._run(job))
            except Exception as e:  # noqa: BLE001 - reported to the request, logged with its traceback
                log.exception("generation failed")
                job.post(Failed(e))
            finally:
                with self.lock:
                    self.pending -= 1

    def _run(self, job: Job) -> Finished:
        b = self.backend
        stream = TextStream(b.tokenizer, job.stop)
        n, reason = 0, None
        gen = b.generate(job.prompt, job.sampling)
        try:
            for t in gen:
                n += 1
                piece = stream.push(t)
                if piece:
                    job.post(Piece(piece))
                if stream.stopped:
                    reason = "stop"
                    break
                if job.cancelled.is_set():
                    reason = "cancelled"
                    break
        finally:
            gen.close()
        rest = stream.finish()
        if rest:
            job.post(Piece(rest))
        st = b.stats
        if reason is None:
            reason = st.finish_reason or "stop"
            n += reason == "stop"  # the stop token was generated too (not yielded, not run)
        return Finished(reason, len(job.prompt), n, st.cached_tokens)


# ---------------------------------------------------------------------------- requests -> prompts
@dataclass
class Prepared:
    prompt: list[int]
    sampling: Sampling
    stop: tuple[str, ...]
    tools: bool = False  # parse tool calls
    prefix: str = ""  # forced start of the answer (tool_choice required / named)
    parallel: bool = True  # parallel_tool_calls (false: the first call only)
    in_reasoning: bool = False  # the prompt opened <think>


class Server:
    def __init__(self, backend: Backend, template: ChatTemplate, opts: ServeOptions):
        self.backend, self.template, self.opts = backend, template, opts
        tok = backend.tokenizer
        self.stop_ids = tuple(tok.special(s) for s in STOP_TOKENS if s in tok.encoding._special_tokens)
        self.worker = Worker(backend, opts.max_queue)
        self.created = int(time.time())

    def sampling(self, req: api._Sampling, limit: int | None) -> Sampling:
        top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
        temp = self.backend.default_temperature if req.temperature is None else req.temperature
        return Sampling(temperature=temp, top_k=top_k, top_p=1.0 if req.top_p is None else req.top_p,
                        min_p=req.min_p or 0.0, seed=req.seed, max_tokens=limit, stop_ids=self.stop_ids)  # fmt: skip

    def check(self, req: api._Sampling) -> None:
        if req.model != self.opts.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist (this server serves "
                                f"`{self.opts.model_name}`).", "model", "model_not_found", "NotFoundError")  # fmt: skip
        bad = req.unsupported()
        if bad:
            raise APIError(400, f"{bad[0]}: {bad[1]}", bad[0], "unsupported_parameter")
        if req.model_extra:
            log.info("ignored unknown request fields: %s", ", ".join(sorted(req.model_extra)))

    def fit(self, ids: list[int], param: str) -> None:
        ctx = self.backend.ctx
        if len(ids) >= ctx:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server's context holds {ctx} "
                                "(prompt and answer together)", param, "context_length_exceeded")  # fmt: skip

    def prepare_chat(self, req: api.ChatCompletionRequest) -> Prepared:
        self.check(req)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice = req.tool_choice
        kwargs = req.chat_template_kwargs or {}
        clash = sorted(set(kwargs) & {"messages", "tools", "add_generation_prompt"})
        if clash:
            raise APIError(400, f"chat_template_kwargs may not set {', '.join(clash)}", "chat_template_kwargs")
        try:
            text = self.template.render([m.for_template() for m in req.messages], tools=tools,
                                        add_generation_prompt=True, **kwargs)  # fmt: skip
        except ChatTemplateError as e:
            raise APIError(400, f"the chat template failed on these messages: {e}", "messages") from None
        prefix = ""
        if tools and choice == "required":
            prefix = SECTION_BEGIN
        elif tools and isinstance(choice, api.NamedToolChoice):
            index = sum(len(m.tool_calls or ()) for m in req.messages)  # ids count on over the conversation
            prefix = f"{SECTION_BEGIN}{CALL_BEGIN}functions.{choice.function.name}:{index}{ARGUMENT_BEGIN}"
        ids = self.backend.tokenizer.encode(text + prefix, allow_special=True)
        self.fit(ids, "messages")
        return Prepared(ids, self.sampling(req, req.token_limit()), req.stop_strings(),
                        tools=bool(tools) and choice != "none", prefix=prefix,
                        parallel=req.parallel_tool_calls is not False,
                        in_reasoning=text.rstrip().endswith(THINK_OPEN))  # fmt: skip

    def prepare_completion(self, req: api.CompletionRequest) -> Prepared:
        self.check(req)
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], int):
            vocab = self.backend.tokenizer.vocab_size
            if any(not 0 <= i < vocab for i in p):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", "prompt")
            ids = list(p)
        else:
            ids = self.backend.tokenizer.encode(p if isinstance(p, str) else p[0], allow_special=True)
        if not ids:
            raise APIError(400, "prompt: the prompt is empty", "prompt")
        self.fit(ids, "prompt")
        return Prepared(ids, self.sampling(req, req.max_tokens), req.stop_strings())

    def start(self, prep: Prepared) -> Job:
        try:
            prep.sampling.check()
        except K2QuantError as e:
            raise APIError(400, str(e)) from None
        job = Job(prep.prompt, prep.sampling, prep.stop, asyncio.get_running_loop())
        if not self.worker.submit(job):
            raise APIError(503, f"the server is busy: {self.opts.max_queue} requests are waiting (--max-queue)",
                           None, "queue_full", "server_busy", {"Retry-After": "1"})  # fmt: skip
        return job


def host_name(host: str) -> str:
    """The name part of a Host header ("127.0.0.1:8000" -> "127.0.0.1", "[::1]:8000" -> "[::1]")."""
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def usage(f: Finished) -> api.Usage:
    return api.Usage(prompt_tokens=f.prompt_tokens, completion_tokens=f.completion_tokens,
                     total_tokens=f.prompt_tokens + f.completion_tokens,
                     prompt_tokens_details=api.PromptTokensDetails(cached_tokens=f.cached_tokens))  # fmt: skip


async def events(job: Job) -> AsyncIterator[Piece | Finished]:
    """The job's events until it finishes; if the consumer stops early (a stream's task is cancelled by
    Starlette when its client leaves), the job is cancelled."""
    try:
        while True:
            ev = await job.events.get()
            if isinstance(ev, Failed):
                raise ev.error
            yield ev
            if isinstance(ev, Finished):
                return
    finally:
        job.cancelled.set()  # no-op when finished; stops the generation when the client left


async def watch_disconnect(request: Request, job: Job) -> None:
    """Cancel `job` when the client of a non-streaming request goes away (its body is read already, so
    the next message from the server is `http.disconnect`)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            job.cancelled.set()
            job.post(Finished("cancelled", 0, 0, 0))  # wakes collect() if the job never started
            return


async def collect(job: Job, request: Request) -> tuple[str, Finished | None]:
    """A non-streaming answer: all its text and how it finished (None: the client left)."""
    text, fin = "", None
    watcher = asyncio.create_task(watch_disconnect(request, job))
    try:
        async for ev in events(job):
            if isinstance(ev, Piece):
                text += ev.text
            else:
                fin = ev
    finally:
        watcher.cancel()
    return text, (None if fin is None or fin.reason == "cancelled" else fin)


# ---------------------------------------------------------------------------- the app
def create_app(backend: Backend, template: ChatTemplate, opts: ServeOptions) -> FastAPI:
    srv = Server(backend, template, opts)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        srv.worker.close()

    app = FastAPI(title="k2quant", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = srv

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if opts.loopback_only and host_name(request.headers.get("host", "")) not in LOOPBACK_HOSTS:
            return error_response(403, "this server is bound to a loopback address and serves only requests for "
                                  "localhost (Host header); bind with --host to serve others", "permission_error",
                                  None, "host_not_allowed")  # fmt: skip
        if opts.api_key and request.url.path != "/health":
            got = request.headers.get("authorization", "")
            want = f"Bearer {opts.api_key}"
            if not hmac.compare_digest(got.encode(), want.encode()):
                return error_response(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                      "authentication_error", None, "invalid_api_key")  # fmt: skip
        return await call_next(request)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.message, e.kind, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('msg')}", "invalid_request_error")
        param = ".".join(loc) or None
        msg = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(400, msg, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "NotFoundError" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}", kind)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error (see the server's log)", "internal_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> api.ModelList:
        return api.ModelList(data=[api.ModelCard(id=opts.model_name, created=srv.created, max_model_len=backend.ctx)])

    @app.post("/v1/chat/completions")
    async def chat(req: api.ChatCompletionRequest, request: Request):
        prep = await asyncio.to_thread(srv.prepare_chat, req)  # template and tokenizer off the event loop
        job = srv.start(prep)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(chat_stream(job, request, prep, cid, opts.model_name, include),
                                     media_type="text/event-stream", headers=SSE_HEADERS)  # fmt: skip
        text, fin = await collect(job, request)
        if fin is None:  # the client left
            return JSONResponse({}, status_code=499)
        out = parse(text, in_reasoning=prep.in_reasoning, prefix=prep.prefix, tools=prep.tools)
        kept = out.tool_calls if prep.parallel else out.tool_calls[:1]
        calls = [api.ToolCallOut(id=c.id, function=api.FunctionCall(name=c.name, arguments=c.arguments))
                 for c in kept] or None  # fmt: skip
        msg = api.AssistantMessage(content=out.content if (out.content or not calls) else None,
                                   reasoning_content=out.reasoning or None, tool_calls=calls)  # fmt: skip
        reason = finish_reason(fin.reason, bool(calls))
        return api.ChatCompletion(id=cid, model=opts.model_name, usage=usage(fin),
                                  choices=[api.Choice(message=msg, finish_reason=reason)])  # fmt: skip

    @app.post("/v1/completions")
    async def completions(req: api.CompletionRequest, request: Request):
        prep = await asyncio.to_thread(srv.prepare_completion, req)
        job = srv.start(prep)
        cid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(completion_stream(job, request, cid, opts.model_name, include),
                                     media_type="text/event-stream", headers=SSE_HEADERS)  # fmt: skip
        text, fin = await collect(job, request)
        if fin is None:
            return JSONResponse({}, status_code=499)
        return api.Completion(id=cid, model=opts.model_name, usage=usage(fin),
                              choices=[api.CompletionChoice(text=text, finish_reason=fin.reason)])  # fmt: skip

    return BodyLimit(app, opts.max_body)


def finish_reason(engine: str, tool_calls: bool) -> str:
    """OpenAI's finish_reason: "length" when the answer was cut (even after a tool call), "tool_calls" when it
    ended with calls, else "stop"."""
    return "length" if engine == "length" else "tool_calls" if tool_calls else "stop"


def _chunk(cid: str, model: str, delta: api.Delta, finish: str | None = None, created: int = 0) -> str:
    return api.ChatCompletionChunk(id=cid, model=model, created=created or int(time.time()),
                                   choices=[api.ChunkChoice(delta=delta, finish_reason=finish)]).sse()  # fmt: skip


def _error_event(e: BaseException) -> str:
    log.error("stream failed: %r", e)
    body = api.ErrorResponse(error=api.ErrorBody(message="internal server error (see the server's log)",
                                                 type="internal_error"))  # fmt: skip
    return "data: " + json.dumps(body.model_dump()) + "\n\n"


async def chat_stream(job: Job, request: Request, prep: Prepared, cid: str, model: str,
                      include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
    parser = OutputStream(in_reasoning=prep.in_reasoning, prefix=prep.prefix, tools=prep.tools)
    created = int(time.time())
    yield _chunk(cid, model, api.Delta(role="assistant", content=""), created=created)
    fin = None
    try:
        async for ev in events(job):
            if isinstance(ev, Finished):
                fin = ev
                deltas = parser.finish()
            else:
                deltas = parser.push(ev.text)
            for d in deltas:
                if d.tool_call is not None and d.tool_call.index > 0 and not prep.parallel:
                    continue  # parallel_tool_calls: false keeps the first call
                yield _chunk(cid, model, _delta(d), created=created)
    except Exception as e:  # noqa: BLE001 - the stream has started: an error event, then the end
        yield _error_event(e)
        yield "data: [DONE]\n\n"
        return
    if fin is None:
        return  # the client left
    reason = finish_reason(fin.reason, parser.tool_calls_emitted)
    yield _chunk(cid, model, api.Delta(), reason, created)
    if include_usage:
        yield api.ChatCompletionChunk(id=cid, model=model, created=created, choices=[], usage=usage(fin)).sse()
    yield "data: [DONE]\n\n"


def _delta(d) -> api.Delta:
    if d.tool_call is not None:
        c = d.tool_call
        fn = api.DeltaFunction(name=c.name, arguments=c.arguments)
        kind = "function" if c.id else None
        return api.Delta(tool_calls=[api.DeltaToolCall(index=c.index, id=c.id, type=kind, function=fn)])
    if d.reasoning:
        return api.Delta(reasoning_content=d.reasoning)
    return api.Delta(content=d.content)


async def completion_stream(job: Job, request: Request, cid: str, model: str,
                            include_usage: bool) -> AsyncIterator[str]:  # fmt: skip
    created = int(time.time())

    def chunk(text: str, finish: str | None = None, use: api.Usage | None = None) -> str:
        choices = [] if use else [api.CompletionChoice(text=text, finish_reason=finish)]
        return api.Completion(id=cid, model=model, created=created, choices=choices, usage=use).sse()

    fin = None
    try:
        async for ev in events(job):
            if isinstance(ev, Finished):
                fin = ev
            elif ev.text:
                yield chunk(ev.text)
    except Exception as e:  # noqa: BLE001
        yield _error_event(e)
        yield "data: [DONE]\n\n"
        return
    if fin is None:
        return
    yield chunk("", fin.reason)
    if include_usage:
        yield chunk("", use=usage(fin))
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------- body size
class BodyLimit:
    """ASGI wrapper: a request body over `limit` bytes is a 413 before the app sees it (the body is
    read here, at most `limit` + one message, and replayed to the app)."""

    def __init__(self, app: FastAPI, limit: int):
        self.app, self.limit = app, limit
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._too_large(scope, send)
        body, more = b"", True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.limit:
                return await self._too_large(scope, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, send):
        r = error_response(413, f"the request body is larger than the server's limit ({self.limit} bytes, "
                                "--max-body)", "invalid_request_error", None, "body_too_large")  # fmt: skip
        await r(scope, None, send)


# ---------------------------------------------------------------------------- running it
def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one); the address is known before the server starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise K2QuantError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    return sock


def make_server(app, sock: socket.socket, log_level: str = "info"):
    """A uvicorn server for `app` on `sock`; `server.run(sockets=[sock])` serves until stopped."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=5)  # fmt: skip
    return uvicorn.Server(config)


@contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Serve `app` from a background thread (tests, benchmarks); yields the base URL ("http://host:port")."""
    sock = bind(host, port)
    server = make_server(app, sock, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="k2quant-http", daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - t0 > 30:
            raise K2QuantError("the HTTP server did not start")
        time.sleep(0.01)
    try:
        h, p = sock.getsockname()[:2]
        yield f"http://{h}:{p}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
