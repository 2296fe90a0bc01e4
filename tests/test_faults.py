"""Fault handling of the real stages (`python -m stages.<name>` subprocesses in a tiny
copy of the project): bad params, interrupts and resume, MLflow down, missing or
corrupt inputs. Each failure is one clear line, a distinct exit code, and no damage
to outputs that already exist."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import project_copy
import pytest
from project_copy import (
    TINY_CHAR,
    add_train_dep,
    ok,
    run_stage,
    signal_after_first_checkpoint,
    snapshot,
    trained_project,
)


def error_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The stage failed with ``code`` and said so in exactly one line, no traceback."""
    assert proc.returncode == code, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def write_params(root: Path, over: dict) -> None:
    project_copy.write_params(root, TINY_CHAR, over)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory, mirror_dir):
    """A tiny project with data, a trained model and metrics from a first real run."""
    return trained_project(tmp_path_factory.mktemp("faults") / "gptcore", mirror_dir)


@pytest.fixture
def params_restored(project):
    root, _ = project
    saved = (root / "params.yaml").read_text()
    yield
    (root / "params.yaml").write_text(saved)


# -- bad params --------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("model:\n  n_layr: 2\n", ["model", "unknown key", "'n_layr'"]),
    ("model:\n  n_embd: 30\n  n_head: 4\n", ["model.n_embd=30", "multiple of n_head=4"]),
    ("train:\n  learning_rate: -0.001\n", ["train.learning_rate=-0.001", "> 0"]),
    ("model:\n  n_layer: [1\ntrain: {}\n", ["not valid YAML", "line 2"]),
], ids=["unknown-key", "n_embd-not-divisible", "negative-lr", "invalid-yaml"])
def test_bad_params_fail_cleanly_and_touch_nothing(project, params_restored, text, expected):
    root, env = project
    before = snapshot(root)
    assert "metrics/train.json" in before and "models/best/model.safetensors" in before
    (root / "params.yaml").write_text(text)
    for name in ("train", "evaluate"):
        line = error_line(run_stage(name, root, env))
        assert line.startswith("error: params.yaml: "), line
        for part in expected:
            assert part in line, line
    assert snapshot(root) == before
    assert not list(root.glob(".gptcore/runs/*"))  # no training was started


def test_model_too_small_for_the_tokenizer_is_a_clear_error(project, params_restored):
    root, env = project
    before = snapshot(root)
    write_params(root, {"model": {"vocab_size": 32}})  # the char vocabulary has 66 ids
    line = error_line(run_stage("train", root, env))
    assert line == "error: model.vocab_size=32 is smaller than the tokenizer's 66 ids", line
    assert snapshot(root) == before


# -- bad train.init_from -----------------------------------------------------------------

def _init_other_shape(root: Path, init: Path, mirror_dir: Path, marker: Path) -> str:
    from gptcore.checkpoint import load_checkpoint, save_checkpoint
    from gptcore.model import GPT

    model, tok, _ = load_checkpoint(root / "models/best")
    save_checkpoint(init, GPT(dataclasses.replace(model.config, n_layer=2)), tok)
    return init.name


def _init_other_tokenizer(root: Path, init: Path, mirror_dir: Path, marker: Path) -> str:
    from gptcore.checkpoint import load_checkpoint, save_checkpoint
    from gptcore.data.tokenizer import GPT2Tokenizer
    from gptcore.model import GPT

    model, _, _ = load_checkpoint(root / "models/best")
    save_checkpoint(init, GPT(dataclasses.replace(model.config, vocab_size=50257)), GPT2Tokenizer(mirror_dir))
    return init.name


def _init_pickle(root: Path, init: Path, mirror_dir: Path, marker: Path) -> str:
    import torch
    from test_checkpoint import Payload

    init.mkdir()
    (init / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32,
                                                  "n_positions": 32, "vocab_size": 128}))
    torch.save({"transformer.wte.weight": Payload(os.system, f"touch '{marker}'")}, init / "pytorch_model.bin")
    return f"hf:{init.name}"


@pytest.mark.parametrize("setup, listed, expected", [
    (_init_other_shape, True, "error: train.init_from='init-bad': model.* differs from the init model: n_layer=1 "
                              "(init: 2); make params.yaml describe it (dvc exp run -S model.n_layer=2)"),
    (_init_other_tokenizer, True, "error: train.init_from='init-bad': its tokenizer (gpt2, 50257 ids) is not the "
                                  "data's (char, 66 ids); set tokenizer.kind=gpt2 and re-run tokenize with this "
                                  "train.init_from, so token ids mean what they meant in pretraining"),
    (lambda *_: "init-bad", False, "error: train.init_from='init-bad': no such directory '{root}/init-bad'; "
                                   "allowed: scratch, a checkpoint directory, models:/gptcore@ALIAS, "
                                   "models:/gptcore/VERSION or hf:<directory>"),
    (lambda *_: "models:/gptcore@nope", False, "error: train.init_from 'models:/gptcore@nope': not found in "
                                               "sqlite:///{root}/mlflow.db ("),
    (_init_pickle, True, "error: train.init_from='hf:init-bad': init-bad/pytorch_model.bin: refused to load: it "
                         "holds more than tensors and plain containers, and unpickling it could run code (it "
                         "references posix.system); allowed: tensors only"),
], ids=["other-shape", "other-tokenizer", "missing-dir", "unknown-alias", "pickle-in-hf-bin"])
def test_bad_init_from_fails_cleanly_and_touches_nothing(project, params_restored, mirror_dir, tmp_path,
                                                        setup, listed, expected):
    """Each train.init_from problem is one line naming it and the fix, before anything in
    models/, metrics/ or data/ is touched and before a run starts. A local init directory
    must be a dep of the train stage, so the cases that reach the init model list it."""
    root, env = project
    before = snapshot(root)
    dvc_yaml = (root / "dvc.yaml").read_text()
    init, marker = root / "init-bad", tmp_path / "ran"
    try:
        spec = setup(root, init, mirror_dir, marker)
        if listed:
            add_train_dep(root, init.name)
        write_params(root, {"train": {"init_from": spec}})
        line = error_line(run_stage("train", root, env))
    finally:
        (root / "dvc.yaml").write_text(dvc_yaml)
        shutil.rmtree(init, ignore_errors=True)
    assert line.startswith(expected.format(root=root)), line
    assert not marker.exists()  # the pickle was refused, never run
    assert snapshot(root) == before
    assert not list(root.glob(".gptcore/runs/*"))  # no training was started


# -- missing or corrupt inputs -----------------------------------------------------------

def test_evaluate_without_a_model_is_a_clear_error(project):
    root, env = project
    best, aside = root / "models/best", root / "models/moved-aside"
    best.rename(aside)
    try:
        line = error_line(run_stage("evaluate", root, env))
    finally:
        aside.rename(best)
    assert line.startswith("error: models/best") and "no checkpoint" in line, line
    assert not (root / "metrics/eval.json").exists()


def test_checkpoint_from_another_tokenizer_is_refused(project):
    root, env = project
    spec_path = root / "models/best/tokenizer.json"
    saved = spec_path.read_text()
    before = snapshot(root)
    spec = json.loads(saved)
    spec["chars"] = spec["chars"][::-1]  # same size, other ids: text would be scored wrongly
    spec_path.write_text(json.dumps(spec))
    try:
        line = error_line(run_stage("evaluate", root, env))
    finally:
        spec_path.write_text(saved)
    assert line.startswith("error: models/best: trained with another tokenizer (char, 66 ids) than "
                           "data/processed (char, 66 ids)"), line
    assert snapshot(root) == before  # metrics/eval.json untouched


FULL_DISK = """
import errno, runpy, sys
import safetensors.torch as st
real, calls = st.save_file, []
def save_file(tensors, filename, metadata=None):
    calls.append(filename)
    if len(calls) == int(sys.argv[1]):  # this write finds the disk full
        raise OSError(errno.ENOSPC, "No space left on device", filename)
    return real(tensors, filename, metadata=metadata)
st.save_file = save_file
runpy.run_module("stages.train", run_name="__main__")
"""


@pytest.mark.parametrize("failing_write", [1, 3], ids=["first-best", "later-checkpoint"])
def test_full_disk_during_a_checkpoint_fails_cleanly(project, failing_write):
    root, env = project
    before = snapshot(root)
    try:
        proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(failing_write)], cwd=root, env=env,
                              capture_output=True, text=True, timeout=180)
        assert not list(root.glob(".gptcore/runs/*/*.tmp")) and not list(root.glob(".gptcore/runs/*/.*tmp"))
    finally:
        shutil.rmtree(root / ".gptcore", ignore_errors=True)  # the next test starts a fresh run
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]  # after the progress lines of the steps that ran
    assert line.startswith("error: No space left on device (") and "model.safetensors" in line, line
    assert "outputs already written are intact" in line
    assert snapshot(root) == before  # the published model and metrics are the previous run's


FULL_DISK_TOKENIZE = """
import errno, runpy
import gptcore.data.corpus as corpus
real_open = open
class Filling:  # a disk that fills up after 20,000 bytes of token ids
    def __init__(self, f):
        self.f, self.n = f, 0
    def write(self, data):
        self.n += len(data)
        if self.n > 20_000:
            raise OSError(errno.ENOSPC, "No space left on device")  # as a buffered write raises it: no file named
        return self.f.write(data)
    def __getattr__(self, name):
        return getattr(self.f, name)
def filling_open(path, mode="r", *args, **kwargs):
    f = real_open(path, mode, *args, **kwargs)
    return Filling(f) if str(path).endswith(".bin") and "w" in mode else f
corpus.open = filling_open
runpy.run_module("stages.tokenize", run_name="__main__")
"""


def test_full_disk_during_tokenize_says_so_and_names_the_file(project):
    # numpy's tofile said only "317725 requested and 149378 written".
    root, env = project
    before = snapshot(root)
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_TOKENIZE], cwd=root, env=env, capture_output=True,
                          text=True, timeout=180)
    line = error_line(proc)
    assert line.startswith("error: No space left on device (") and "train.bin" in line, line
    assert "outputs already written are intact" in line, line
    assert snapshot(root) == before  # data/processed is the previous run's


def test_outputs_outside_the_project_are_refused_before_anything_runs(project, params_restored, tmp_path):
    # One outside passed, ran once, then failed inside DVC with an empty reason.
    root, env = project
    before = snapshot(root)
    outside = tmp_path / "elsewhere"
    for key, section, stage in (("processed_dir", "data", "tokenize"), ("out_dir", "train", "train"),
                                ("raw_dir", "data", "download")):
        for value in ("../elsewhere", str(outside)):
            write_params(root, {section: {key: value}})
            line = error_line(run_stage(stage, root, env))
            assert f"{section}.{key}={value!r} is not inside the project" in line, line
            assert "allowed: a relative path" in line, line
    assert not outside.exists() and not (root.parent / "elsewhere").exists()
    assert snapshot(root) == before


FULL_DISK_ON_FSYNC = """
import errno, os, runpy, sys
def fsync(fd):  # the disk fills up as the metrics file is flushed
    raise OSError(errno.ENOSPC, "No space left on device")
os.fsync = fsync
runpy.run_module("stages." + sys.argv[1], run_name="__main__")
"""


@pytest.mark.slow
def test_full_disk_during_a_metrics_write_keeps_the_previous_file(project):
    root, env = project
    ok(run_stage("evaluate", root, env))  # a complete metrics/eval.json to keep
    before = snapshot(root)
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_ON_FSYNC, "evaluate"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: No space left on device") and "outputs already written are intact" in line, line
    assert snapshot(root) == before  # eval.json is the previous one, whole
    assert not list((root / "metrics").glob(".*.tmp"))  # the half-written temp file is gone


DIVERGE = """
import runpy, sys
from gptcore.model.gpt import GPT
real, calls = GPT.forward, []
def forward(self, *args, **kwargs):
    logits, loss = real(self, *args, **kwargs)
    if self.training:
        calls.append(1)
        if len(calls) == int(sys.argv[1]):  # this step's loss overflows
            loss = loss * float("inf")
    return logits, loss
GPT.forward = forward
runpy.run_module("stages.train", run_name="__main__")
"""


def test_diverging_run_stops_naming_the_step_and_publishes_nothing(project):
    root, env = project
    before = snapshot(root)
    proc = subprocess.run([sys.executable, "-c", DIVERGE, "5"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: training loss is inf at step 5: the run diverged; the best model "
                           "so far (step 3) is in "), line
    # grad_clip is on (1.0) in this project: only the learning rate is advised, with its value.
    assert line.endswith("; lower train.learning_rate (now 0.0015)"), line
    assert snapshot(root) == before  # nothing published: models/ and metrics/ are the last good run's
    (best,) = root.glob(".gptcore/runs/*/best")
    assert json.loads((best / "config.json").read_text())["meta"]["step"] == 3
    shutil.rmtree(root / ".gptcore")  # the next test starts a fresh run


SLOW_WRITE = """
import runpy, sys, time
import gptcore.io as gio
real = gio.os.replace
def replace(src, dst):  # the temporary file is complete; pause before it takes the name
    if str(dst).endswith(sys.argv[1]):
        print("WRITING", flush=True)
        time.sleep(60)
    return real(src, dst)
gio.os.replace = replace
runpy.run_module(sys.argv[2], run_name="__main__")
"""


@pytest.mark.parametrize("name, output", [("evaluate", "eval.json"), ("sample", "samples.md")])
def test_sigterm_while_writing_metrics_leaves_no_partial_file(project, name, output):
    root, env = project
    before = snapshot(root)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, output, f"stages.{name}"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING", proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "interrupted: SIGTERM; outputs already written are intact"
    assert snapshot(root) == before
    assert not [p.name for p in (root / "metrics").iterdir() if p.name.startswith(".")]  # no temp files


def test_evaluate_with_a_truncated_model_is_a_clear_error(project):
    root, env = project
    weights = root / "models/best/model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    try:
        line = error_line(run_stage("evaluate", root, env))
    finally:
        weights.write_bytes(good)
    assert "model.safetensors" in line and "truncated or corrupt" in line, line


def test_evaluate_with_a_utf16_tokenizer_json_is_a_clear_error(project):
    """An editor that saves tokenizer.json as UTF-16 ("Unicode"): one line, not a
    UnicodeDecodeError traceback."""
    root, env = project
    path = root / "models/best/tokenizer.json"
    good = path.read_bytes()
    path.write_bytes(good.decode("utf-8").encode("utf-16"))
    try:
        line = error_line(run_stage("evaluate", root, env))
    finally:
        path.write_bytes(good)
    assert line == ("error: models/best: tokenizer: models/best/tokenizer.json: not UTF-8 text (byte 0: "
                    "invalid start byte); save it as UTF-8"), line


@pytest.mark.parametrize("kind", ["fifo", "socket", "broken link", "symlink loop"])
def test_special_files_in_a_folder_source_are_refused_up_front(project, params_restored, kind):
    """A folder source's *.txt entries that are not regular files were skipped silently
    (broken links, FIFOs) or hung the reader; each is now one line naming it, and the
    processed data of the last good run stays."""
    root, env = project
    corpus = root / "corpus"
    corpus.mkdir()
    dvc_yaml = (root / "dvc.yaml").read_text()
    try:
        (corpus / "a.txt").write_text("Some text to train on. " * 500)
        odd = corpus / "b.txt"
        if kind == "fifo":
            os.mkfifo(odd)
        elif kind == "socket":
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(str(odd))
            sock.close()
        else:
            odd.symlink_to("nowhere.txt" if kind == "broken link" else "b.txt")
        (root / "dvc.yaml").write_text(dvc_yaml.replace("# - data/corpus", "- corpus"))
        write_params(root, {"data": {"sources": [{"path": "corpus"}]}})
        before = snapshot(root)
        line = error_line(run_stage("tokenize", root, env, timeout=60))
        expected = {"fifo": "a FIFO (named pipe)", "socket": "a socket", "broken link": "a broken symlink",
                    "symlink loop": "a symlink loop"}[kind]
        assert line.startswith(f"error: data.sources[0]: corpus/b.txt is {expected}; allowed: regular files"), line
        assert snapshot(root) == before
    finally:
        (root / "dvc.yaml").write_text(dvc_yaml)
        shutil.rmtree(corpus)


def test_truncated_train_bin_is_a_clear_error(project):
    root, env = project
    before = snapshot(root)
    path = root / "data/processed/train.bin"
    good = path.read_bytes()
    path.write_bytes(good[:1001])
    try:
        line = error_line(run_stage("train", root, env))
    finally:
        path.write_bytes(good)
    meta = json.loads((root / "data/processed/meta.json").read_text())
    assert "data/processed/train.bin: 500 tokens" in line, line
    assert f"meta.json says {meta['train_tokens']}" in line and "tokenize" in line, line
    assert snapshot(root) == before


# -- MLflow down -------------------------------------------------------------------------

@pytest.mark.slow
def test_train_and_evaluate_without_mlflow(project, params_restored):
    root, env = project
    write_params(root, {"train": {"seed": 7}})  # a new run, so train really runs
    before = json.loads((root / "metrics/train.json").read_text())
    down = {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{closed_port()}"}
    t0 = time.monotonic()
    proc = ok(run_stage("train", root, down, timeout=120))
    assert "warning: MLflow unavailable" in proc.stderr and "continuing without tracking" in proc.stderr
    assert proc.stderr.count("warning: MLflow unavailable") == 1
    after = json.loads((root / "metrics/train.json").read_text())
    assert after["steps"] == 6 and after != before
    assert (root / "models/best/model.safetensors").is_file()
    assert json.loads((root / "metrics/mlflow_run.json").read_text()) == {"run_id": None}
    assert not list(root.glob(".gptcore/runs/*"))  # work in progress cleaned up
    proc = ok(run_stage("evaluate", root, down, timeout=120))
    assert "warning: MLflow unavailable" in proc.stderr
    assert json.loads((root / "metrics/eval.json").read_text())["val_tokens"] > 0
    assert time.monotonic() - t0 < 100  # no retrying against the dead server for minutes


LOCK_HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")  # no other connection may read or write until we exit
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_locked_mlflow_store_warns_once_and_the_next_run_logs(project, params_restored):
    """Another process holds an exclusive lock on mlflow.db for the whole train stage:
    the stage warns once and completes; once the lock is gone, the next run logs."""
    root, env = project
    ok(run_stage("train", root, env, timeout=120))  # make sure the store exists
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(root / "mlflow.db")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        write_params(root, {"train": {"seed": 8}})
        proc = ok(run_stage("train", root, env, timeout=180))
        assert proc.stderr.count("warning: MLflow unavailable") == 1, proc.stderr
        warning = next(line for line in proc.stderr.splitlines() if "MLflow unavailable" in line)
        assert "database is locked" in warning and "continuing without tracking" in warning  # one line, says why
        assert "SELECT" not in proc.stderr and "sqlalche.me" not in proc.stderr
        assert json.loads((root / "metrics/train.json").read_text())["steps"] == 6
        assert (root / "models/best/model.safetensors").is_file()
        assert json.loads((root / "metrics/mlflow_run.json").read_text()) == {"run_id": None}
    finally:
        holder.kill()
        holder.wait()
    write_params(root, {"train": {"seed": 9}})
    proc = ok(run_stage("train", root, env, timeout=120))
    assert "MLflow unavailable" not in proc.stderr
    run_id = json.loads((root / "metrics/mlflow_run.json").read_text())["run_id"]
    from mlflow.tracking import MlflowClient
    run = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}").get_run(run_id)
    assert run.data.params["train.seed"] == "9" and "val_loss" in run.data.metrics


@pytest.mark.slow
def test_unwritable_mlflow_store_warns_and_completes(project, params_restored, tmp_path):
    """The store's directory cannot be written (read-only for a normal user; root ignores
    permissions, so then a path under /proc, which nobody can create files in)."""
    root, env = project
    if os.geteuid() == 0:
        where = Path("/proc/gptcore-store")
    else:
        where = tmp_path / "ro"
        where.mkdir()
        where.chmod(0o555)
    write_params(root, {"train": {"seed": 10}})
    proc = ok(run_stage("train", root, {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{where / 'mlflow.db'}"},
                    timeout=120))
    assert proc.stderr.count("warning: MLflow unavailable") == 1, proc.stderr
    assert json.loads((root / "metrics/train.json").read_text())["steps"] == 6
    assert json.loads((root / "metrics/mlflow_run.json").read_text()) == {"run_id": None}
    assert not (where / "mlflow.db").exists()


# -- interrupt and resume ----------------------------------------------------------------

@pytest.mark.slow
def test_sigint_saves_state_and_rerun_resumes(project, params_restored):
    from mlflow.tracking import MlflowClient

    from gptcore.checkpoint import load_trainer_state

    root, env = project
    write_params(root, {"train": {"max_steps": 1200, "checkpoint_interval": 20, "eval_interval": 400,
                                  "log_interval": 300}})
    rc, _, err = signal_after_first_checkpoint([sys.executable, "-m", "stages.train"], root, env,
                                               signal.SIGINT)
    assert rc == 130, err
    assert "Traceback" not in err
    (last,) = root.glob(".gptcore/runs/*/last")
    state = load_trainer_state(last)
    step = state["step"]
    assert 20 <= step < 1200
    assert f"interrupted: SIGINT at step {step}: state saved to {last}; run again to resume" in err
    assert state["run_id"]

    again = ok(run_stage("train", root, env))
    assert f"resuming from step {step}" in again.stderr
    result = json.loads((root / "metrics/train.json").read_text())
    assert result["steps"] == 1200 and result["resumed_from_step"] == step
    assert result["tokens_seen"] == 1200 * 4 * 32
    lines = (root / "metrics/train_log.csv").read_text().splitlines()
    assert len(lines) == 1201 and [int(r.split(",")[0]) for r in lines[1:]] == list(range(1, 1201))
    assert not list(root.glob(".gptcore/runs/*"))

    # The resumed process logged into the run the interrupted one created.
    run_id = json.loads((root / "metrics/mlflow_run.json").read_text())["run_id"]
    assert run_id == state["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [400, 800, 1200]
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert sorted(steps) == [1, 300, 600, 900, 1200]  # each logged once, across both processes
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "1200"
    assert run.data.metrics["final_val_loss"] == pytest.approx(result["final_val_loss"])


@pytest.mark.slow
def test_sigkill_then_rerun_logs_each_step_once(project, params_restored):
    """Killed without warning, the run logged steps past its last resume checkpoint; the
    resumed process redoes those steps and must not log them a second time."""
    from mlflow.tracking import MlflowClient

    from gptcore.checkpoint import load_trainer_state

    root, env = project
    write_params(root, {"train": {"max_steps": 1200, "checkpoint_interval": 100, "eval_interval": 400,
                                  "log_interval": 10}})
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    before = {r.info.run_id for r in client.search_runs(
        [client.get_experiment_by_name("gptcore").experiment_id])}
    proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:  # kill only once steps past the first checkpoint have been logged
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
            last = list(root.glob(".gptcore/runs/*/last"))
            state = load_trainer_state(last[0]) if last else None
            if state is None:
                continue
            logged = [m.step for m in client.get_metric_history(state["run_id"], "train_loss")]
            if logged and max(logged) > state["step"]:
                break
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ok(run_stage("train", root, env))
    run_id = json.loads((root / "metrics/mlflow_run.json").read_text())["run_id"]
    assert run_id == state["run_id"] and run_id not in before
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert sorted(steps) == [1] + list(range(10, 1201, 10))  # each exactly once
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [400, 800, 1200]
