"""`jamba serve`: the model behind an OpenAI-compatible HTTP API (starlette on uvicorn).

One worker thread runs the engine, one request at a time, in arrival order; requests wait in a bounded queue
(`queue_size`; beyond it 429). A response is fed from the worker through an asyncio queue; a client that goes
away sets its request's stop flag, which the engine polls between tokens and prompt chunks, so its slot is
free at once. SIGINT/SIGTERM stop accepting, abort what runs or waits (503 / an error event), and return.

The request and response shapes (and every refusal) are in openai_api.py.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import openai_api as api
from .errors import ContextOverflowError, JambaError, UsageError
from .engine import Engine
from .features import ReplyReader
from .openai_api import ApiError
from .sample import SamplingParams

DEFAULT_PORT = 8080
DEFAULT_QUEUE_SIZE = 16
DEFAULT_MAX_BODY = "16MiB"  # a 256K-token conversation is about 1 MB of text; JSON escapes add some
DEFAULT_CACHE_BUDGET = "4GiB"
SNAPSHOT_EVERY = 4096  # tokens between the engine's snapshots inside a long prompt
GRACE_S = 5  # after a stop signal, how long uvicorn waits for responses to end before closing them
LOOPBACK = ("localhost",)




def parse_size(text: str, param: str) -> int:
    """'4GiB', '500MB', '1048576' -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?", text.strip().lower())
    if not m:
        raise UsageError(f"`{param}` {text!r} is not a size like 4GiB or 500MB")
    return int(float(m.group(1)) * units[m.group(2) or ""])


# -- the worker --

SHUTTING_DOWN = ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")


class Job:
    """One request on its way through the worker: what it asks (`spec`), its stop flag, and the queue its
    chunks (or an error) arrive on, in the event loop of the request."""

    def __init__(self, spec: api.Spec):
        self.spec = spec
        self.loop = asyncio.get_running_loop()
        self.out: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def send(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass


class Worker:
    """The thread that runs the engine, one job at a time, first come first served."""

    def __init__(self, engine, queue_size: int, on_done: Callable | None = None):
        self.engine, self.queue_size, self.on_done = engine, queue_size, on_done
        self._lock = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self.running: Job | None = None
        self.closing = False
        self._thread = threading.Thread(target=self._loop, name="jamba-engine", daemon=True)
        self._thread.start()

    def counts(self) -> dict:
        with self._lock:
            return {"running": int(self.running is not None), "waiting": len(self._waiting)}

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.closing:
                raise SHUTTING_DOWN
            if len(self._waiting) >= self.queue_size:
                raise ApiError(429, f"the server is busy: {len(self._waiting)} requests are waiting already; "
                               "retry later", type="rate_limit_error", code="queue_full")
            self._waiting.append(job)
            self._lock.notify()

    def cancel(self, job: Job) -> None:
        """Stop `job`: taken out of the queue, or stopped at the engine's next poll. Idempotent."""
        job.cancelled.set()
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)

    def close(self) -> None:
        """Refuse new jobs and stop every job: the waiting ones get 503, the running one is stopped."""
        with self._lock:
            self.closing = True
            waiting, running = list(self._waiting), self.running
            self._waiting.clear()
            self._lock.notify()
        for job in waiting:
            job.cancelled.set()
            job.send(SHUTTING_DOWN)
        if running is not None:
            running.cancelled.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self.closing:
                    self._lock.wait()
                if not self._waiting:
                    return
                job = self.running = self._waiting.popleft()
            try:
                self._run(job)
            finally:
                with self._lock:
                    self.running = None

    def _run(self, job: Job) -> None:
        spec = job.spec
        last = None
        try:
            extra = {}
            if spec.features is not None:  # chat: control tokens left out, as `run` prints; the thinking budget
                extra = dict(special=False,
                             logits_processors=spec.features.logits_processors(self.engine.tokenizer, spec.thinking))
            for chunk in self.engine.stream(spec.ids, spec.params, boundaries=spec.boundaries,
                                            should_stop=job.cancelled.is_set, **extra):
                last = chunk
                if chunk.finish_reason == "interrupted":
                    job.send(SHUTTING_DOWN if self.closing else ApiError(499, "the client went away"))
                    break
                job.send(chunk)
        except ContextOverflowError as e:
            job.send(api.bad(str(e), code="context_length_exceeded"))
        except JambaError as e:
            job.send(api.bad(str(e)) if isinstance(e, UsageError) else _internal(e))
        except Exception as e:  # noqa: BLE001 (the worker must live on; the client gets a 500)
            job.send(_internal(e))
        if last is not None and self.on_done is not None:
            self.on_done(last)


def _internal(e: BaseException) -> ApiError:
    """A failure of ours: the client gets a generic message; stderr one line (the traceback with JAMBA_DEBUG=1)."""
    if os.environ.get("JAMBA_DEBUG"):
        import traceback

        traceback.print_exception(e)
    else:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: a request failed: {type(e).__name__}: {first} (JAMBA_DEBUG=1 shows the traceback)",
              file=sys.stderr, flush=True)
    return ApiError(500, "the server failed to complete the request", type="server_error")


# -- responses --

def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _event(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class JobResponse(Response):
    """The answer to a generation request, sent as the worker produces it: one JSON object at the end, or
    server-sent events as tokens come. A client that disconnects (an http.disconnect message, or a send that
    fails) stops the job at once. Headers wait for the first chunk, so a job that fails before it (queued at
    shutdown, an engine error) still gets its status code."""

    def __init__(self, job: Job, shaper: api.Shaper, worker: Worker):
        self.job, self.shaper, self.worker = job, shaper, worker
        self.background = None

    async def __call__(self, scope, receive, send) -> None:
        self.scope = scope
        async with anyio.create_task_group() as group:
            async def watch():
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.worker.cancel(self.job)
                group.cancel_scope.cancel()

            group.start_soon(watch)
            try:
                await self._respond(send)
            except OSError:  # the client is gone (ASGI 2.4 servers raise on send)
                pass
            finally:
                self.worker.cancel(self.job)  # a no-op for a finished job
                group.cancel_scope.cancel()

    async def _respond(self, send) -> None:
        job, shaper, spec = self.job, self.shaper, self.job.spec
        item = await job.out.get()
        if isinstance(item, ApiError):
            await _error(item)(self.scope, None, send)
            return
        reader = ReplyReader(spec.features, spec.thinking) if spec.features is not None else None
        if not spec.stream:
            pieces = [item.text]
            while item.finish_reason is None:
                item = await job.out.get()
                if isinstance(item, ApiError):
                    await _error(item)(self.scope, None, send)
                    return
                pieces.append(item.text)
            reply = None
            if reader is not None:
                reader.feed("".join(pieces))
                reply = reader.finish()[1]
            await JSONResponse(shaper.whole("".join(pieces), item.finish_reason, item.stats, reply))(
                self.scope, None, send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})

        async def emit(obj) -> None:
            await send({"type": "http.response.body", "body": _event(obj), "more_body": True})

        usage = spec.include_usage
        if shaper.kind == "chat":
            await emit(shaper.chunk(None, first=True, include_usage=usage))
        while True:
            if isinstance(item, ApiError):  # the status is sent already: an error event, as OpenAI streams do
                await emit(item.body())
                break
            pieces = reader.feed(item.text) if reader is not None else [("content", item.text)]
            if item.finish_reason is not None:
                reason, extra = item.finish_reason, {}
                if reader is not None:
                    last, reply = reader.finish()
                    pieces += last
                    if reply.tool_calls:
                        reason = "tool_calls"
                        extra["tool_calls"] = [{"index": i, **c.openai()} for i, c in enumerate(reply.tool_calls)]
                    if reply.citations is not None:
                        extra["citations"] = reply.citations
            for kind, text in pieces:
                if text:
                    await emit(shaper.chunk(text, include_usage=usage, kind=kind))
            if item.finish_reason is not None:
                if extra:
                    await emit(shaper.chunk(None, include_usage=usage, extra=extra))
                await emit(shaper.chunk(None, reason, include_usage=usage))
                if usage:
                    await emit(shaper.usage_chunk(item.stats))
                break
            item = await job.out.get()
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


# -- the application --

class _Auth:
    """ASGI middleware: `Authorization: Bearer KEY` on every route but /health (and CORS preflights, which
    CORSMiddleware answers before this)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                what = "no API key was given" if not given else "the API key is not valid"
                e = ApiError(401, f"{what}: send the header Authorization: Bearer KEY", code="invalid_api_key")
                await _error(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(model, tokenizer, *, name: str, aliases: Sequence[str] = (), context_size: int | None = None,
               cache_budget: int = 0, snapshot_every: int = SNAPSHOT_EVERY, api_key: str | None = None,
               cors: Sequence[str] = (), queue_size: int = DEFAULT_QUEUE_SIZE,
               max_body_size: int = parse_size(DEFAULT_MAX_BODY, "max_body_size"),
               sampling: SamplingParams | None = None, system: str | None = None,
               on_done: Callable | None = None):
    """The ASGI application serving `model` as `name` (requests may also name it by `aliases`). Its worker is
    `app.state.worker`: close it to stop generating (`serve` does on SIGINT/SIGTERM)."""
    context_size = context_size or model.config.max_position_embeddings
    budget, every = cache_budget, snapshot_every
    engine = Engine(model, tokenizer, context_size=context_size, cache_budget=budget, snapshot_every=every)
    worker = Worker(engine, queue_size, on_done)
    defaults = sampling or SamplingParams()
    served = [name, *aliases]
    started = int(time.time())
    rendering = threading.Lock()

    def spec_of(body: dict, kind: str) -> api.Spec:  # tokenizing: in a thread, not in the event loop
        api.check_model(body, served)
        stream, include_usage = api.options(body)
        params = api.sampling(body, kind=kind, defaults=defaults, context_size=context_size)
        if kind == "chat":
            msgs = api.messages(body, system)
            f = api.features(body, tokenizer)
            with rendering:  # a template's time budget is kept on its (shared) Jinja environment
                ids, boundaries, thinking = api.chat_prompt(tokenizer, msgs, context_size, f)
            return api.Spec(kind, ids, params, boundaries, stream, include_usage, f, thinking)
        ids = api.completion_prompt(tokenizer, body, context_size)
        return api.Spec(kind, ids, params, [], stream, include_usage)

    def generation(kind: str):
        async def endpoint(request: Request) -> Response:
            try:
                spec = await run_in_threadpool(spec_of, await _json_body(request, max_body_size), kind)
                job = Job(spec)
                worker.submit(job)
                return JobResponse(job, api.Shaper(kind, name), worker)
            except ApiError as e:
                return _error(e)
            except Exception as e:  # noqa: BLE001
                return _error(_internal(e))
        return endpoint

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": started, "owned_by": "jamba-cli"}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def one_model(request: Request) -> Response:
        if request.path_params["model"] not in served:
            model = request.path_params["model"]
            return _error(ApiError(404, f"The model `{model}` does not exist; this server serves `{name}`",
                                   param="model", code="model_not_found"))
        return JSONResponse(model_card())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", **worker.counts()})

    async def http_error(request: Request, e: HTTPException) -> Response:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return _error(ApiError(e.status_code, message.get(e.status_code, str(e.detail)),
                               code="not_found" if e.status_code == 404 else None))

    routes = [Route("/v1/chat/completions", generation("chat"), methods=["POST"]),
              Route("/v1/completions", generation("completion"), methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{model:path}", one_model, methods=["GET"]),
              Route("/health", health, methods=["GET"])]
    middleware = []
    if cors:  # outermost: preflights are answered before the key is asked for
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors), allow_methods=["GET", "POST"],
                                     allow_headers=["authorization", "content-type"]))
    if api_key:
        middleware.append(Middleware(_Auth, key=api_key))
    async def failed(request: Request, e: Exception) -> Response:  # a bug of ours: a 500 in OpenAI's shape
        return _error(_internal(e))

    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={HTTPException: http_error, Exception: failed})
    app.state.worker = worker
    app.state.engine = engine
    return _Guard(app)


class _Guard:
    """The outermost layer: an exception that escapes the application (starlette answers it with a 500, then
    re-raises it) ends here instead of in uvicorn's log as a traceback."""

    def __init__(self, app: Starlette):
        self.app, self.state = app, app.state

    async def __call__(self, scope, receive, send):
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:  # noqa: BLE001
            if not started and scope["type"] == "http":  # else starlette's handler has answered and logged it
                await _error(_internal(e))(scope, receive, send)


async def _json_body(request: Request, limit: int) -> dict:
    too_large = ApiError(413, f"the request body is larger than {limit} bytes (--max-body-size)",
                         code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise too_large
    try:
        body = json.loads(data)
    except ValueError:  # UnicodeDecodeError too
        raise api.bad("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise api.bad("the request body must be a JSON object")
    return body


# -- running it --

def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), bound before the model loads, so that a port in
    use fails at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise JambaError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


class _Server(uvicorn.Server):
    """uvicorn's server, whose first SIGINT/SIGTERM also stops generation (a stream in flight would hold the
    graceful shutdown for as long as it runs), and which returns instead of re-raising the signal: a server
    asked to stop has done its job (exit status 0)."""

    def __init__(self, config, worker: Worker):
        super().__init__(config)
        self.worker = worker

    def handle_exit(self, sig, frame) -> None:
        self.worker.close()
        if self.should_exit and sig == signal.SIGINT:  # a second Ctrl+C: close connections now
            self.force_exit = True
        self.should_exit = True


def serve(app, sock: socket.socket, ready: Callable[[], None] = lambda: None) -> None:
    """Serve `app` on `sock` until SIGINT or SIGTERM; then stop generating and return. `ready` is called once
    the signals are ours (a signal from then on stops the server cleanly, even before uvicorn has started)."""
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=GRACE_S, server_header=False)
    worker = app.state.worker
    server = _Server(config, worker)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, server.handle_exit)
    ready()
    try:
        server.run(sockets=[sock])
    finally:
        worker.close()
        worker.join(GRACE_S)
