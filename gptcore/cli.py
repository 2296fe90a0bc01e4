"""The ``gptcore`` command: ``gptcore generate`` streams text from a checkpoint, ``gptcore
serve`` answers OpenAI-style HTTP requests, ``gptcore promote`` moves the model registry's
champion alias, ``gptcore export`` writes a checkpoint as a Hugging Face model directory.

    gptcore generate --checkpoint models/best --prompt "ROMEO:" --temperature 0.8
    gptcore generate --interactive            # a prompt loop; /help lists its commands
    gptcore generate --run <mlflow run id>    # the model an MLflow run logged
    gptcore serve --port 8000                 # http://127.0.0.1:8000/ (playground), /v1/completions
    gptcore promote 3                         # version 3 of the registered model becomes champion
    gptcore export models/best hf-model       # AutoModelForCausalLM.from_pretrained("hf-model")

One-shot mode prints the prompt, then the completion as it is generated (flushed piece
by piece), then a newline. ``--num-samples N`` (N > 1) decodes the N completions as one
batch (one forward pass per step for all of them, far cheaper than N decodes) and prints
each under a "--- sample i ---" header, with the prompt, once it and every sample before
it are complete (streaming N interleaved completions would be unreadable); sample i
samples with seed + i, so it is the completion ``--seed`` + i alone would give.

Problems a user can fix (missing or corrupt checkpoint, invalid sampling value, text the
tokenizer cannot encode, unusable device) are one line on stderr and exit code 2, never a
traceback; a prompt longer than the context gets a warning on stderr and only its last
block_size tokens are used.

Interactive mode reads prompts with ``input()`` (a terminal or piped stdin) and prints
only completions. Ctrl-C stops a completion and gives a new prompt, Ctrl-C at the prompt
gives a new prompt (at a terminal, even if the program was started with SIGINT ignored),
Ctrl-D (end of input) or /quit exits with code 0; an empty line is ignored. ``/set NAME
VALUE`` changes a setting for the following prompts (errors are reported, the loop goes
on); with a seed set, every prompt is sampled with that seed.

Input bytes that are not valid UTF-8 become U+FFFD replacement characters (which a
char-level vocabulary then reports as unknown), as does output the terminal cannot
encode. A closed stdout (``| head``) ends the program quietly with code 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import tempfile

from .errors import EXIT_ERROR, EXIT_INTERRUPTED, ConfigError, GptcoreError, TokenizerError, failure, invalid
from .generation.sampling import SamplingConfig

# torch, the model, generation and MLflow are imported inside the commands that use them:
# `gptcore --help` and a usage error answer at once instead of waiting on torch's slow
# import, and only a command that reaches the MLflow store pays for MLflow's.

PROG = "gptcore"
HELP = """commands:
  /set NAME VALUE   change a setting, e.g. /set temperature 0.5, /set seed none,
                    /set stop \\n\\n (escapes \\n \\t \\\\), /set stop (no value: clear)
  /show             the current settings
  /help             this text
  /quit             exit (so does Ctrl-D)
Ctrl-C stops a completion, or clears the line at the prompt."""


def _model_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default="models/best", help="checkpoint directory (default: %(default)s)")
    src.add_argument("--run", metavar="RUN_ID",
                     help="the model logged with this MLflow run (store: MLFLOW_TRACKING_URI or ./mlflow.db)")
    src.add_argument("--model", metavar="URI",
                     help="a registered model, e.g. models:/gptcore@champion or models:/gptcore/3")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: %(default)s)")


def _parser() -> argparse.ArgumentParser:
    d = SamplingConfig()
    parser = argparse.ArgumentParser(prog=PROG, description=(
        "A from-scratch GPT: generate text from a checkpoint, serve it over an OpenAI-style "
        "HTTP API, promote a registered model version to champion, or export it to Hugging Face."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    g = sub.add_parser("generate", help="stream text from a checkpoint",
                       description="Stream a completion to stdout as it is generated.")
    _model_source(g)
    g.add_argument("--prompt", default="", help="text to continue (default: empty: start from end-of-text)")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, metavar="N",
                   help="tokens to generate (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=d.temperature, metavar="T",
                   help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=d.top_k, metavar="K", help="0 = off (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=d.top_p, metavar="P", help="1 = off (default: %(default)s)")
    g.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty, metavar="R",
                   help="1 = off (default: %(default)s)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (repeatable; --stop=TEXT if TEXT starts with '-')")
    g.add_argument("--seed", type=int, default=None, help="sample i uses seed + i (default: random)")
    g.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="completions to print, decoded as one batch (default: 1)")
    g.add_argument("--interactive", action="store_true", help="read prompts in a loop (/help lists commands)")

    s = sub.add_parser("serve", help="serve the model over HTTP (OpenAI completions API + playground page)",
                       description="An OpenAI-compatible completions server: POST /v1/completions, "
                                   "GET /v1/models, GET /health, and a playground page at /.")
    _model_source(s)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 exposes it)")
    s.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    s.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="completions decoded side by side, one forward pass per step (default: %(default)s)")
    s.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="completions that may wait for a free row; more get 503 (default: %(default)s)")
    s.add_argument("--max-tokens", type=int, default=1024, metavar="N",
                   help="largest max_tokens a request may ask for (default: %(default)s)")
    s.add_argument("--max-n", type=int, default=8, metavar="N", help="largest n per request (default: %(default)s)")
    s.add_argument("--max-body", type=int, default=1 << 20, metavar="BYTES",
                   help="largest request body; larger gets 413 (default: %(default)s)")
    s.add_argument("--model-name", default="gptcore", help="the model id clients send (default: %(default)s)")
    s.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads for decoding (default: one fewer than torch's default, at least 1: "
                        "the HTTP side needs a core too)")
    s.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require Authorization: Bearer KEY on /v1 (repeatable: any of them; default: the "
                        "environment variable GPTCORE_API_KEY, else no key). /health and /metrics stay open")
    s.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name clients may use besides this server's own (repeatable), e.g. a proxy's; "
                        "bound to loopback, only localhost, 127.0.0.1 and [::1] are accepted otherwise")
    s.add_argument("--drain-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="on Ctrl-C or SIGTERM, how long completions in flight may go on before they are cut "
                        "short, each stream ending with a last chunk that says so (default: %(default)s)")
    s.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="close a connection that has not sent a whole request head this long after connecting "
                        "or after its last response (default: %(default)s)")
    s.add_argument("--no-access-log", dest="access_log", action="store_false",
                   help="no per-request line on stderr (id, status, tokens, time to first token, total ms, finish)")

    p = sub.add_parser("promote", help="point the registry's 'champion' alias at a model version",
                       description="Set the alias champion of the registered model gptcore by hand "
                                   "(the evaluate stage moves it when a version wins on the same data).")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("version", nargs="?", help="the version number")
    which.add_argument("--run", metavar="RUN_ID", help="the version this run registered")

    e = sub.add_parser("export", help="write a checkpoint as a Hugging Face transformers model directory",
                       description="Write SOURCE's model and tokenizer to OUT for transformers: GPT2LMHeadModel "
                                   "(learned positions) or GPTNeoXForCausalLM (rotary); a model neither computes "
                                   "exactly (qk_norm, rmsnorm, logit_softcap, bias: false) is refused. OUT must be "
                                   "new or empty: an existing directory is only replaced with --force.")
    e.add_argument("source", metavar="SOURCE", help="a checkpoint directory, an MLflow run id or a models:/ URI")
    e.add_argument("out", metavar="OUT", help="the directory to write")
    e.add_argument("--format", default="hf", help="hf: Hugging Face transformers (default; the only one)")
    e.add_argument("--force", action="store_true",
                   help="replace OUT, and everything in it, if it exists and is not empty (atomically)")
    return parser


class _UsageError(GptcoreError):
    """A problem with the command line; printed as one line, exit code 2."""


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _err(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def _encode(model, tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` (raises TokenizerError), with a warning if they overflow."""
    ids = tokenizer.encode(prompt)
    block = model.config.block_size
    if len(ids) > block:
        _err(f"warning: the prompt is {len(ids)} tokens; only its last {block} (block_size) are used")
    return ids


def _complete(model, tokenizer, ids: list[int], cfg) -> None:
    """Stream one completion to stdout."""
    from .generation.generate import stream

    for piece in stream(model, tokenizer, ids, cfg):
        _out(piece)


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _set(cfg, args: str):
    """``/set NAME VALUE`` -> a new SamplingConfig (raises ConfigError or _UsageError)."""
    name, _, value = args.strip().partition(" ")
    names = [f.name for f in dataclasses.fields(cfg)]
    if name not in names:
        raise _UsageError(f"unknown setting {name!r}; settings: {', '.join(names)}")
    value = value.strip()
    if name == "stop":
        return dataclasses.replace(cfg, stop=(_unescape(value),) if value else ())
    current = getattr(cfg, name)
    try:
        if name == "seed" and value.lower() in ("none", "random", ""):
            parsed = None
        elif isinstance(current, bool):
            if value.lower() not in ("true", "false", "on", "off", "1", "0"):
                raise ValueError
            parsed = value.lower() in ("true", "on", "1")
        elif name in ("max_new_tokens", "top_k", "seed"):
            parsed = int(value)
        else:
            parsed = float(value)
    except ValueError:
        raise _UsageError(f"{name}: cannot parse {value!r}") from None
    return dataclasses.replace(cfg, **{name: parsed})


def _repl(model, tokenizer, cfg) -> int:
    if not sys.stdin.isatty():
        return _prompt_loop(model, tokenizer, cfg)
    try:
        import readline  # noqa: F401  (line editing and history for input(); not on every platform)
    except ImportError:
        pass
    # A process started with SIGINT ignored (a background job of a script, some launchers)
    # keeps it ignored: Python only installs its KeyboardInterrupt handler over the default.
    # At a terminal, Ctrl-C is how a person stops a completion, and the terminal only sends
    # it to the foreground job, so the loop takes SIGINT back while it runs.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _prompt_loop(model, tokenizer, cfg)
    finally:
        if previous is not None:  # None: set outside Python, cannot be put back from here
            signal.signal(signal.SIGINT, previous)


def _prompt_loop(model, tokenizer, cfg) -> int:
    _err("interactive mode: type a prompt and press Enter; /help for commands, Ctrl-D to exit")
    while True:
        busy = False  # True while a completion streams
        try:
            try:
                line = input(">>> ")
            except EOFError:
                _out("\n")
                return 0
            command, _, rest = line.strip().partition(" ")
            if not command:
                continue
            if command in ("/quit", "/exit"):
                return 0
            elif command == "/help":
                print(HELP, flush=True)
            elif command == "/show":
                print(cfg.describe(), flush=True)
            elif command == "/set":
                cfg = _set(cfg, rest)
                print(cfg.describe(), flush=True)
            elif command.startswith("/"):
                raise _UsageError(f"unknown command {command!r}; /help lists the commands")
            else:
                ids = _encode(model, tokenizer, line)
                busy = True
                _complete(model, tokenizer, ids, cfg)
                _out("\n")
        except KeyboardInterrupt:  # during a completion: stop it; at the prompt: a fresh prompt
            _out("\n[stopped]\n" if busy else "\n")
        except (ConfigError, TokenizerError, _UsageError) as exc:
            _err(f"error: {exc}")


def _load(args: argparse.Namespace):
    """-> (model, tokenizer) from --checkpoint or --run, on --device."""
    from .checkpoint import load_checkpoint
    from .training.device import check_device

    device = check_device(args.device, "--device")
    if args.run is not None or args.model is not None:
        from .registry import download_model, download_run_model
        with tempfile.TemporaryDirectory(prefix="gptcore-run-") as tmp:
            # Copied out of the store, then read by the same safe loader as any checkpoint.
            path = download_run_model(args.run, tmp) if args.run is not None else download_model(args.model, tmp)
            model, tokenizer, _ = load_checkpoint(path, device=device)
    else:
        model, tokenizer, _ = load_checkpoint(args.checkpoint, device=device)
    return model, tokenizer


def _serve(args: argparse.Namespace) -> int:
    for name in ("port", "max_batch", "max_queue", "max_tokens", "max_n", "max_body", "threads"):
        value, low = getattr(args, name), 0 if name in ("port", "max_queue") else 1
        if value is not None and (value < low or (name == "port" and value > 65535)):
            allowed = "0 <= port <= 65535" if name == "port" else f"an integer >= {low}"
            raise _UsageError(invalid(f"--{name.replace('_', '-')}", value, allowed))
    if not (args.drain_timeout >= 0 and args.drain_timeout < float("inf")):
        raise _UsageError(invalid("--drain-timeout", args.drain_timeout, "a number of seconds >= 0"))
    if not (args.header_timeout > 0 and args.header_timeout < float("inf")):
        raise _UsageError(invalid("--header-timeout", args.header_timeout, "a number of seconds > 0"))
    cpus = os.cpu_count() or 1
    if args.threads is not None and args.threads > cpus:  # 1000 on 2 cores made a completion 90x slower
        raise _UsageError(invalid("--threads", args.threads, f"at most this machine's {cpus} CPUs"))
    keys = args.api_key or ([os.environ["GPTCORE_API_KEY"]] if os.environ.get("GPTCORE_API_KEY") else [])
    for key in keys:  # a key is sent in a header: printable ASCII, no spaces, not blank
        if not key or not all(33 <= ord(c) <= 126 for c in key):
            raise _UsageError("an API key must be printable ASCII without spaces, and not empty "
                              "(--api-key or GPTCORE_API_KEY)")
    import torch

    from .serving.app import Limits, serve

    torch.set_num_threads(args.threads or max(1, torch.get_num_threads() - 1))
    model, tokenizer = _load(args)
    serve(model, tokenizer, host=args.host, port=args.port, model_id=args.model_name,
          max_batch=args.max_batch, max_queue=args.max_queue,
          limits=Limits(max_tokens=args.max_tokens, max_n=args.max_n, max_body=args.max_body),
          api_keys=tuple(keys), access_log=args.access_log, allowed_hosts=tuple(args.allowed_host),
          drain_s=args.drain_timeout, header_timeout_s=args.header_timeout)
    return 0


def _run(args: argparse.Namespace) -> int:
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                         stop=tuple(args.stop), seed=args.seed)
    if args.num_samples < 1:
        raise _UsageError(invalid("--num-samples", args.num_samples, "an integer >= 1"))
    model, tokenizer = _load(args)
    if args.interactive:
        return _repl(model, tokenizer, cfg)
    ids = _encode(model, tokenizer, args.prompt)
    if args.num_samples == 1:
        _out(args.prompt)
        _complete(model, tokenizer, ids, cfg)
        _out("\n")
        return 0
    from .generation.generate import stream_batch

    done: dict[int, str] = {}
    shown = 0
    for i, text in stream_batch(model, tokenizer, ids, args.num_samples, cfg):
        done[i] = text
        # In sample order: a sample that finishes early waits for the ones before it.
        while shown in done:
            _out(f"{'' if shown == 0 else chr(10)}--- sample {shown + 1} ---\n{args.prompt}{done.pop(shown)}\n")
            shown += 1
    return 0


def main(argv: list[str] | None = None) -> int:
    # Never a UnicodeError on odd input or a terminal that cannot show a character.
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace")
        except (AttributeError, ValueError, OSError):  # not a text stream, or a test's stand-in
            pass
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR

    try:
        if args.command == "promote":
            from .registry import promote_model
            version = promote_model(args.version, args.run)
            print(f"champion -> gptcore version {version}")
            return 0
        if args.command == "export":
            from .export import export_source
            print(export_source(args.source, args.out, args.format, args.force))
            return 0
        return _serve(args) if args.command == "serve" else _run(args)
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, and keep Python's own
        # final flush of stdout from failing again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        _out("\n")
        return EXIT_INTERRUPTED
    except (GptcoreError, OSError) as exc:  # OSError: e.g. an unreadable checkpoint file
        code, line = failure(exc)
        _err(line)
        return code


if __name__ == "__main__":
    sys.exit(main())
