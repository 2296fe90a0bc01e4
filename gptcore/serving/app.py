"""The HTTP API: OpenAI's completions protocol over one shared engine (``worker.py``).

Routes: ``POST /v1/completions`` (streamed as server-sent events with ``"stream": true``),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus) and the playground page at
``/``. API keys, metrics and the access log: ``observe.py``.

Requests are checked before anything is queued; a bad one gets OpenAI's error shape,
``{"error": {"message", "type", "param", "code"}}``, with a 4xx status, and nobody else
notices. Beyond OpenAI's fields a request may set ``top_k``, ``repetition_penalty`` and
``ignore_eos`` (vLLM's name: do not stop at end-of-text). A prompt longer than the
model's context keeps its last ``block_size`` tokens, as ``gptcore generate`` does; the
server logs a warning and ``usage.prompt_tokens`` still counts the whole prompt.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import ConfigError, TokenizerError, invalid
from ..generation.sampling import MAX_NEW_TOKENS, SamplingConfig, _is_int
from .connections import bounded_protocol, once_per_kind
from .observe import ApiKeys, Metrics, Observed, SameOrigin, Trace, loopback, trace_of
from .worker import SHUTDOWN, Job, QueueFull, TooLarge, Worker

if TYPE_CHECKING:
    from ..data.tokenizer import Tokenizer

PLAYGROUND = Path(__file__).with_name("playground.html")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_tokens: int = MAX_NEW_TOKENS  # per completion
    max_n: int = 8               # completions per prompt
    max_prompts: int = 8         # prompts per request
    max_body: int = 1 << 20      # bytes of request body


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param, self.status, self.code, self.kind = param, status, code, kind


def _error(status: int, message: str, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


# ---------------------------------------------------------------------- request checks

def _number(body: dict, name: str, default: float, ok, allowed: str) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and ok(v)):
        raise BadRequest(invalid(name, v, allowed), name)
    return float(v)


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None, allowed: str):
    v = body.get(name)
    if v is None:
        return default
    if not (_is_int(v) and v >= low and (high is None or v <= high)):
        raise BadRequest(invalid(name, v, allowed), name)
    return v


def _strings(body: dict, name: str, most: int) -> list[str] | None:
    v = body.get(name)
    if v is None or isinstance(v, str):
        return v if v is None else [v]
    if isinstance(v, list) and 0 < len(v) <= most and all(isinstance(s, str) for s in v):
        return v
    raise BadRequest(f"{name} must be a string or a list of 1..{most} strings", name)


# Fields OpenAI defines that this server does not implement: refused rather than ignored,
# so a client never silently gets something other than what it asked for.
_UNSUPPORTED = {"best_of": None, "suffix": None, "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0}
# Every field a request may carry: a misspelt one (max_token, temprature) is refused with the
# nearest of these, instead of being ignored while the default silently applies. ``user`` is
# OpenAI's end-user id: accepted, unused.
FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop",
          "seed", "repetition_penalty", "ignore_eos", "echo", "logprobs", "user", *_UNSUPPORTED}
MAX_LOGPROBS = 5  # alternatives per token, as OpenAI's completions allow


@dataclass(frozen=True)
class Completion:
    """A checked request."""

    prompts: list[str]
    cfg: SamplingConfig
    n: int
    stream: bool
    include_usage: bool  # in the stream's last chunk
    echo: bool = False
    logprobs: int | None = None


def parse_request(body, limits: Limits) -> Completion:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for name in body:
        if name not in FIELDS:
            import difflib

            near = difflib.get_close_matches(str(name), sorted(FIELDS), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else f"; the fields are {', '.join(sorted(FIELDS))}"
            raise BadRequest(f"unknown field {name!r}{hint}", str(name), code="unknown_field")
    for name, neutral in _UNSUPPORTED.items():
        if body.get(name) not in (None, neutral, {}):
            hint = "; use repetition_penalty" if name.endswith("_penalty") else ""
            raise BadRequest(f"{name} is not supported by this server{hint}", name)
    prompts = _strings(body, "prompt", limits.max_prompts) or [""]
    stop = _strings(body, "stop", 16) or []
    if any(not s for s in stop):
        raise BadRequest("stop strings must not be empty", "stop")
    n = _integer(body, "n", 1, 1, limits.max_n, f"1 <= n <= {limits.max_n}")
    seed = _integer(body, "seed", None, 0, 2**63 - 1 - limits.max_n, "an integer >= 0, or null")
    stream = body.get("stream", False)
    ignore_eos = body.get("ignore_eos", False)
    options = body.get("stream_options") or {}
    for name, v in (("stream", stream), ("ignore_eos", ignore_eos)):
        if not isinstance(v, bool):
            raise BadRequest(invalid(name, v, "true or false"), name)
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise BadRequest('stream_options must be {"include_usage": true|false}', "stream_options")
    try:
        cfg = SamplingConfig(
            max_new_tokens=_integer(body, "max_tokens", 16, 0, limits.max_tokens,
                                    f"0 <= max_tokens <= {limits.max_tokens}"),
            temperature=_number(body, "temperature", 1.0, lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
            top_p=_number(body, "top_p", 1.0, lambda v: 0 < v <= 1, "a number with 0 < top_p <= 1"),
            top_k=_integer(body, "top_k", 0, 0, None, "an integer >= 0 (0 = off)"),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, lambda v: v > 0, "a number > 0 (1 = off)"),
            stop=tuple(stop), seed=seed, stop_at_eot=not ignore_eos)
    except ConfigError as exc:  # whatever the checks above do not already cover
        raise BadRequest(str(exc)) from None
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise BadRequest(invalid("echo", echo, "true or false"), "echo")
    logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS, f"an integer 0 <= logprobs <= {MAX_LOGPROBS}, or null")
    if echo and stream:
        raise BadRequest("echo with stream is not supported: ask for echo without stream", "echo")
    if logprobs is not None and stop:
        raise BadRequest("logprobs with stop strings is not supported: the text cut at a stop string and the "
                         "tokens scored would disagree; leave one of them out", "logprobs")
    return Completion(prompts, cfg, n, stream, options.get("include_usage", False), echo, logprobs)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_big = BadRequest(f"the request body is over {limit} bytes", status=413, code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------- the app

def create_app(worker: Worker, model_id: str, limits: Limits = Limits(), api_keys: tuple[str, ...] = (),
               access_log: bool = True, host: str = "127.0.0.1", allowed_hosts: tuple[str, ...] = ()) -> FastAPI:
    """The ASGI app over a running :class:`Worker`, listening on ``host``; with ``api_keys``,
    /v1 needs one of them."""
    app = FastAPI(title="gptcore", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(worker)
    app.add_middleware(ApiKeys, keys=list(api_keys))
    app.add_middleware(SameOrigin, host=host, allowed_hosts=list(allowed_hosts))
    app.add_middleware(Observed, metrics=metrics, access_log=access_log)  # outermost: it sees the refusals too
    tokenizer = worker.tokenizer
    block = worker.model.config.block_size
    created = int(time.time())

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):  # unknown routes and methods, OpenAI-shaped
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                      code=str(exc.detail).lower().replace(" ", "_"))

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc: BadRequest):
        return _error(exc.status, str(exc), exc.param, exc.code, exc.kind)

    app.state.draining = False  # set when the server is told to stop: no new completions

    @app.get("/health")
    async def health():
        if app.state.draining:  # a load balancer stops sending requests here
            return JSONResponse({"status": "draining", **worker.stats()}, status_code=503)
        return {"status": "ok", "api_key_required": bool(api_keys), **worker.stats()}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        card = {"id": model_id, "object": "model", "created": created, "owned_by": "gptcore",
                "context_length": block}
        return {"object": "list", "data": [card]}

    @app.get("/")
    async def playground():
        return FileResponse(PLAYGROUND, media_type="text/html")

    @app.post("/v1/completions")
    async def completions(request: Request):
        if app.state.draining:
            raise BadRequest("the server is shutting down; retry on another instance", status=503,
                             code="shutting_down", kind="server_error")
        body = await _json_body(request, limits.max_body)
        req = parse_request(body, limits)
        prompts, n = req.prompts, req.n
        _check_model(body.get("model"), model_id)
        encoded = _encode(tokenizer, prompts, block)
        job = _submit(worker, encoded, req)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_id}
        prompt_tokens = sum(len(ids) for ids in encoded)  # each prompt once, however many choices
        trace = trace_of(request)
        trace.id, trace.prompt_tokens = head["id"], prompt_tokens
        total = len(prompts) * n
        if req.stream:
            return StreamingResponse(_sse(worker, job, head, total, prompt_tokens, req.include_usage, trace,
                                          tokenizer),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _collect(request, worker, job, head, total, prompt_tokens, trace, prompts, tokenizer)

    return app


# ---------------------------------------------------------------------- a completion's steps

async def _json_body(request: Request, limit: int):
    """The request body as JSON: a body that does not parse is the client's error (400), not the server's."""
    raw = await _read_body(request, limit)
    try:
        return json.loads(raw)
    # ValueError covers JSONDecodeError, bad UTF-8 and integers past Python's digit limit;
    # RecursionError, nesting deeper than the parser's stack: all the client's doing.
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the request body is not valid JSON ({exc})") from None


def _check_model(requested, model_id: str) -> None:
    """Refuse a model other than this server's (404, as OpenAI answers), rather than answer as if it were."""
    if requested is not None and requested != model_id:
        raise BadRequest(f"the model {requested!r} does not exist; this server has {model_id!r}",
                         "model", 404, "model_not_found")


def _encode(tokenizer: Tokenizer, prompts: list[str], block: int) -> list[list[int]]:
    """The prompts' token ids, encoded before anything is queued so a bad prompt costs nobody else a step."""
    try:
        encoded = [tokenizer.encode(p) for p in prompts]
    except TokenizerError as exc:
        raise BadRequest(str(exc), "prompt") from None
    for ids in encoded:
        if len(ids) > block:
            print(f"gptcore serve: warning: a prompt of {len(ids)} tokens keeps its last {block} "
                  "(block_size)", file=sys.stderr, flush=True)
    return encoded


def _submit(worker: Worker, encoded: list[list[int]], req: Completion) -> Job:
    """Queue the rows; a full queue is the server's state (503), too many rows the request's (400)."""
    try:
        return worker.submit(encoded, req.cfg, req.n, req.logprobs, req.echo)
    except QueueFull as exc:
        raise BadRequest(str(exc), status=503, code="overloaded", kind="server_error") from None
    except TooLarge as exc:
        raise BadRequest(str(exc), "n") from None


async def _watch_disconnect(request: Request, worker: Worker, job: Job) -> None:
    """Cancel the job's rows the moment its client hangs up. The body has been read, so the
    next message the server sends this request is its disconnect (or nothing, until the
    answer has gone and this task is cancelled)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    worker.cancel(job)
    job.events.put_nowait(None)  # wakes the handler: nobody is waiting for the answer


async def _collect(request: Request, worker: Worker, job: Job, head: dict, total: int,
                   prompt_tokens: int, trace: Trace, prompts: list[str], tokenizer) -> dict | JSONResponse:
    """The whole completion as one response; rows still decoding when it ends early are cancelled.
    With ``echo`` each choice's text (and log-probabilities) starts with its prompt's."""
    texts, reasons, produced = [[] for _ in range(total)], [None] * total, 0
    scores = [_Logprobs(tokenizer) for _ in range(total)] if job.logprobs is not None else None
    watcher = asyncio.create_task(_watch_disconnect(request, worker, job))
    try:
        while None in reasons:
            event = await job.events.get()
            if event is None:  # the watcher: the client has gone
                return _error(499, "the client closed the connection")
            index, text, reason, count, scored = event
            if reason == "error":
                return _error(500, text, kind="server_error")
            if reason == SHUTDOWN:
                return _error(503, "the server is shutting down: this completion was cut short", code="shutting_down",
                              kind="server_error")
            if scores is not None and job.echo and not texts[index]:  # the prompt's, before the first event
                scores[index].prompt(job.prompts[index // job.n], job.prompt_scores[index // job.n])
            texts[index].append(text)
            if scored is not None:
                scores[index].add(*scored)
            if reason is None:
                trace.token(index)
            else:
                reasons[index], produced = reason, produced + count
                trace.finished(reason, count)
    finally:
        watcher.cancel()
        if None in reasons:
            worker.cancel(job)
    choices = [{"text": (prompts[i // job.n] if job.echo else "") + "".join(t), "index": i,
                "logprobs": scores[i].take() if scores is not None else None, "finish_reason": r}
               for i, (t, r) in enumerate(zip(texts, reasons))]
    return {**head, "choices": choices, "usage": _usage(prompt_tokens, produced)}


class _Logprobs:
    """One choice's ``logprobs`` object in OpenAI's completions shape, built token by token:
    ``tokens`` (each token's own text), ``token_logprobs``, ``top_logprobs`` (text ->
    log-probability of the most probable alternatives) and ``text_offset`` (where each token
    starts in the choice's text). :meth:`take` hands over what has accumulated (a stream
    sends each chunk's own tokens; offsets run on across chunks)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.offset = tokenizer, 0
        self.d = self._empty()

    @staticmethod
    def _empty() -> dict:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    @property
    def pending(self) -> bool:
        return bool(self.d["tokens"])

    def add(self, token: int, scored) -> None:
        """A token and its (log-probability, alternatives), or None (an echoed prompt's first token)."""
        text = self.tokenizer.decode([token])
        self.d["tokens"].append(text)
        self.d["text_offset"].append(self.offset)
        self.offset += len(text)
        self.d["token_logprobs"].append(None if scored is None else scored[0])
        self.d["top_logprobs"].append(None if scored is None else
                                      {self.tokenizer.decode([i]): lp for i, lp in scored[1]})

    def prompt(self, ids: list[int], scores: list) -> None:
        for token, scored in zip(ids, scores):
            self.add(token, scored)

    def take(self) -> dict:
        out, self.d = self.d, self._empty()
        return out


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _sse(worker: Worker, job, head: dict, total: int, prompt_tokens: int, include_usage: bool,
               trace: Trace, tokenizer):
    """OpenAI's chunk stream, ending with ``data: [DONE]``. Tokens that arrive while the
    previous write is under way go out together: one chunk per choice per write, so a
    busy server spends its time decoding, not framing one event per token. If the client
    goes away, the generator is closed and its rows are cancelled."""
    left, produced = total, 0
    scores = [_Logprobs(tokenizer) for _ in range(total)] if job.logprobs is not None else None
    try:
        while left:
            events = [await job.events.get()]
            while not job.events.empty():
                events.append(job.events.get_nowait())
            texts: dict[int, list[str]] = {}
            out = []
            for index, text, reason, count, scored in events:
                if reason == "error":
                    yield f"data: {json.dumps({'error': {'message': text, 'type': 'server_error'}})}\n\n"
                    return
                texts.setdefault(index, []).append(text)
                if scored is not None:
                    scores[index].add(*scored)
                if reason is None:
                    trace.token(index)
                elif reason == SHUTDOWN:
                    # The stream ends with what was decoded, a last chunk saying it was cut
                    # short ("abort", vLLM's word), the reason, and [DONE]: never mid-body.
                    trace.finished("abort", count)
                    last = _chunk(head, index, "".join(texts.pop(index)), "abort", include_usage,
                                  scores[index].take() if scores is not None else None)
                    reason_event = {"error": {"message": "the server is shutting down: this completion was cut short",
                                              "type": "server_error", "code": "shutting_down"}}
                    yield "".join(out) + last + f"data: {json.dumps(reason_event)}\n\ndata: [DONE]\n\n"
                    return
                else:
                    left, produced = left - 1, produced + count
                    trace.finished(reason, count)
                    out.append(_chunk(head, index, "".join(texts.pop(index)), reason, include_usage,
                                      scores[index].take() if scores is not None else None))
            # A chunk per choice with news: text, or (text held back) tokens scored.
            out += [_chunk(head, index, "".join(parts), None, include_usage,
                           scores[index].take() if scores is not None else None)
                    for index, parts in texts.items() if any(parts) or (scores is not None and scores[index].pending)]
            if out:
                yield "".join(out)
        if include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(prompt_tokens, produced)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if left:
            worker.cancel(job)


def _chunk(head: dict, index: int, text: str, reason: str | None, include_usage: bool,
           logprobs: dict | None = None) -> str:
    chunk = {**head, "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": reason}]}
    if include_usage:
        chunk["usage"] = None
    return f"data: {json.dumps(chunk)}\n\n"


def _check_memory(model, max_batch: int) -> None:
    """Refuse, in one line, a KV cache this machine cannot hold: it is allocated for every
    row up front (a huge --max-batch, or a checkpoint whose block_size was edited, crashed
    at start with the allocator's traceback)."""
    import psutil

    from ..model.decode import CachedDecoder

    need = CachedDecoder.cache_bytes(model, max_batch)
    have = psutil.virtual_memory().available
    if need > have // 2:  # half: the model, the server and the machine's other work need the rest
        cfg = model.config
        rows = max(1, (have // 2) // CachedDecoder.cache_bytes(model, 1))
        raise ConfigError(f"--max-batch {max_batch} needs a {need / 2**30:,.1f} GiB KV cache ({cfg.n_layer} layers x "
                          f"{max_batch} rows x block_size {cfg.block_size} x n_embd {cfg.n_embd} x keys and values); "
                          f"this machine has {have / 2**30:,.1f} GiB available: at most --max-batch {rows} here")


def serve(model, tokenizer, *, host: str = "127.0.0.1", port: int = 8000, model_id: str = "gptcore",
          max_batch: int = 16, max_queue: int = 64, limits: Limits = Limits(), api_keys: tuple[str, ...] = (),
          access_log: bool = True, allowed_hosts: tuple[str, ...] = (), drain_s: float = 10.0,
          header_timeout_s: float = 10.0) -> None:
    """Run the server until Ctrl-C or SIGTERM, then drain: no new completions (503), the ones in
    flight get up to ``drain_s`` seconds to finish, and any still decoding then end with a
    last chunk saying why. A second signal stops at once."""
    import uvicorn  # with the server only: the CLI's other commands do not need it

    if not api_keys and not loopback(host):
        # A warning, not a refusal: behind a proxy that authenticates, or on a private
        # network, an open port is a choice (vLLM and llama.cpp's server allow it too).
        print(f"gptcore serve: warning: listening on {host} with no API key: anyone who can reach this "
              "port can use the model; set --api-key or GPTCORE_API_KEY", file=sys.stderr, flush=True)
    _check_memory(model, max_batch)
    worker = Worker(model, tokenizer, max_rows=max_batch, max_queue=max_queue)
    app = create_app(worker, model_id, limits, api_keys, access_log, host, allowed_hosts)

    class Server(uvicorn.Server):
        drain_task = None

        def handle_exit(self, sig, frame) -> None:
            if app.state.draining or not self.started:  # the second signal, or not serving yet: stop now
                return super().handle_exit(sig, frame)
            app.state.draining = True
            self.loop.call_soon_threadsafe(lambda: setattr(self, "drain_task", self.loop.create_task(self.drain(sig))))

        async def drain(self, sig) -> None:
            rows = worker.stats()["rows_in_flight"]
            if rows:
                print(f"gptcore serve: stopping: {rows} completion(s) in flight get up to {drain_s:g} s to finish; "
                      "new requests get 503 (a second Ctrl-C or SIGTERM stops at once)", file=sys.stderr, flush=True)
            deadline = time.monotonic() + drain_s
            while worker.stats()["rows_in_flight"] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if worker.stats()["rows_in_flight"]:
                worker.shutdown()  # the rest end now, each stream with its last chunk
                while worker.stats()["rows_in_flight"] and time.monotonic() < deadline + 5:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.2)  # the handlers write their last chunks
            super().handle_exit(sig, None)

        async def startup(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            self.loop.set_exception_handler(once_per_kind)  # a refused accept, once, not per attempt
            await super().startup(sockets)
            if self.started:  # a port in use is uvicorn's error, already printed
                bound = self.servers[0].sockets[0].getsockname()[1]  # --port 0: the one the OS chose
                keys = f"{len(api_keys)} API key(s)" if api_keys else "no API key"
                print(f"gptcore serve: {model_id!r} on http://{host}:{bound} (playground at /, API at /v1, "
                      f"metrics at /metrics; {max_batch} rows per step, {max_queue} more may wait; {keys}); "
                      "Ctrl-C stops", file=sys.stderr, flush=True)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                   timeout_graceful_shutdown=5, http=bounded_protocol(header_timeout_s)))
    server.run()
    if not server.started:
        raise OSError(f"could not listen on {host}:{port} (in use, or not an address of this machine)")
