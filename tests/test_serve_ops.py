"""`gptcore serve` as an operator runs it: API keys (with the official `openai` client:
the right key, a wrong one, none; streamed and not), Prometheus metrics at /metrics (scraped
before and after known requests: every counter moves by exactly what those requests did),
and the access log. Real server processes on free localhost ports, as in test_serve."""

from __future__ import annotations

import re

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serve import (
    MODEL,
    PROMPT,
    WAIT_S,
    check_error,
    checkpoint,  # noqa: F401 - the fixture, shared
    request,
    running_server,
    wait_until,
)

pytestmark = pytest.mark.slow

KEYS = ("first-key-0123", "second-key-4567")


def client(s, key: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{s.base}/v1", api_key=key or "", max_retries=0, timeout=WAIT_S)


def scrape(port: int) -> dict[tuple, float]:
    """/metrics as {(sample name, sorted labels): value}."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    try:
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("Content-Type").startswith("text/plain"), r.status
        text = r.read().decode()
    finally:
        conn.close()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_api_keys_guard_v1_and_leave_health_open(checkpoint, tmp_path):  # noqa: F811
    with running_server(checkpoint, tmp_path, "--api-key", KEYS[0], "--api-key", KEYS[1]) as s:
        for key in KEYS:  # either key works, streamed and not
            with client(s, key) as c:
                done = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
                assert done.usage.completion_tokens == 4
                streamed = "".join(ch.choices[0].text for ch in c.completions.create(
                    model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, stream=True))
                assert streamed == done.choices[0].text
                assert [m.id for m in c.models.list()] == [MODEL]
        with client(s, "wrong-key") as c:
            with pytest.raises(openai.AuthenticationError) as e:
                c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
            assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=True)
            with pytest.raises(openai.AuthenticationError):
                c.models.list()
        with client(s, KEYS[0][:-1]) as c:  # a prefix of a key is not the key
            with pytest.raises(openai.AuthenticationError):
                c.models.list()
        # No key at all (raw HTTP: the openai client always sends one): the message says what to send.
        check_error(*request(s.port, "POST", "/v1/completions", {"prompt": PROMPT}), 401, code="invalid_api_key",
                    words=["needs an API key", "Authorization: Bearer"])
        check_error(*request(s.port, "GET", "/v1/models", headers={"Authorization": f"Basic {KEYS[0]}"}), 401,
                    code="invalid_api_key", words=["not valid"])
        status, health = request(s.port, "GET", "/health")  # load balancers carry no key
        assert status == 200 and health["api_key_required"] is True
        counts = scrape(s.port)
        for route in ("/v1/completions", "/v1/models"):  # each refusal counted, by route
            assert counts[("gptcore_requests_total", (("route", route), ("status", "401")))] == 3
        assert KEYS[0] not in s.log() and KEYS[1] not in s.log()  # never logged
        assert "2 API key(s)" in s.log() and "with no API key" not in s.log()


def test_the_environment_key_and_the_warning_for_an_open_port(checkpoint, tmp_path):  # noqa: F811
    (tmp_path / "env").mkdir()
    with running_server(checkpoint, tmp_path / "env", extra_env={"GPTCORE_API_KEY": KEYS[1]}) as s:
        with client(s, KEYS[1]) as c:
            assert [m.id for m in c.models.list()] == [MODEL]
        with client(s, KEYS[0]) as c, pytest.raises(openai.AuthenticationError):
            c.models.list()
    (tmp_path / "open").mkdir()
    with running_server(checkpoint, tmp_path / "open", "--host", "0.0.0.0") as s:  # noqa: S104 - the case tested
        wait_until(lambda: "http://" in s.log(), "the ready line", timeout=10)
        assert ("warning: listening on 0.0.0.0 with no API key: anyone who can reach this port can use the "
                "model; set --api-key or GPTCORE_API_KEY") in s.log()
        assert request(s.port, "GET", "/v1/models")[0] == 200


def test_metrics_move_by_exactly_the_requests_served(checkpoint, tmp_path):  # noqa: F811
    with running_server(checkpoint, tmp_path, "--max-batch", "4") as s:
        before = scrape(s.port)
        with client(s, "unused") as c:
            a = c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
            b = c.completions.create(model=MODEL, prompt="Hark", max_tokens=5, n=2, temperature=0.8, seed=3)
            streamed = list(c.completions.create(model=MODEL, prompt="O", max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True}))
            with pytest.raises(openai.BadRequestError):
                c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=-1)
        after = scrape(s.port)

        def delta(name: str, **labels) -> float:
            key = (name, tuple(sorted(labels.items())))
            return after.get(key, 0.0) - before.get(key, 0.0)

        route = "/v1/completions"
        assert delta("gptcore_requests_total", route=route, status="200") == 3
        assert delta("gptcore_requests_total", route=route, status="400") == 1
        prompt = a.usage.prompt_tokens + b.usage.prompt_tokens + streamed[-1].usage.prompt_tokens
        assert delta("gptcore_prompt_tokens_total") == prompt == len(PROMPT) + len("Hark") + len("O")
        assert delta("gptcore_completion_tokens_total") == 5 + 2 * 5 + 3
        assert delta("gptcore_time_to_first_token_seconds_count") == 3
        assert delta("gptcore_inter_token_latency_seconds_count") == 4 + 2 * 4 + 2  # tokens - 1 per choice
        assert delta("gptcore_request_duration_seconds_count") == 4  # the refused one too
        assert delta("gptcore_engine_step_seconds_count") >= 5
        assert delta("gptcore_request_duration_seconds_sum") > 0
        assert after[("gptcore_queue_depth", ())] == 0 and after[("gptcore_rows_in_flight", ())] == 0
        assert after[("gptcore_max_batch", ())] == 4

        # One access-log line per request, with what the request did.
        wait_until(lambda: s.log().count("POST /v1/completions") == 4, "four access-log lines", timeout=10)
        lines = [line for line in s.log().splitlines() if "POST /v1/completions" in line]
        pattern = (r"gptcore serve: POST /v1/completions (cmpl-[0-9a-f]{32}) 200 prompt_tokens=(\d+) "
                   r"completion_tokens=(\d+) ttft_ms=\d+ total_ms=\d+ finish=(\S+)")
        parsed = [re.fullmatch(pattern, line) for line in lines[:3]]
        assert all(parsed), lines
        assert [(m[1], int(m[2]), int(m[3]), m[4]) for m in parsed] == [
            (a.id, len(PROMPT), 5, "length"), (b.id, 4, 10, "length,length"), (streamed[0].id, 1, 3, "length")]
        assert re.fullmatch(r"gptcore serve: POST /v1/completions - 400 prompt_tokens=0 completion_tokens=0 "
                            r"ttft_ms=- total_ms=\d+ finish=-", lines[3]), lines[3]


def test_the_access_log_can_be_turned_off(checkpoint, tmp_path):  # noqa: F811
    with running_server(checkpoint, tmp_path, "--no-access-log") as s:
        with client(s, "unused") as c:
            c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert scrape(s.port)[("gptcore_requests_total", (("route", "/v1/completions"), ("status", "200")))] == 1
        assert "POST /v1/completions" not in s.log()


def test_port_0_announces_the_port_it_bound(checkpoint, tmp_path):  # noqa: F811
    """`--port 0` announced `:0`; it must print the port the OS chose, which then answers."""
    import os
    import signal
    import subprocess
    import time

    from test_serve import GPTCORE, env

    log = tmp_path / "stderr.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([str(GPTCORE), "serve", "--checkpoint", str(checkpoint), "--port", "0"],
                                stdout=err, stderr=err, env=env(), start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while not (m := re.search(r"on http://127\.0\.0\.1:(\d+) ", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        port = int(m[1])
        assert port != 0
        assert request(port, "GET", "/health")[1]["status"] == "ok"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_pages_in_a_browser_cannot_drive_the_server(checkpoint, tmp_path):  # noqa: F811
    """A web page may POST text/plain to any address without asking, and a DNS-rebinding page
    reaches 127.0.0.1 under its own host name: neither gets an answer."""
    with running_server(checkpoint, tmp_path, "--allowed-host", "proxy.example") as s:
        # ignore_eos: an unseeded draw of end-of-text would end the allowed answers after 1 token
        body = b'{"prompt": "To be", "max_tokens": 2, "ignore_eos": true}'
        check_error(*request(s.port, "POST", "/v1/completions", body, headers={"Content-Type": "text/plain"}),
                    415, code="unsupported_media_type", words=["application/json", "'text/plain'"])
        check_error(*request(s.port, "POST", "/v1/completions", body,
                             headers={"Content-Type": "application/x-www-form-urlencoded"}), 415,
                    code="unsupported_media_type")
        for path in ("/v1/completions", "/health", "/metrics", "/"):  # rebinding would read any of them
            check_error(*request(s.port, "GET", path, headers={"Host": f"rebind.example:{s.port}"}), 403,
                        code="host_not_allowed", words=["'rebind.example:", "--allowed-host rebind.example"])
        check_error(*request(s.port, "OPTIONS", "/v1/completions",
                             headers={"Origin": "https://other.example", "Access-Control-Request-Method": "POST"}),
                    403, code="cross_origin_refused")
        for host in (f"localhost:{s.port}", f"127.0.0.1:{s.port}", "proxy.example"):
            status, answer = request(s.port, "POST", "/v1/completions", body,
                                     headers={"Host": host, "Content-Type": "application/json; charset=utf-8"})
            assert status == 200 and answer["usage"]["completion_tokens"] == 2, (host, answer)
        assert request(s.port, "GET", "/health")[1]["rows_in_flight"] == 0


def test_sigterm_drains_then_ends_every_stream_properly(checkpoint, tmp_path):  # noqa: F811
    """SIGTERM cut 16 streams mid-body: no finish_reason, no [DONE], an unterminated chunked
    body. Now: new requests get 503, a short completion in flight finishes, and the streams
    still decoding when the drain time is up end with a last chunk, the reason and [DONE]."""
    import json
    import os
    import signal
    import time

    from test_serve import LONG, RawStream

    with running_server(checkpoint, tmp_path, "--max-batch", "4", "--max-tokens", str(LONG),
                        "--drain-timeout", "2") as s:
        streams = [RawStream(s, {"prompt": PROMPT, "max_tokens": LONG, "temperature": 0}) for _ in range(3)]
        try:
            for stream in streams:
                json.loads(stream.next_event())  # each is decoding
            os.kill(s.proc.pid, signal.SIGTERM)
            wait_until(lambda: "stopping: 3 completion(s) in flight" in s.log(), "the drain starts", timeout=10)
            status, health = request(s.port, "GET", "/health")
            assert status == 503 and health["status"] == "draining", health
            check_error(*request(s.port, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2}), 503,
                        code="shutting_down", kind="server_error", words=["shutting down"])
            t0 = time.monotonic()
            for stream in streams:
                events = []
                while not events or events[-1] != "[DONE]":
                    events.append(stream.next_event())
                cut = [json.loads(e) for e in events[:-1]]
                assert cut[-1]["error"]["code"] == "shutting_down", cut[-1]
                assert cut[-2]["choices"][0]["finish_reason"] == "abort", cut[-2]
                assert stream.response.read() == b"\n"  # the event's blank line, then a proper end of body
            assert time.monotonic() - t0 < 10
            assert s.proc.wait(timeout=30) is not None  # and the server exits
        finally:
            for stream in streams:
                stream.hang_up()


def test_half_sent_heads_are_closed_and_refused_accepts_logged_once(checkpoint, tmp_path):  # noqa: F811
    """Sockets sending half a request head were never closed: under a low file limit they
    starved the server, and asyncio logged a traceback per refused accept (161 MB in 25 s)."""
    import os
    import signal
    import socket
    import subprocess
    import time

    from test_serve import GPTCORE, _free_port, env

    port, log = _free_port(), tmp_path / "stderr.log"
    with open(log, "wb") as err:  # 100 file descriptors: the half-sent heads below exhaust them
        proc = subprocess.Popen(["bash", "-c", f"ulimit -n 100 && exec {GPTCORE} serve --checkpoint {checkpoint} "
                                 f"--port {port} --header-timeout 1"],
                                stdout=err, stderr=err, env=env(), start_new_session=True)
    sockets = []
    try:
        deadline = time.monotonic() + WAIT_S
        while "Ctrl-C stops" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        for _ in range(150):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")  # and no more
            sockets.append(s)
        assert sockets[0].recv(1024) == b""  # closed by the server (after about a second), not held forever
        t0 = time.monotonic()
        while True:  # the server comes back as the heads time out
            try:
                if request(port, "GET", "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() - t0 < 60, log.read_text()[-2000:]
        text = log.read_text()
        assert len(text) < 20_000, f"{len(text)} bytes of log"
        assert text.count("socket.accept() out of system resource") <= 1, text[-2000:]
    finally:
        for s in sockets:
            s.close()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
