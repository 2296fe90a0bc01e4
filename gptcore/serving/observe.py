"""What an operator sees: the door's checks (API keys; the Host header, JSON bodies and no
cross-origin preflights, against pages in a browser), Prometheus metrics at ``/metrics``,
and one access-log line per request.

Both are plain ASGI middleware around the app, so they see every ``/v1/*`` request, including
the ones a check refuses and the streamed ones (a stream's line is written when its last chunk
has gone). The completion handler records what only it knows (the id, tokens, the time of each
token, the finish reasons) on the request's :class:`Trace`.

Metrics use the standard ``prometheus_client`` library with one registry per app (a process
may hold several servers, as the tests do). ``/metrics`` and ``/health`` stay open with keys
set, as vLLM's do: load balancers and scrapers carry no key, and neither shows request content.
"""

from __future__ import annotations

import hmac
import json
import sys
import time
from dataclasses import dataclass, field

# Seconds. TTFT and inter-token latency on a CPU are milliseconds to a second; a request can
# run for minutes (1,024 tokens behind a full batch).
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass
class Trace:
    """One request, as the access log and the metrics see it."""

    start: float = field(default_factory=time.perf_counter)
    id: str = "-"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token: float | None = None
    finish: list = field(default_factory=list)
    gaps: list = field(default_factory=list)  # seconds between one choice's successive tokens
    _last: dict = field(default_factory=dict)

    def token(self, index: int) -> None:
        now = time.perf_counter()
        if self.first_token is None:
            self.first_token = now
        if index in self._last:
            self.gaps.append(now - self._last[index])
        self._last[index] = now

    def finished(self, reason: str, tokens: int) -> None:
        self.finish.append(reason)
        self.completion_tokens += tokens


def trace_of(request) -> Trace:
    """The trace the middleware made for this request (a fresh one if the app runs bare)."""
    return request.scope.setdefault("state", {}).setdefault("gptcore.trace", Trace())


class Metrics:
    """The server's Prometheus metrics, over a running worker."""

    def __init__(self, worker) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("gptcore_requests", "Requests to /v1 by route and HTTP status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("gptcore_prompt_tokens", "Prompt tokens of accepted completions", registry=r)
        self.completion_tokens = Counter("gptcore_completion_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("gptcore_time_to_first_token_seconds", "From request to its first token",
                              buckets=_FAST, registry=r)
        self.itl = Histogram("gptcore_inter_token_latency_seconds", "Between one choice's successive tokens",
                             buckets=_FAST, registry=r)
        self.latency = Histogram("gptcore_request_duration_seconds", "From request to its last byte",
                                 buckets=_SLOW, registry=r)
        self.step = Histogram("gptcore_engine_step_seconds", "One decoding step of the whole batch",
                              buckets=_FAST, registry=r)
        # Read when scraped: the worker's engine may be replaced after a failed step.
        Gauge("gptcore_queue_depth", "Completions waiting for a free row", registry=r) \
            .set_function(lambda: len(worker.engine.waiting))
        Gauge("gptcore_rows_in_flight", "Completions decoding now", registry=r) \
            .set_function(lambda: len(worker.engine.active))
        Gauge("gptcore_max_batch", "Rows decoded side by side at most (--max-batch)", registry=r) \
            .set(worker.max_rows)
        worker.on_step = self.step.observe

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def record(self, route: str, status: int, trace: Trace, end: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.prompt_tokens.inc(trace.prompt_tokens)
        self.completion_tokens.inc(trace.completion_tokens)
        if trace.first_token is not None:
            self.ttft.observe(trace.first_token - trace.start)
        for gap in trace.gaps:
            self.itl.observe(gap)
        self.latency.observe(end - trace.start)


class Observed:
    """ASGI middleware: a trace per ``/v1`` request; when the response has ended, the metrics
    and (unless off) one access-log line on stderr."""

    def __init__(self, app, metrics: Metrics, access_log: bool = True) -> None:
        self.app, self.metrics, self.access_log = app, metrics, access_log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        trace = Trace()
        scope.setdefault("state", {})["gptcore.trace"] = trace
        status = 500  # unless the app starts a response

        async def send_and_watch(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            end = time.perf_counter()
            route = scope["path"] if scope["path"] in ("/v1/completions", "/v1/models") else "other"
            self.metrics.record(route, status, trace, end)
            if self.access_log:
                ttft = f"{(trace.first_token - trace.start) * 1000:.0f}" if trace.first_token is not None else "-"
                print(f"gptcore serve: {scope['method']} {scope['path']} {trace.id} {status} "
                      f"prompt_tokens={trace.prompt_tokens} completion_tokens={trace.completion_tokens} "
                      f"ttft_ms={ttft} total_ms={(end - trace.start) * 1000:.0f} "
                      f"finish={','.join(trace.finish) or '-'}", file=sys.stderr, flush=True)


class ApiKeys:
    """ASGI middleware: with keys set, every ``/v1/*`` request needs ``Authorization: Bearer
    KEY``; otherwise 401 in OpenAI's error shape. Each key is compared in constant time, and
    all of them every time, so timing tells nothing about which key (or how much of one) matched."""

    def __init__(self, app, keys: list[str]) -> None:
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.keys and scope["path"].startswith("/v1/"):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            scheme, _, token = (given or b"").partition(b" ")
            match = False
            for key in self.keys:
                match |= hmac.compare_digest(token.strip(), key)
            if scheme.lower() != b"bearer" or not match:
                message = ("the API key is not valid" if given else
                           "this server needs an API key: send the header Authorization: Bearer <key>")
                await send_error(send, 401, message, "invalid_api_key", [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


async def send_error(send, status: int, message: str, code: str, headers: list | None = None) -> None:
    """An OpenAI-shaped error answered by middleware, before the app (and the body) is read."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


class SameOrigin:
    """ASGI middleware against web pages driving the server from a user's browser.

    - A ``POST`` to ``/v1`` must say ``Content-Type: application/json``: a page may send
      ``text/plain`` or form bodies to any address without asking first.
    - The ``Host`` header must name this server: bound to loopback, ``localhost``,
      ``127.0.0.1``, ``[::1]`` or the bound address, plus each ``--allowed-host``; bound
      elsewhere, any host unless ``--allowed-host`` lists them. A DNS-rebinding page reaches
      127.0.0.1 under its own name, and would read the answers.
    - A CORS preflight (``OPTIONS``) is refused: no page of another origin may call the API.
    """

    def __init__(self, app, host: str, allowed_hosts: list[str]) -> None:
        self.app = app
        self.allowed = {h.lower() for h in allowed_hosts}
        if loopback(host):
            self.allowed |= {"localhost", "127.0.0.1", "[::1]", host.lower()}
        self.any_host = not self.allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if not self.any_host:
            host = headers.get(b"host", b"").decode("latin-1").strip().lower()
            name = host.split("]")[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]
            if name not in self.allowed:
                return await send_error(send, 403, f"the Host {host!r} is not this server's; if it is a proxy's name "
                                                   f"for it, start the server with --allowed-host {name or 'NAME'}",
                                        "host_not_allowed")
        if scope["method"] == "OPTIONS":
            return await send_error(send, 403, "cross-origin requests are not allowed: this server sends no CORS "
                                               "headers (serve the page from this server, or call it from a backend)",
                                    "cross_origin_refused")
        if scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if kind != b"application/json":
                return await send_error(send, 415, f"the request body must be JSON, sent with Content-Type: "
                                                   f"application/json (not {kind.decode('latin-1') or 'none'!r})",
                                        "unsupported_media_type")
        await self.app(scope, receive, send)
