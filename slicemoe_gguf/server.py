"""`slicemoe serve`: an OpenAI-compatible HTTP server on the engine (Starlette on uvicorn).

Endpoints: GET /v1/models, POST /v1/completions and /v1/chat/completions (both with "stream": true
as server-sent events), GET /metrics (Prometheus text: requests, tokens, the queue and the cache's
counters since start), GET /health. Every response carries its own cache counters and timings under
"slicemoe" (in the last chunk of a stream).

A request's life: it is checked first (openai_request.parse: a bad one is a 400 at once), then waits
in arrival order for one of the --parallel slots (at most --max-queue waiting, each at most
--max-wait seconds, else a 503 with Retry-After), then decodes in the decoder's batches (slots.py)
beside the other requests in flight. A client that goes away, or a SIGTERM / SIGINT, stops its
decode at the next token; a stream ends with a finish reason and the server exits 0.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import threading
import time
import uuid
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from . import defaults
from ._native import SliceMoEError
from .openai_request import BadRequest, Job, parse
from .replies import Reply
from .runtime import Model
from .slots import Decoder, Task


class Busy(Exception):
    """No room: the queue is full, the wait ran out, or the server is stopping (a 503)."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Admission:
    """The model's slots, handed to waiting requests in arrival order (an asyncio object: every
    method runs on the event loop). A request holds its slot until its decode has ended."""

    def __init__(self, slots: int, max_queue: int, max_wait_s: float):
        self.free = slots
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self.waiting: collections.deque[asyncio.Future] = collections.deque()
        self.closed = False
        self.admitted = 0
        self.rejected = 0
        self.wait_s_total = 0.0
        self.wait_s_max = 0.0
        self.recent_hold_s = 10.0   # how long a slot was held, smoothed: what Retry-After says

    def _retry_after(self) -> int:
        return max(1, math.ceil(self.recent_hold_s * (len(self.waiting) + 1)))

    async def enter(self) -> None:
        if self.closed:
            raise Busy("the server is stopping", 5)
        started = time.monotonic()
        if self.free > 0 and not self.waiting:
            self.free -= 1
        else:
            if len(self.waiting) >= self.max_queue:
                self.rejected += 1
                raise Busy(f"{len(self.waiting)} requests are waiting for the model (--max-queue {self.max_queue})",
                           self._retry_after())
            turn = asyncio.get_running_loop().create_future()
            self.waiting.append(turn)
            try:   # a closed queue fails its waiters with Busy, raised here
                await asyncio.wait_for(asyncio.shield(turn), self.max_wait_s)
            except asyncio.TimeoutError:
                self._give_up(turn)
                self.rejected += 1
                raise Busy(f"waited {self.max_wait_s:g} s for the model (--max-wait)", self._retry_after()) from None
            except asyncio.CancelledError:   # the client went away while waiting
                self._give_up(turn)
                raise
        waited = time.monotonic() - started
        self.admitted += 1
        self.wait_s_total += waited
        self.wait_s_max = max(self.wait_s_max, waited)

    def _give_up(self, turn: asyncio.Future) -> None:
        if turn.done() and not turn.cancelled() and turn.exception() is None:
            self.leave(0.0)   # the slot was handed over just as the wait ended: pass it on
            return
        turn.cancel()
        if turn in self.waiting:
            self.waiting.remove(turn)

    def leave(self, held_s: float) -> None:
        if held_s > 0:
            self.recent_hold_s = 0.8 * self.recent_hold_s + 0.2 * held_s
        while self.waiting:
            turn = self.waiting.popleft()
            if not turn.done():
                turn.set_result(None)   # the slot goes straight to the next in line
                return
        self.free += 1

    def close(self) -> None:
        """Refuse new requests and fail the waiting ones (the server is stopping)."""
        self.closed = True
        while self.waiting:
            turn = self.waiting.popleft()
            if not turn.done():
                turn.set_exception(Busy("the server is stopping", 5))


class Service:
    """The model, its one context, the queue in front of it and the totals /metrics reports."""

    def __init__(self, model: Model, name: str, *, max_queue: int = defaults.MAX_QUEUE,
                 max_wait_s: float = defaults.MAX_WAIT_S, release_idle_s: float = defaults.RELEASE_IDLE_S):
        self.model = model
        self.name = name
        self.created = int(time.time())
        self.admission = Admission(model.n_seq, max_queue, max_wait_s)   # one slot per sequence
        self.totals = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "prefill_ms": 0.0, "decode_ms": 0.0}
        self.running: set[threading.Event] = set()   # the cancel events of the decodes under way
        self.stopping = threading.Event()
        self.decoder = Decoder(model, model.n_seq, self.account, release_idle_s)

    def account(self, reply: Reply) -> None:
        self.totals["requests"] += 1
        self.totals["prompt_tokens"] += reply.prompt_tokens
        self.totals["completion_tokens"] += len(reply.tokens)
        self.totals["prefill_ms"] += reply.prefill_ms
        self.totals["decode_ms"] += reply.decode_ms

    def stop(self) -> None:
        """Every decode stops at its next token; nothing new starts. Safe from a signal handler."""
        self.stopping.set()
        for cancel in list(self.running):
            cancel.set()

    def join(self, timeout_s: float) -> None:
        """Waits for the decoder to let go of the model (before it is closed)."""
        self.decoder.close(timeout_s)


def _usage(reply: Reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": len(reply.tokens),
            "total_tokens": reply.prompt_tokens + len(reply.tokens)}


def _error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                        status_code=status, headers=headers)


def _start(service: Service, job: Job, reply: Reply, cancel: threading.Event) -> asyncio.Queue:
    """Hands the job to the decoder, which gives the event loop ("piece", text) items, then ("piece",
    None), or ("error", exception) on a failure. Its slot is held until the decode has ended, which
    happens at the next token once `cancel` is set."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()

    def put(item) -> None:   # from the decoder's thread, straight into the event loop
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:   # the loop has closed: the server is stopping
            cancel.set()

    def release(held_s: float) -> None:
        service.running.discard(cancel)
        try:
            loop.call_soon_threadsafe(service.admission.leave, held_s)
        except RuntimeError:
            pass

    service.running.add(cancel)
    if service.stopping.is_set():
        cancel.set()
    service.decoder.submit(Task(job, reply, cancel, put, release))
    return items


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (it has sent its whole body before this is awaited)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Format:
    """The OpenAI shapes of responses, chunks and logprobs for one request."""

    def __init__(self, service: Service, job: Job, reply: Reply):
        self.model, self.job, self.reply, self.chat = service.model, job, reply, job.chat
        self.ident = ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.name = service.name
        self.sent_logprobs = 0   # tokens whose logprobs a chunk has carried

    def envelope(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.ident, "object": kind, "created": int(time.time()), "model": self.name}

    def _token(self, token: int) -> tuple[str, list[int]]:
        data = self.model.token_bytes(token)
        return data.decode("utf-8", "replace"), list(data)

    def logprobs(self, upto_chars: int | None) -> dict | None:
        """The logprobs of the tokens not yet sent whose text starts before upto_chars (None: all)."""
        if self.job.top_logprobs is None:
            return None
        reply, start = self.reply, self.sent_logprobs
        end = start
        while end < len(reply.logprobs) and (upto_chars is None or reply.offsets[end] < upto_chars):
            end += 1
        self.sent_logprobs = end
        rows = [(reply.tokens[i], *reply.logprobs[i], reply.offsets[i]) for i in range(start, end)]
        if self.chat:
            def entry(token: int, logprob: float) -> dict:
                text, data = self._token(token)
                return {"token": text, "logprob": logprob, "bytes": data}

            return {"content": [{**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in top]}
                                for token, logprob, top, _ in rows], "refusal": None}
        return {"tokens": [self._token(token)[0] for token, *_ in rows],
                "token_logprobs": [logprob for _, logprob, _, _ in rows],
                "top_logprobs": [{self._token(t)[0]: lp for t, lp in top} for _, _, top, _ in rows],
                "text_offset": [offset for *_, offset in rows]}

    def choice(self, text: str, finish: str | None, *, chunk: bool, first: bool = False,
               upto_chars: int | None = None) -> dict:
        logprobs = self.logprobs(upto_chars)
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        if chunk:
            delta = ({"role": "assistant", "content": text} if first else {"content": text}) if text or first else {}
            return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish}

    def chunk(self, text: str, shown: int, first: bool) -> str:
        body = {**self.envelope(True), "choices": [self.choice(text, None, chunk=True, first=first, upto_chars=shown)]}
        return f"data: {json.dumps(body)}\n\n"

    def last_chunk(self) -> str:
        body = {**self.envelope(True), "choices": [self.choice("", self.reply.finish_reason, chunk=True)],
                "usage": _usage(self.reply), "slicemoe": self.reply.summary()}
        return f"data: {json.dumps(body)}\n\n"

    def response(self) -> dict:
        return {**self.envelope(False), "choices": [self.choice(self.reply.text, self.reply.finish_reason, chunk=False)],
                "usage": _usage(self.reply), "slicemoe": self.reply.summary()}


def build_app(service: Service) -> Starlette:
    async def complete(request: Request, chat: bool) -> Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the request body is not JSON")
        try:   # off the event loop: tokenizing a long prompt takes a while
            job = await run_in_threadpool(parse, service.model, body, chat)
        except BadRequest as exc:
            return _error(400, str(exc))

        gone = asyncio.ensure_future(_disconnected(request))
        try:
            entering = asyncio.ensure_future(service.admission.enter())
            await asyncio.wait({entering, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not entering.done():   # the client left while waiting: its place goes to the next
                entering.cancel()
                await asyncio.gather(entering, return_exceptions=True)
                return Response(status_code=499)
            entering.result()
        except Busy as exc:
            gone.cancel()
            return _error(503, str(exc), "server_busy", {"Retry-After": str(exc.retry_after_s)})
        except BaseException:
            gone.cancel()
            raise

        reply, cancel = Reply(), threading.Event()
        gone.add_done_callback(lambda _: cancel.set())   # a client that goes away stops its decode
        pieces = _start(service, job, reply, cancel)
        out = _Format(service, job, reply)

        async def next_piece() -> str | None:
            kind, value = await pieces.get()
            if kind == "error":
                raise value
            return value   # None when the reply is complete

        try:   # the prompt runs before a response starts, so that a failure at prefill is a 500
            first_piece = await next_piece()
        except SliceMoEError as exc:
            gone.cancel()
            return _error(500, str(exc), "server_error")
        except BaseException:
            cancel.set()
            gone.cancel()
            raise

        if job.stream:
            async def events():
                try:
                    piece, first, shown = first_piece, True, 0
                    while piece is not None:
                        shown += len(piece)
                        yield out.chunk(piece, shown, first)
                        piece, first = await next_piece(), False
                    yield out.last_chunk()
                    yield "data: [DONE]\n\n"
                except SliceMoEError:
                    return   # the stream has started: ending it is all that is left to say
                finally:
                    cancel.set()
                    gone.cancel()

            return StreamingResponse(events(), media_type="text/event-stream")
        try:
            piece = first_piece
            while piece is not None:
                piece = await next_piece()
        except SliceMoEError as exc:
            return _error(500, str(exc), "server_error")
        finally:
            cancel.set()
            gone.cancel()
        return JSONResponse(out.response())

    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": service.name, "object": "model", "created": service.created, "owned_by": "slicemoe-gguf"}]})

    async def health(request: Request) -> Response:
        if service.stopping.is_set():
            return _error(503, "the server is stopping", "server_busy")
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

    totals, admission = service.totals, service.admission
    metric("requests_total", "counter", "Completion requests served.", totals["requests"])
    metric("prompt_tokens_total", "counter", "Prompt tokens evaluated.", totals["prompt_tokens"])
    metric("completion_tokens_total", "counter", "Tokens generated.", totals["completion_tokens"])
    metric("prefill_seconds_total", "counter", "Time spent evaluating prompts.", totals["prefill_ms"] / 1000)
    metric("decode_seconds_total", "counter", "Time spent decoding.", totals["decode_ms"] / 1000)
    metric("slots", "gauge", "Requests the server decodes together (--parallel).", service.model.n_seq)
    metric("slots_busy", "gauge", "Requests decoding now.", service.decoder.busy())
    metric("queue_depth", "gauge", "Requests waiting for a slot now.", len(admission.waiting))
    metric("queue_admitted_total", "counter", "Requests that got the model.", admission.admitted)
    metric("queue_rejected_total", "counter", "Requests refused with a 503 (queue full or wait too long).",
           admission.rejected)
    metric("queue_wait_seconds_total", "counter", "Time admitted requests waited for the model.",
           round(admission.wait_s_total, 6))
    metric("queue_wait_seconds_max", "gauge", "The longest wait of an admitted request.", round(admission.wait_s_max, 6))
    metric("cache_releases_total", "counter", "Times the pools were handed back after --release-idle without a request.",
           service.decoder.releases)
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


def _batch_fit(model: Model) -> int | None:
    """How many sequences' top-k MSB slices the smallest layer's pool surely holds (None: no cache)."""
    from .model_info import describe

    stats = model.cache_stats()
    if stats is None:
        return None
    return min(stats["layers"]["msb_slots"]) // max(int(describe(model.path)["top_k"]), 1)


def serve(model: Model, *, host: str, port: int, name: str | None = None, max_queue: int = defaults.MAX_QUEUE,
          max_wait_s: float = defaults.MAX_WAIT_S, release_idle_s: float = defaults.RELEASE_IDLE_S) -> None:
    import uvicorn

    service = Service(model, name or Path(model.path).name, max_queue=max_queue, max_wait_s=max_wait_s,
                      release_idle_s=release_idle_s)
    fit = _batch_fit(model)
    if fit is not None and fit < model.n_seq:
        print(f"slicemoe serve: the smallest layer's pool holds the experts of {fit} sequence(s) at once; a batch "
              f"of {model.n_seq} whose experts do not fit decodes one sequence at a time (a larger --cache-budget "
              f"avoids that)", flush=True)

    class Server(uvicorn.Server):
        """uvicorn's server, whose first SIGTERM or SIGINT also stops every decode at its next token
        (uvicorn alone waits for open streams to end) and is the normal end: exit status 0."""

        def handle_exit(self, sig: int, frame) -> None:
            if self.should_exit:
                self.force_exit = True   # a second signal: stop without waiting
                return
            self.should_exit = True
            service.stop()
            loop = getattr(self, "loop", None)
            if loop is not None:
                loop.call_soon_threadsafe(service.admission.close)

        async def serve(self, sockets=None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

    # streams end at their next token once stopping; the timeout only bounds a stuck client
    config = uvicorn.Config(build_app(service), host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=3)
    server = Server(config)
    print(f"slicemoe serve: {service.name} on http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    server.run()
    service.stop()
    service.join(10.0)
    print("slicemoe serve: stopped", flush=True)
