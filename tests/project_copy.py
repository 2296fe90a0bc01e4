"""Shared by the end-to-end tests: a copy of the project (sources only, no outputs) with
params.yaml overridden, to run the real stages and DVC in."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# The tiny pipeline every end-to-end test runs: seconds per stage, same code paths as the
# real one. TINY keeps GPT-2's BPE (the default tokenizer); TINY_CHAR is the char-level
# variant, one intra-op thread and float32, for tests that run many stages.
TINY = {
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
    "train": {"device": "cpu", "batch_size": 4, "max_steps": 6, "warmup_steps": 2, "eval_interval": 3,
              "eval_batches": 2, "checkpoint_interval": 3, "log_interval": 1, "patience": 0},
    "evaluate": {"batch_size": 64},
    "sample": {"max_new_tokens": 12},
}
# Outputs, environments and caches never travel with the copy.
SKIP = {".git", ".venv", "data", "models", "metrics", "mlflow.db", "mlartifacts", ".gptcore",
        ".pytest_cache", "__pycache__", "tmp", "cache", "build", "bench", "dvc_plots",
        "validation", "validation.md"}  # validation/ is the real project's baseline, not a copy's
NEVER = {".git", ".venv", ".pytest_cache", "__pycache__"}  # skipped at any depth


def merge(base: dict, over: dict) -> dict:
    """Deep-merge ``over`` into a copy of ``base``."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(dict(out.get(k, {})), v) if isinstance(v, dict) else v
    return out


TINY_CHAR = merge(TINY, {"tokenizer": {"kind": "char"}, "model": {"vocab_size": 128},
                         "train": {"threads": 1, "dtype": "float32"}})


def copy_project(root: Path) -> Path:
    def ignore(d: str, names: list[str]) -> list[str]:
        # Outputs are skipped at the top level only: gptcore/data/ is code, data/ is not.
        top = Path(d).resolve() == REPO
        # .dvc/tmp holds this checkout's experiment queue (tasks naming its own commits) and
        # .dvc/cache its data: a copy with its own git history must start without either.
        local_dvc = {"tmp", "cache"} if Path(d).resolve() == REPO / ".dvc" else set()
        return [n for n in names if (n in SKIP and (top or n in NEVER)) or n in local_dvc
                or n.endswith((".egg-info", ".old"))]

    shutil.copytree(REPO, root, ignore=ignore)
    return root


def write_params(root: Path, *overrides: dict) -> None:
    """The project's params.yaml with each override merged in, in order."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for over in overrides:
        params = merge(params, over)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def git_project(root: Path, mirror_dir: Path, *overrides: dict) -> dict:
    """A copy of the project in ``root`` with params overridden, committed to a fresh git
    repository (what DVC experiments need); returns the environment to run DVC in:
    offline, the venv's tools first, no DVC/MLflow settings inherited from the caller."""
    import os
    import subprocess
    import sys

    copy_project(root)
    write_params(root, *overrides)
    venv_bin = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_TRACKING", "RANK"))}
    env.update(PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}", GPTCORE_MIRROR=str(mirror_dir),
               DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1",
               GIT_AUTHOR_NAME="ci", GIT_AUTHOR_EMAIL="ci@localhost",
               GIT_COMMITTER_NAME="ci", GIT_COMMITTER_EMAIL="ci@localhost")
    for args in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        subprocess.run(args, cwd=root, env=env, check=True, capture_output=True)
    return env


def wait_for_first_checkpoint(proc, root: Path, timeout: float = 120) -> None:
    """Return once the training ``proc`` runs in ``root`` has written its first periodic
    resume checkpoint; fail if it exits first or ``timeout`` seconds pass."""
    import time

    deadline = time.monotonic() + timeout
    while not list(root.glob(".gptcore/runs/*/last")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no resume checkpoint after {timeout} s"
        time.sleep(0.01)


def signal_after_first_checkpoint(args: list[str], root: Path, env: dict, sig: int,
                                  timeout: float = 120) -> tuple[int, str, str]:
    """Start training ``args`` in ``root``, send ``sig`` once its first periodic resume
    checkpoint exists, and return (exit code, stdout, stderr)."""
    import subprocess

    proc = subprocess.Popen(args, cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_first_checkpoint(proc, root, timeout)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def bench_module(name: str):
    """Import ``bench/<name>.py`` (bench/ is scripts, not a package) for its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_env(mirror_dir: Path) -> dict:
    """The environment to run stages in: offline, the venv first, no DVC/MLflow/torchrun
    settings inherited from the caller."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_", "RANK", "WORLD_SIZE"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               GPTCORE_MIRROR=str(mirror_dir), MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1")
    return env


def run_stage(name: str, root: Path, env: dict, timeout: float = 180):
    """``python -m stages.<name>`` in ``root``, as DVC would run it; the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)


def ok(proc):
    """``proc`` succeeded; else fail showing its output."""
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def trained_project(root: Path, mirror_dir: Path) -> tuple[Path, dict]:
    """A TINY_CHAR copy of the project in ``root`` with data, a trained model and metrics
    from a first real run of download, tokenize and train (no git, no DVC)."""
    import json

    copy_project(root)
    write_params(root, TINY_CHAR)
    env = stage_env(mirror_dir)
    for name in ("download", "tokenize", "train"):
        ok(run_stage(name, root, env))
    assert (root / "models/best/model.safetensors").is_file()
    assert json.loads((root / "metrics/train.json").read_text())["steps"] == TINY_CHAR["train"]["max_steps"]
    return root, env


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every output file the pipeline has written so far."""
    import hashlib

    out = {}
    for top in ("metrics", "models", "data"):
        for p in sorted((root / top).rglob("*")):
            if p.is_file():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def add_train_dep(root: Path, path: str) -> str:
    """List ``path`` under the train stage's deps in ``root``'s dvc.yaml (what a local
    train.init_from directory needs); returns the previous dvc.yaml text, to restore."""
    dvc_yaml = root / "dvc.yaml"
    text = dvc_yaml.read_text()
    anchor = "      - gptcore/training/resume.py\n"  # among the train stage's deps only
    assert text.count(anchor) == 1, "dvc.yaml's train deps changed: update add_train_dep"
    dvc_yaml.write_text(text.replace(anchor, f"{anchor}      - {path}\n"))
    return text
