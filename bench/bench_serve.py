"""Serving under load: the real ``gptcore serve`` process, streamed completions from
concurrent clients, at several concurrency levels in one run.

    .venv/bin/python bench/bench_serve.py [--checkpoint DIR] [--concurrency 1,8,32] [--requests N]
                                          [--max-tokens 128] [--max-batch 32] [--threads N] [--json]

Model: ``--checkpoint DIR``, by default ``models/best`` when the pipeline has made it;
otherwise a random-init checkpoint of the reference architecture (``GPTConfig()``: 4 layers,
4 heads, n_embd 128, block 256, vocab 50257, seed 0) with the GPT-2 tokenizer (built
offline from the mirror's ``vocab.bpe``/``encoder.json``: ``GPTCORE_MIRROR``, default
``../shared/mirror``), written to a temporary directory. The output says which.

Server: ``gptcore serve --checkpoint DIR --host 127.0.0.1 --port <free port> --max-batch B
[--threads N]`` in its own process group, started once for the whole run; the benchmark waits
for ``GET /health`` and reads the model id from ``GET /v1/models``, and kills the server's
process group at the end, also on Ctrl-C or an error.

Each concurrency level C: ``C`` client threads (standard library only: ``http.client``,
one fresh connection per request) first send one untimed warm-up request each, then take
the level's ``--requests`` requests (default max(32, 4 x C)) from a shared queue, each
client sending its next one as soon as its previous answer has ended (so C requests are in
flight until the queue runs dry; the level's last requests run with fewer beside them). Every request is
``POST /v1/completions`` with ``stream: true``, ``max_tokens`` = ``--max-tokens``,
``ignore_eos: true`` (so each generates exactly max_tokens tokens), temperature 0.8,
top_k 200, its own seed, and one of four short prompts in turn.

Measured per request, from just before the connection is opened:

* time to first token (TTFT): until the first server-sent ``data:`` chunk whose
  ``choices[0].text`` is not empty has been read;
* latency: until ``data: [DONE]``;
* completion tokens: the request asks for ``stream_options: {"include_usage": true}``, and
  the ``usage.completion_tokens`` of the stream's last chunk counts (a chunk may carry
  several tokens: the server merges the tokens that arrive while its previous write is
  under way; a stream without usage counts as failed). With ``ignore_eos`` every request
  must count exactly ``max_tokens``: the report says how many did.

Per level: tokens/s = all completion tokens of the timed requests / wall time from the
first timed request sent to the last one ended; TTFT and latency p50/p95 (linear
interpolation between the sorted requests) in ms; and tokens/s relative to concurrency 1
(or to the lowest level run, when 1 is not among them). A request that fails (an HTTP
error such as 503 when the server's queue is full, a broken stream) is counted as failed
and left out of the numbers; the benchmark then exits with status 1.

Client threads and the server share the machine's cores: on a small CPU the clients'
own work is part of what is measured. The machine's cores may be shared: compare numbers
from the same run only.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

HOST = "127.0.0.1"
PROMPTS = ("ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak.", "The king said",
           "Once upon a time")
SAMPLING = {"temperature": 0.8, "top_k": 200}
DEFAULT_CHECKPOINT = ROOT / "models" / "best"


# ---------------------------------------------------------------------------- model

def random_checkpoint(directory: Path) -> Path:
    """The reference architecture with random weights (seed 0) and the GPT-2 tokenizer."""
    import torch

    from gptcore.checkpoint import save_checkpoint
    from gptcore.config import GPTConfig
    from gptcore.data.tokenizer import GPT2Tokenizer
    from gptcore.model import GPT

    mirror = Path(os.environ.get("GPTCORE_MIRROR") or ROOT.parent / "shared" / "mirror")
    tokenizer = GPT2Tokenizer(mirror)
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    return save_checkpoint(directory / "random-gpt2", model, tokenizer, meta={"source": "bench_serve random init"})


def checkpoint_dir(arg: str | None, tmp: Path) -> tuple[Path, str]:
    """The checkpoint to serve and a description of it."""
    if arg:
        return Path(arg), f"{arg} (--checkpoint)"
    if (DEFAULT_CHECKPOINT / "config.json").is_file():
        return DEFAULT_CHECKPOINT, f"{DEFAULT_CHECKPOINT.relative_to(ROOT)} (the pipeline's best model)"
    path = random_checkpoint(tmp)
    return path, ("random init of GPTConfig() (4 layers, 4 heads, n_embd 128, block 256, vocab 50257, "
                  "seed 0) with the GPT-2 tokenizer: no models/best here")


# --------------------------------------------------------------------------- server

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_command(checkpoint: Path, port: int, max_batch: int, threads: int) -> list[str]:
    cmd = [str(Path(sys.executable).parent / "gptcore"), "serve", "--checkpoint", str(checkpoint),
           "--host", HOST, "--port", str(port), "--max-batch", str(max_batch)]
    return cmd + (["--threads", str(threads)] if threads else [])


class Server:
    """``gptcore serve`` in its own process group, its output in a log file."""

    def __init__(self, cmd: list[str], port: int, log: Path) -> None:
        self.port, self.log_path = port, log
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=ROOT, env=env, start_new_session=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gptcore serve exited with status {self.proc.returncode} before it was "
                                   f"ready; its output:\n{self.log_tail()}")
            try:
                status, body = self.get("/health", timeout=2.0)
                if status == 200 and json.loads(body).get("status") == "ok":
                    return
            except (OSError, http.client.HTTPException, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"gptcore serve did not answer GET /health with 200 within {timeout:.0f} s; "
                           f"its output:\n{self.log_tail()}")

    def model_id(self) -> str:
        status, body = self.get("/v1/models")
        if status != 200:
            raise RuntimeError(f"GET /v1/models: HTTP {status}: {body[:500]!r}")
        return json.loads(body)["data"][0]["id"]

    def stop(self) -> None:
        """SIGTERM to the server's process group; SIGKILL if it is not gone within 10 s."""
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


# --------------------------------------------------------------------------- client

def stream_completion(port: int, body: dict, timeout: float) -> dict:
    """One streamed ``POST /v1/completions``, timed from before the connection opens."""
    result = {"ok": False, "ttft_s": None, "latency_s": None, "tokens": 0, "usage": None,
              "error": None}
    payload = json.dumps(body).encode()
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body=payload,
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            result["error"] = f"HTTP {resp.status}: {resp.read()[:300].decode(errors='replace')}"
            return result
        finish, data, done = None, [], False
        eof = False
        while not done and not eof:
            raw = resp.readline()
            eof = not raw  # ends the event in progress, if any, like a blank line
            line = raw.decode("utf-8").rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
                continue
            if line or not data:  # a comment (":..."), another field, or a blank line with no event
                continue
            event, data = "\n".join(data), []
            if event == "[DONE]":
                done = True
                break
            chunk = json.loads(event)
            if "error" in chunk:
                result["error"] = f"error event: {json.dumps(chunk['error'])[:300]}"
                return result
            if chunk.get("usage"):
                result["usage"] = chunk["usage"].get("completion_tokens")
            if not chunk.get("choices"):
                continue  # the usage chunk
            choice = chunk["choices"][0]
            text = choice.get("text") or ""
            if text and result["ttft_s"] is None:
                result["ttft_s"] = time.perf_counter() - t0
            finish = choice.get("finish_reason") or finish
        result["latency_s"] = time.perf_counter() - t0
        if not done:
            result["error"] = "the stream ended without data: [DONE]"
            return result
        if result["usage"] is None:
            result["error"] = "the stream carried no usage chunk"
            return result
        result.update(ok=True, finish_reason=finish, tokens=result["usage"])
        return result
    except (OSError, http.client.HTTPException, ValueError, UnicodeDecodeError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    finally:
        conn.close()


def run_clients(port: int, bodies: list[dict], concurrency: int, timeout: float) -> tuple[list[dict], float]:
    """Send ``bodies`` from ``concurrency`` threads, each taking the next one when its last
    has ended; (results in request order, wall seconds from the first send to the last end)."""
    results: list[dict | None] = [None] * len(bodies)
    queue = iter(range(len(bodies)))
    lock, go = threading.Lock(), threading.Event()

    def client() -> None:
        go.wait()
        while True:
            with lock:
                i = next(queue, None)
            if i is None:
                return
            results[i] = stream_completion(port, bodies[i], timeout)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the sorted values (numpy's default), q in [0, 1]."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_level(port: int, model: str, concurrency: int, requests: int, max_tokens: int,
              seeds: Iterator[int], timeout: float) -> dict:
    def body(i: int) -> dict:
        return {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True, "seed": next(seeds), **SAMPLING}

    warm, _ = run_clients(port, [body(i) for i in range(concurrency)], concurrency, timeout)
    failed = [r for r in warm if not r["ok"]]
    if failed:
        raise RuntimeError(f"concurrency {concurrency}: {len(failed)} of {len(warm)} warm-up requests failed; "
                           f"first: {failed[0]['error']}")
    results, wall = run_clients(port, [body(i) for i in range(requests)], concurrency, timeout)
    ok = [r for r in results if r["ok"]]

    def ms(xs: list[float], q: float) -> float | None:
        p = percentile(xs, q)
        return None if p is None else p * 1e3

    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    latency = [r["latency_s"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    errors = [r["error"] for r in results if not r["ok"]]
    return {"concurrency": concurrency, "requests": requests, "failed": len(errors),
            "first_error": errors[0] if errors else None,
            "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "exact_max_tokens": f"{sum(r['tokens'] == max_tokens for r in ok)} of {len(ok)}",
            "ttft_ms": {"p50": ms(ttft, 0.5), "p95": ms(ttft, 0.95)},
            "latency_ms": {"p50": ms(latency, 0.5), "p95": ms(latency, 0.95)}}


# ----------------------------------------------------------------------------- main

def concurrency_list(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,8,32") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1, e.g. 1,8,32")
    return levels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="checkpoint to serve (default: models/best if it exists, "
                                         "else a random-init GPTConfig() with the GPT-2 tokenizer)")
    ap.add_argument("--concurrency", type=concurrency_list, default=[1, 8, 32],
                    help="client threads per level, comma-separated (default: 1,8,32)")
    ap.add_argument("--requests", type=int, default=0,
                    help="timed requests per level (default 0: max(32, 4 x concurrency))")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens per completion (default %(default)s)")
    ap.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch (default %(default)s)")
    ap.add_argument("--threads", type=int, default=0, help="the server's --threads (0 = its default)")
    ap.add_argument("--startup-timeout", type=float, default=180.0,
                    help="seconds to wait for GET /health (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="socket timeout of a request, seconds (default %(default)s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    for name in ("requests", "threads"):
        if getattr(args, name) < 0:
            ap.error(f"--{name}={getattr(args, name)} is invalid; allowed: 0 (default) or an integer >= 1")
    for name in ("max_tokens", "max_batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid; allowed: an integer >= 1")
    if args.requests and args.requests < max(args.concurrency):
        ap.error(f"--requests {args.requests} is below concurrency {max(args.concurrency)}: "
                 "some clients would send nothing")

    # SIGTERM ends the run like Ctrl-C does: through the finally that stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    from machine import describe, headline

    levels, seeds = [], itertools.count()
    try:
        with tempfile.TemporaryDirectory(prefix="bench_serve-") as tmp:
            tmp = Path(tmp)
            checkpoint, source = checkpoint_dir(args.checkpoint, tmp)
            port = free_port()
            server = Server(server_command(checkpoint, port, args.max_batch, args.threads), port,
                            tmp / "server.log")
            try:
                t0 = time.perf_counter()
                server.wait_ready(args.startup_timeout)
                startup_s = time.perf_counter() - t0
                model = server.model_id()
                for c in args.concurrency:
                    requests = args.requests or max(32, 4 * c)
                    levels.append(run_level(port, model, c, requests, args.max_tokens, seeds, args.timeout))
                    if server.proc.poll() is not None:
                        raise RuntimeError(f"gptcore serve exited with status {server.proc.returncode}; "
                                           f"its output:\n{server.log_tail()}")
            finally:
                server.stop()
    except KeyboardInterrupt:
        print("bench_serve: interrupted (the server, if started, is stopped)", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench_serve: {exc}", file=sys.stderr)
        return 1

    base = next((lv for lv in levels if lv["concurrency"] == 1), min(levels, key=lambda lv: lv["concurrency"]))
    for lv in levels:
        lv["ratio_vs_base"] = lv["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None
    info = describe()
    threads = args.threads or f"server default: torch's - 1 = {max(1, info['threads'] - 1)}"
    info["threads"] = args.threads or info["threads"]
    failed = sum(lv["failed"] for lv in levels)
    if args.json:
        print(json.dumps({
            "benchmark": "serve", "checkpoint": source, "model_id": model, "machine": info,
            "server": {"max_batch": args.max_batch, "threads": threads, "startup_s": startup_s},
            "request": {"max_tokens": args.max_tokens, "stream": True, "stream_options": {"include_usage": True},
                        "ignore_eos": True, **SAMPLING, "prompts": list(PROMPTS),
                        "warmup": "one untimed request per client per level"},
            "ratio_base_concurrency": base["concurrency"], "levels": levels}, indent=2))
    else:
        print(f"gptcore serve under load: {source}")
        print(f"model id {model!r}; --max-batch {args.max_batch}, --threads "
              f"{threads}; server ready in {startup_s:.1f} s")
        print(headline(info))
        print(f"per request: streamed (with usage), max_tokens {args.max_tokens}, ignore_eos, temperature "
              f"{SAMPLING['temperature']}, top_k {SAMPLING['top_k']}, own seed, {len(PROMPTS)} prompts in turn; "
              f"one untimed warm-up request per client per level")
        print()
        vs = f"vs c={base['concurrency']}"
        print(f"{'concurrency':>11s} {'requests':>9s} {'failed':>6s} {'tokens/s':>9s} {vs:>7s} "
              f"{'TTFT p50':>9s} {'TTFT p95':>9s} {'lat p50':>9s} {'lat p95':>9s}  exact max_tokens")
        fmt = lambda v: "-" if v is None else f"{v:,.0f}"  # noqa: E731
        for lv in levels:
            ratio = "-" if lv["ratio_vs_base"] is None else f"{lv['ratio_vs_base']:.2f}x"
            print(f"{lv['concurrency']:11d} {lv['requests']:9d} {lv['failed']:6d} {lv['tokens_per_s']:9,.1f} "
                  f"{ratio:>7s} {fmt(lv['ttft_ms']['p50']):>9s} {fmt(lv['ttft_ms']['p95']):>9s} "
                  f"{fmt(lv['latency_ms']['p50']):>9s} {fmt(lv['latency_ms']['p95']):>9s}  "
                  f"{lv['exact_max_tokens']:>16s}")
        print("(TTFT and latency in ms; tokens/s = all completion tokens of the level / its wall time)")
    if failed:
        first = next(lv["first_error"] for lv in levels if lv["failed"])
        print(f"bench_serve: {failed} request(s) failed; first: {first}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
