"""The ``gptcore`` command, run as a real program: one-shot generation through a pipe,
the interactive loop through a pseudo-terminal (Ctrl-C, /set, Ctrl-D) and through piped
stdin, and clean one-line errors for bad input. Uses a tiny char-level checkpoint."""

from __future__ import annotations

import dataclasses
import os
import select
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import never_ending_checkpoint

from gptcore.checkpoint import load_checkpoint
from gptcore.cli import main
from gptcore.generation.generate import SamplingConfig, generate

GPTCORE = Path(sys.executable).with_name("gptcore")  # the console script next to this Python
LONG = "1000000"  # max-new-tokens for a completion that is still running when interrupted
WAIT_S = 180  # upper bound for a step of a subprocess, only to fail instead of hanging


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random tiny char-level model that never picks end-of-text greedily."""
    return never_ending_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0, std=0.3)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    model, tok, _ = load_checkpoint(checkpoint)
    return model, tok


def env() -> dict:
    # One intra-op thread: tiny models gain nothing from more, and the test machine's
    # cores are shared with the test process itself.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
            "OMP_NUM_THREADS": "1", "TERM": "dumb"}


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    assert GPTCORE.is_file(), f"console script {GPTCORE} missing: pip install -e ."
    return subprocess.run([str(GPTCORE), *args], input=stdin, capture_output=True, env=env(),
                          timeout=WAIT_S)


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert b"Traceback" not in proc.stderr and b"Traceback" not in proc.stdout, proc.stderr.decode()


# --------------------------------------------------------------------------- one-shot


def test_generate_prints_prompt_and_streamed_completion(checkpoint, loaded):
    model, tok = loaded
    proc = run("generate", "--checkpoint", str(checkpoint), "--prompt", "ROMEO:",
               "--max-new-tokens", "40", "--temperature", "0")
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr.decode()
    expected = generate(model, tok, "ROMEO:", SamplingConfig(max_new_tokens=40, temperature=0))
    assert len(expected) == 40
    assert proc.stdout.decode() == "ROMEO:" + expected + "\n"


def test_num_samples_seeds_and_stop(checkpoint, loaded):
    model, tok = loaded
    args = ["generate", "--checkpoint", str(checkpoint), "--prompt", "To be", "--max-new-tokens", "30",
            "--seed", "7", "--num-samples", "2", "--top-k", "20", "--top-p", "0.9", "--temperature", "1.2"]
    first, again = run(*args), run(*args)
    assert first.returncode == 0 and first.stdout == again.stdout  # same seed, same samples
    out = first.stdout.decode()
    samples = [generate(model, tok, "To be", SamplingConfig(max_new_tokens=30, seed=7 + i, top_k=20,
                                                              top_p=0.9, temperature=1.2)) for i in range(2)]
    assert samples[0] != samples[1]
    assert out == "".join(f"{'' if i == 0 else chr(10)}--- sample {i + 1} ---\nTo be{s}\n"
                          for i, s in enumerate(samples))
    # --stop cuts each completion before the stop text
    stop = samples[0][5:7]
    cut = run("generate", "--checkpoint", str(checkpoint), "--prompt", "To be", "--max-new-tokens", "30",
              "--seed", "7", "--top-k", "20", "--top-p", "0.9", "--temperature", "1.2",
              f"--stop={stop}", "--stop", "@@")  # --stop=TEXT: TEXT may start with "-"
    assert cut.returncode == 0
    assert cut.stdout.decode() == "To be" + samples[0][:samples[0].index(stop)] + "\n"


def test_num_samples_decode_as_one_batch(checkpoint, loaded, capsys, monkeypatch):
    """N > 1 goes through the batch (the one-sample streaming path is never used), prints
    every sample in order under its header, rows stop independently at --stop, and a
    batch longer than block_size (32) crops and goes on."""
    import gptcore.generation.generate

    model, tok = loaded
    greedy = generate(model, tok, "To be", SamplingConfig(max_new_tokens=80, temperature=0))
    cfg = SamplingConfig(max_new_tokens=80, temperature=1.0, seed=3)
    free = [generate(model, tok, "To be", dataclasses.replace(cfg, seed=3 + i)) for i in range(4)]
    stop = next(c for c in string.ascii_lowercase if 1 <= sum(c in t for t in free) < 4)
    cut = [generate(model, tok, "To be", dataclasses.replace(cfg, seed=3 + i, stop=(stop,))) for i in range(4)]
    assert len(greedy) == 80 and len({len(t) for t in cut}) > 1  # the rows end at different steps

    def no_single_decodes(*args, **kwargs):
        raise AssertionError("--num-samples > 1 decoded a sample on its own")

    monkeypatch.setattr(gptcore.generation.generate, "stream", no_single_decodes)
    base = ["generate", "--checkpoint", str(checkpoint), "--prompt", "To be", "--max-new-tokens", "80"]

    def expected(samples):
        return "".join(f"{'' if i == 0 else chr(10)}--- sample {i + 1} ---\nTo be{s}\n" for i, s in enumerate(samples))

    assert main([*base, "--temperature", "0", "--num-samples", "3"]) == 0
    assert capsys.readouterr().out == expected([greedy] * 3)
    assert main([*base, "--temperature", "1", "--seed", "3", "--num-samples", "4", "--stop", stop]) == 0
    assert capsys.readouterr().out == expected(cut)


def test_output_streams_before_generation_ends(checkpoint):
    """Tokens reach a pipe as they are made: the first completion bytes arrive in a small
    chunk while a million-token run is still going (block-buffered stdout would deliver
    nothing until 8 KiB had piled up)."""
    proc = subprocess.Popen([str(GPTCORE), "generate", "--checkpoint", str(checkpoint), "--prompt", "abc",
                             "--temperature", "0", "--max-new-tokens", LONG],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    try:
        got = b""
        while len(got) <= len(b"abc"):
            ready, _, _ = select.select([proc.stdout], [], [], WAIT_S)
            assert ready, "no output"
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            assert chunk, proc.stderr.read().decode()
            got += chunk
        assert got.startswith(b"abc") and len(got) < 8192
        assert proc.poll() is None  # still generating
    finally:
        proc.kill()
        proc.wait()


def test_piped_to_a_closed_reader_exits_quietly(checkpoint):
    cmd = f"'{GPTCORE}' generate --checkpoint '{checkpoint}' --temperature 0 --max-new-tokens {LONG} | head -c 50"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, env=env(), timeout=WAIT_S)
    assert len(proc.stdout) == 50
    no_traceback(proc)
    assert proc.returncode == 0


# --------------------------------------------------------------------------- errors


def test_missing_checkpoint_is_exit_2_without_traceback(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    proc = run("generate", "--checkpoint", str(missing), "--prompt", "hi")
    assert proc.returncode == 2
    no_traceback(proc)
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and err.startswith("gptcore: error:")
    assert proc.stdout == b""


def test_invalid_top_p_is_exit_2_naming_top_p(checkpoint):
    proc = run("generate", "--checkpoint", str(checkpoint), "--top-p", "1.5")
    assert proc.returncode == 2
    no_traceback(proc)
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "top_p=1.5" in err and "allowed" in err


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-1"], "temperature=-1.0"),
    (["--top-k", "-5"], "top_k=-5"),
    (["--repetition-penalty", "0"], "repetition_penalty=0.0"),
    (["--max-new-tokens", "-2"], "max_new_tokens=-2"),
    (["--num-samples", "0"], "--num-samples=0"),
    (["--device", "nonsense"], "--device 'nonsense': not a device this machine has; allowed: cpu"),
    (["--prompt", "naïve €"], "not in the"),
])
def test_bad_values_are_one_line_exit_2(checkpoint, capsys, args, message):
    assert main(["generate", "--checkpoint", str(checkpoint), *args]) == 2
    out, err = capsys.readouterr()
    assert message in err and len(err.strip().splitlines()) == 1 and out == ""


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """Exit 2, no traceback, nothing on stdout, exactly one line on stderr: that line."""
    no_traceback(proc)
    err = proc.stderr.decode().strip()
    assert proc.returncode == 2 and proc.stdout == b"" and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("device", ["meta", "mps", "cuda", "cuda:3", "cpu:1"])
def test_devices_this_machine_lacks_are_one_short_line(checkpoint, device):
    """torch's own errors were a traceback (meta) or a 1 KB line listing every backend (mps)."""
    from gptcore.training.device import available_devices

    has = available_devices()  # on CI: ["cpu"]
    if device in has:  # e.g. cuda on a GPU machine: a valid choice there
        return
    err = one_error_line(run("generate", "--checkpoint", str(checkpoint), "--device", device))
    assert err == f"gptcore: error: --device {device!r}: not a device this machine has; allowed: {', '.join(has)}"


@pytest.mark.parametrize("args, words", [
    # 1000 threads on 2 cores made a 64-token completion take 19.9 s instead of 0.22 s.
    (["--threads", "100000"], ["--threads=100000", "at most this machine's"]),
    # The KV cache is allocated for every row up front: this crashed with the allocator's traceback.
    (["--max-batch", "100000000"], ["--max-batch 100000000 needs a", "GiB KV cache", "at most --max-batch"]),
    (["--api-key", "has space"], ["printable ASCII without spaces"]),
])
def test_serve_refuses_what_this_machine_cannot_honour_in_one_line(checkpoint, args, words):
    err = one_error_line(run("serve", "--checkpoint", str(checkpoint), "--port", "0", *args))
    for word in words:
        assert word in err, err


def _store_error(tmp_path: Path, *args: str, **extra_env: str) -> str:
    proc = subprocess.run([str(GPTCORE), "generate", *args], cwd=tmp_path, capture_output=True,
                          env={**env(), **extra_env}, timeout=WAIT_S)
    return one_error_line(proc)


@pytest.mark.slow
def test_run_id_errors_tell_missing_unreachable_and_corrupt_apart(tmp_path):
    """--run: an empty id is refused (it silently meant models/best); a store that is not
    a database (a real corrupt mlflow.db) and a tracking server nobody answers on are
    each named as such, not as "run not found" (and not a 75-line SQLAlchemy traceback)."""
    assert _store_error(tmp_path, "--run", "") == (
        "gptcore: error: --run: empty run id; allowed: a run id as `mlflow ui` or metrics/mlflow_run.json "
        "shows it (32 hex digits)")
    (tmp_path / "mlflow.db").write_bytes(os.urandom(4096))
    err = _store_error(tmp_path, "--run", "0" * 32)
    assert err == (f"gptcore: error: MLflow store sqlite:///{tmp_path.resolve() / 'mlflow.db'} is corrupt or not "
                   "an MLflow database (file is not a database); restore mlflow.db from a backup, or load the "
                   "checkpoint with --checkpoint models/best")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = _store_error(tmp_path, "--run", "0" * 32, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}")
    assert err == (f"gptcore: error: MLflow store http://127.0.0.1:{port} is unreachable (MlflowException); "
                   "start the tracking server or unset MLFLOW_TRACKING_URI to read ./mlflow.db")


def _altered_copy(checkpoint: Path, dest: Path, name: str, content: bytes) -> Path:
    """A copy of ``checkpoint`` in ``dest`` whose file ``name`` holds ``content``."""
    dest.mkdir()
    for path in checkpoint.iterdir():
        (dest / path.name).write_bytes(content if path.name == name else path.read_bytes())
    return dest


def test_tokenizer_json_saved_as_utf16_is_one_line(checkpoint, tmp_path):
    bad = _altered_copy(checkpoint, tmp_path / "utf16", "tokenizer.json",
                        (checkpoint / "tokenizer.json").read_text().encode("utf-16"))
    err = one_error_line(run("generate", "--checkpoint", str(bad), "--prompt", "hi"))
    assert err == (f"gptcore: error: {bad}: tokenizer: {bad / 'tokenizer.json'}: not UTF-8 text (byte 0: "
                   "invalid start byte); save it as UTF-8")


def test_huge_block_size_in_a_checkpoint_config_is_one_line(checkpoint, tmp_path):
    import json

    config = json.loads((checkpoint / "config.json").read_text())
    config["model"]["block_size"] = 10**12
    bad = _altered_copy(checkpoint, tmp_path / "huge", "config.json", json.dumps(config).encode())
    err = one_error_line(run("generate", "--checkpoint", str(bad)))
    assert err.startswith(f"gptcore: error: {bad / 'config.json'}: block_size=1000000000000 (the weights hold 32); "
                          "config.json and model.safetensors disagree")


def test_corrupt_checkpoint_is_exit_2(checkpoint, tmp_path, capsys):
    bad = _altered_copy(checkpoint, tmp_path / "bad", "model.safetensors", b"\x00garbage")
    assert main(["generate", "--checkpoint", str(bad)]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert main([]) == 2  # no command: usage on stderr
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--top-k", "1.5"])  # argparse: not an integer
    assert exc.value.code == 2


def test_long_prompt_warns_and_keeps_the_end(checkpoint, loaded, capsys):
    model, tok = loaded
    prompt = "abcdefghij" * 5  # 50 tokens > block_size 32
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", prompt,
                 "--max-new-tokens", "5", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert "warning" in err and "last 32" in err
    tail = generate(model, tok, prompt[-32:], SamplingConfig(max_new_tokens=5, temperature=0))
    assert out == prompt + tail + "\n"


# --------------------------------------------------------------------------- interactive


def test_interactive_with_piped_stdin(checkpoint, loaded):
    model, tok = loaded
    script = (b"/set temperature 0\n/show\n/set top_p 2\n/set bogus 1\n/nonsense\nHello\n"
              b"\xff\xfe\n/set stop e\nHello\n/set max_new_tokens 3\n/help\n")
    proc = run("generate", "--checkpoint", str(checkpoint), "--interactive", "--max-new-tokens", "25",
               stdin=script)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr.decode()
    out, err = proc.stdout.decode(), proc.stderr.decode()
    greedy = generate(model, tok, "Hello", SamplingConfig(max_new_tokens=25, temperature=0))
    stopped = generate(model, tok, "Hello", SamplingConfig(max_new_tokens=25, temperature=0, stop=["e"]))
    assert "temperature=0.0" in out and "max_new_tokens=3" in out and "/quit" in out
    assert f">>> {greedy}\n" in out and f">>> {stopped}\n" in out
    assert "top_p=2.0 is invalid" in err and "unknown setting 'bogus'" in err
    assert "unknown command '/nonsense'" in err
    assert "not in the" in err  # the undecodable line became U+FFFD, which the char vocabulary lacks
    quit_early = run("generate", "--checkpoint", str(checkpoint), "--interactive", stdin=b"/quit\nHello\n")
    assert quit_early.returncode == 0 and quit_early.stdout == b">>> "


class Terminal:
    """A program on the slave side of a pseudo-terminal that it owns as its controlling
    terminal, so the line discipline turns Ctrl-C into SIGINT and Ctrl-D into EOF."""

    # Runs in the child: setsid() came from start_new_session; TIOCSCTTY makes the tty
    # on fd 0 the controlling terminal (and this process group its foreground), then exec.
    # With sigint_ignored, SIGINT is set to ignored before the exec, as a shell does for the
    # background jobs of a script (and as the test itself may have been started).
    WRAPPER = ("import fcntl, os, signal, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
               "signal.signal(signal.SIGINT, signal.SIG_IGN if sys.argv[1] == 'ignore' else signal.SIG_DFL); "
               "os.execv(sys.argv[2], sys.argv[2:])")

    def __init__(self, argv: list[str], sigint_ignored: bool = False) -> None:
        import pty

        self.master, slave = pty.openpty()
        sigint = "ignore" if sigint_ignored else "default"
        self.proc = subprocess.Popen([sys.executable, "-c", self.WRAPPER, sigint, *argv], stdin=slave, stdout=slave,
                                     stderr=slave, env=env(), start_new_session=True, close_fds=True)
        os.close(slave)
        self.buf = b""
        self.pos = 0

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def _read(self, deadline: float) -> bytes:
        ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return b""
        try:
            data = os.read(self.master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        if not data:
            raise EOFError
        self.buf += data
        return data

    def expect(self, pattern: bytes) -> bytes:
        """Read until ``pattern`` appears after what earlier calls consumed."""
        deadline = time.monotonic() + WAIT_S
        while pattern not in self.buf[self.pos:]:
            try:
                self._read(deadline)
            except EOFError:
                raise AssertionError(f"terminal closed before {pattern!r}; output: {self.buf[-3000:]!r}") from None
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} from the program; output: {self.buf[-3000:]!r}")
        end = self.buf.index(pattern, self.pos) + len(pattern)
        seen, self.pos = self.buf[self.pos:end], end
        return seen

    def expect_more(self, n: int) -> None:
        """Read until ``n`` more bytes have arrived."""
        deadline = time.monotonic() + WAIT_S
        while len(self.buf) - self.pos < n:
            self._read(deadline)
            assert time.monotonic() < deadline, f"output stalled: {self.buf[-3000:]!r}"
        self.pos = len(self.buf)

    def wait_until_reading(self) -> None:
        """Wait until the program sleeps waiting for terminal input. A SIGINT that lands
        between input()'s prompt and its blocking select() is only acted on at the next
        keystroke (a CPython readline race, microseconds wide for a person, not for a
        test that types the moment the prompt appears)."""
        deadline = time.monotonic() + WAIT_S
        while True:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{self.proc.pid}/wchan") as f:
                wchan = f.read()
            # wchan reads "0" where the kernel hides it; then the sleeping state alone has to do
            if state == "S" and (wchan == "0" or any(w in wchan for w in ("poll", "select", "tty", "wait_woken"))):
                return
            assert time.monotonic() < deadline, f"program never waited for input (state {state}, {wchan})"
            time.sleep(0.05)

    def wait(self) -> int:
        deadline = time.monotonic() + WAIT_S
        while self.proc.poll() is None:
            try:
                self._read(min(deadline, time.monotonic() + 0.5))
            except EOFError:
                pass
            assert time.monotonic() < deadline, "program did not exit"
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


def interrupt_a_streaming_completion(term: Terminal) -> None:
    """At the prompt: start a long completion, Ctrl-C once it is visibly streaming, and
    expect it stopped and a fresh prompt."""
    term.send(b"Hello there\r")
    term.expect(b"Hello there\r\n")  # the terminal's echo of the line
    term.expect_more(20)
    term.send(b"\x03")
    term.expect(b"[stopped]")
    term.expect(b">>> ")


def test_interactive_in_a_terminal_ctrl_c_set_and_ctrl_d(checkpoint):
    term = Terminal([str(GPTCORE), "generate", "--checkpoint", str(checkpoint), "--interactive",
                     "--temperature", "0", "--max-new-tokens", LONG])
    try:
        term.expect(b">>> ")
        term.send(b"/set temperature 0.5\r")
        term.expect(b"temperature=0.5")
        term.expect(b">>> ")
        term.send(b"/set top_p 7\r")  # an error is reported and the loop goes on
        term.expect(b"top_p=7.0 is invalid")
        term.expect(b">>> ")
        term.send(b"/set temperature 0\r")
        term.expect(b"temperature=0.0")
        term.expect(b">>> ")
        interrupt_a_streaming_completion(term)
        # Ctrl-C at the prompt: just a fresh prompt
        term.wait_until_reading()
        term.send(b"half a line\x03")
        term.expect(b">>> ")
        term.send(b"/show\r")
        term.expect(b"max_new_tokens=1000000 temperature=0.0")
        term.expect(b">>> ")
        # bytes that are not UTF-8: reported, no traceback
        term.send(b"\xff\xfe\r")
        term.expect(b"error:")
        term.expect(b">>> ")
        term.send(b"\x04")  # Ctrl-D at an empty prompt: end of input
        assert term.wait() == 0
        assert b"Traceback" not in term.buf
    finally:
        term.close()


def test_interactive_ctrl_c_stops_a_completion_even_if_started_with_sigint_ignored(checkpoint):
    """A script's background job inherits SIGINT ignored, and Python keeps it so: without
    taking SIGINT back, Ctrl-C at that terminal would never stop a completion."""
    term = Terminal([str(GPTCORE), "generate", "--checkpoint", str(checkpoint), "--interactive",
                     "--temperature", "0", "--max-new-tokens", LONG], sigint_ignored=True)
    try:
        term.expect(b">>> ")
        interrupt_a_streaming_completion(term)
        term.send(b"\x04")
        assert term.wait() == 0
        assert b"Traceback" not in term.buf
    finally:
        term.close()


def test_checkpoint_path_that_is_a_file_is_exit_2(tmp_path, capsys):
    path = tmp_path / "model.bin"
    path.write_bytes(b"not a directory")
    assert main(["generate", "--checkpoint", str(path)]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == f"gptcore: error: {path}: no checkpoint directory here" and out == ""


def test_empty_prompt_and_zero_new_tokens_with_a_char_tokenizer(checkpoint, capsys):
    """An empty prompt starts from the end-of-text id (char vocabularies have one too);
    --max-new-tokens 0 prints just the prompt."""
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert len(out) == 5 + 1 and err == ""  # five characters and the final newline
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "ab", "--max-new-tokens", "0"]) == 0
    assert capsys.readouterr().out == "ab\n"
