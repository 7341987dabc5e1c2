"""`slicemoe serve`: an OpenAI-compatible HTTP server on the engine (Starlette on uvicorn).

Endpoints: GET /v1/models, POST /v1/completions and /v1/chat/completions (both with "stream": true
as server-sent events), GET /metrics (Prometheus text: requests, tokens and the cache's counters
since start), GET /health. Every response carries its own cache counters and timings under
"slicemoe" (in the last chunk of a stream). Requests run one at a time on one context: the cache
and the RAM budget are the model's, and a laptop has one of each.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

from ._native import SliceMoEError
from .replies import Reply, stream_reply
from .runtime import Model, Sampling

DEFAULT_MAX_TOKENS = 16   # OpenAI's default for completions


class BadRequest(Exception):
    pass


class Service:
    """The model, its one context, and the totals /metrics reports."""

    def __init__(self, model: Model, name: str):
        self.model = model
        self.name = name
        self.lock = threading.Lock()
        self.created = int(time.time())
        self.totals = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "prefill_ms": 0.0, "decode_ms": 0.0}

    def account(self, reply: Reply) -> None:
        self.totals["requests"] += 1
        self.totals["prompt_tokens"] += reply.prompt_tokens
        self.totals["completion_tokens"] += len(reply.tokens)
        self.totals["prefill_ms"] += reply.prefill_ms
        self.totals["decode_ms"] += reply.decode_ms


def _options(body: dict, n_ctx: int, n_prompt: int, default_max: int | None) -> tuple[int, Sampling, list[str]]:
    if body.get("n", 1) != 1:
        raise BadRequest("n: one choice per request (n = 1)")
    room = n_ctx - n_prompt
    if room < 1:
        raise BadRequest(f"the prompt has {n_prompt} tokens, the context holds {n_ctx}")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", default_max))
    max_tokens = room if max_tokens is None else max_tokens
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise BadRequest("max_tokens must be an integer >= 0")
    temperature = body.get("temperature", 1.0)
    top_p = body.get("top_p", 1.0)
    seed = body.get("seed", 0)
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise BadRequest("temperature must be a number in [0, 2]")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise BadRequest("top_p must be a number in (0, 1]")
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise BadRequest("seed must be an integer in [0, 2^32)")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("stop must be a string or a list of strings")
    return min(max_tokens, room), Sampling(temperature=float(temperature), top_p=float(top_p), seed=seed), stop


def _prompt(service: Service, body: dict, chat: bool) -> list[int]:
    model = service.model
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise BadRequest("messages must be a non-empty list of {role, content} objects with text content")
        return model.chat_tokens(messages)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("prompt must be a non-empty string")
    return model.tokenize(prompt)


def _usage(reply: Reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": len(reply.tokens),
            "total_tokens": reply.prompt_tokens + len(reply.tokens)}


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)


def _start(service: Service, body: dict, chat: bool, reply: Reply, cancel: threading.Event) -> asyncio.Queue:
    """Runs the request on a thread of its own, which holds the model for the whole request
    (tokenizing included: one context, one request) and hands the event loop ("piece", text) items,
    then ("piece", None); ("bad" | "error", exception) on a failure. It stops at the next token once
    `cancel` is set, so that a client that goes away frees the model at once."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()

    def put(item) -> None:   # from the worker's thread, straight into the event loop
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:   # the loop has closed: the server is stopping
            cancel.set()

    def work() -> None:
        try:
            with service.lock:
                prompt = _prompt(service, body, chat)
                max_tokens, sampling, stop = _options(body, service.model.n_ctx, len(prompt),
                                                      None if chat else DEFAULT_MAX_TOKENS)
                try:
                    for piece in stream_reply(service.model, prompt, max_tokens, sampling, reply, stop, cancel):
                        put(("piece", piece))
                finally:
                    service.account(reply)
            put(("piece", None))
        except BadRequest as exc:
            put(("bad", exc))
        except Exception as exc:   # noqa: BLE001 - reported to the client as a server error
            put(("error", exc if isinstance(exc, SliceMoEError) else SliceMoEError(f"internal error: {exc!r}", 8)))

    threading.Thread(target=work, name="slicemoe-request", daemon=True).start()
    return items


def build_app(service: Service) -> Starlette:
    def envelope(chat: bool, ident: str, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        return {"id": ident, "object": kind, "created": int(time.time()), "model": service.name}

    def choice(chat: bool, text: str, finish: str | None, chunk: bool, first: bool = False) -> dict:
        if not chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if chunk:
            delta = ({"role": "assistant", "content": text} if first else {"content": text}) if text or first else {}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}

    async def complete(request: Request, chat: bool) -> Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        reply = Reply()

        cancel = threading.Event()
        pieces = _start(service, body, chat, reply, cancel)

        async def next_piece():
            kind, value = await pieces.get()
            if kind in ("bad", "error"):
                raise value
            return value   # None when the reply is complete

        try:
            # the prompt runs before a response starts, so that a bad request is a 400
            first_piece = await next_piece()
        except BadRequest as exc:
            return _error(400, str(exc))
        except SliceMoEError as exc:
            return _error(500, str(exc), "server_error")
        except BaseException:
            cancel.set()   # the client went away (the task is cancelled): stop decoding for it
            raise

        if body.get("stream"):
            async def events():
                try:
                    piece, first = first_piece, True
                    asked = time.monotonic()
                    while piece is not None:
                        yield f"data: {json.dumps({**envelope(chat, ident, True), 'choices': [choice(chat, piece, None, True, first)]})}\n\n"
                        if time.monotonic() - asked > 0.1:   # (Starlette only listens for it under ASGI < 2.4)
                            asked = time.monotonic()
                            if await request.is_disconnected():
                                return
                        piece, first = await next_piece(), False
                    last = {**envelope(chat, ident, True), "choices": [choice(chat, "", reply.finish_reason, True)],
                            "usage": _usage(reply), "slicemoe": reply.summary()}
                    yield f"data: {json.dumps(last)}\n\n"
                    yield "data: [DONE]\n\n"
                except SliceMoEError:
                    return   # the stream has started: ending it is all that is left to say
                finally:
                    cancel.set()   # a client that disconnects ends here too: the decode stops

            return StreamingResponse(events(), media_type="text/event-stream")
        try:
            piece = first_piece
            while piece is not None:
                piece = await next_piece()
        except SliceMoEError as exc:
            return _error(500, str(exc), "server_error")
        finally:
            cancel.set()
        return JSONResponse({**envelope(chat, ident, False), "choices": [choice(chat, reply.text, reply.finish_reason, False)],
                             "usage": _usage(reply), "slicemoe": reply.summary()})

    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": service.name, "object": "model", "created": service.created, "owned_by": "slicemoe-gguf"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        # off the event loop: reading the counters waits for the ubatch running now (the engine's
        # lock), never for the whole request
        text = await run_in_threadpool(prometheus_text, service)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return Starlette(routes=[
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ])


def prometheus_text(service: Service) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, value, labels: str = "") -> None:
        if not any(line.startswith(f"# TYPE slicemoe_{name} ") for line in lines):
            lines.append(f"# HELP slicemoe_{name} {help_text}")
            lines.append(f"# TYPE slicemoe_{name} {kind}")
        lines.append(f"slicemoe_{name}{labels} {value}")

    totals = service.totals
    metric("requests_total", "counter", "Completion requests served.", totals["requests"])
    metric("prompt_tokens_total", "counter", "Prompt tokens evaluated.", totals["prompt_tokens"])
    metric("completion_tokens_total", "counter", "Tokens generated.", totals["completion_tokens"])
    metric("prefill_seconds_total", "counter", "Time spent evaluating prompts.", totals["prefill_ms"] / 1000)
    metric("decode_seconds_total", "counter", "Time spent decoding.", totals["decode_ms"] / 1000)
    stats = service.model.cache_stats()
    if stats is not None:
        for part in ("msb", "lsb"):
            metric("cache_hits_total", "counter", "Slice uses served from the pools.", stats[f"{part}_hits"], f'{{slice="{part}"}}')
        for part in ("msb", "lsb"):
            metric("cache_misses_total", "counter", "Slice uses read from the model file.", stats[f"{part}_misses"], f'{{slice="{part}"}}')
        metric("cache_loads_total", "counter", "Slices read into the pools.", stats["loads"])
        metric("cache_evictions_total", "counter", "Slices dropped from the pools.", stats["evictions"])
        metric("flash_read_bytes_total", "counter", "Bytes read from the model file by the cache.", stats["flash_bytes"])
        metric("cache_io_seconds_total", "counter", "Time blocked on slice reads.", stats["io_ms"] / 1000)
        metric("cache_pool_bytes", "gauge", "Bytes allocated for slice pools.", stats["pool_bytes"])
        metric("cache_budget_bytes", "gauge", "The cache budget.", stats["budget_bytes"])
    return "\n".join(lines) + "\n"


def serve(model: Model, *, host: str, port: int, name: str | None = None) -> None:
    import uvicorn

    service = Service(model, name or Path(model.path).name)
    config = uvicorn.Config(build_app(service), host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    print(f"slicemoe serve: {service.name} on http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass   # uvicorn has shut down gracefully and re-raises the signal; stopping is the normal end
    print("slicemoe serve: stopped", flush=True)
