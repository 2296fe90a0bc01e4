"""One project, two machines: a team's MLflow tracking server (PostgreSQL where installed,
artifacts served by the server), a bare git repository and a local DVC remote standing in
for the team's, and two clones. Real `mlflow server`, git, `dvc exp run`, `dvc push`/`pull`
and `dvc exp push`/`pull`, in real processes (docs/experiments.md "A team")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from project_copy import TINY_CHAR, git_project, snapshot
from team_server import backend, mlflow_server

pytestmark = pytest.mark.slow


def sh(args: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(URL, backend name, artifacts directory) of a running team tracking server."""
    tmp = tmp_path_factory.mktemp("team-server")
    artifacts = tmp / "artifacts"
    artifacts.mkdir()
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "MLFLOW_DISABLE_TELEMETRY": "true",
           "HOME": str(tmp)}
    with backend(tmp) as (uri, name), mlflow_server(uri, artifacts, env) as url:
        yield url, name, artifacts


def generate(cwd: Path, env: dict, *model: str) -> str:
    gptcore = str(Path(sys.executable).parent / "gptcore")
    return sh([gptcore, "generate", *model, "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "24"],
              cwd, env)


def test_two_clones_share_one_project_through_the_team_server(server, tmp_path, mirror_dir):
    from mlflow.tracking import MlflowClient

    url, backend_name, artifacts = server
    print(f"tracking server backend: {backend_name}")
    remote, storage = tmp_path / "remote.git", tmp_path / "dvc-storage"
    sh(["git", "init", "-q", "--bare", "-b", "main", str(remote)], tmp_path, {"PATH": "/usr/bin:/bin"})

    # Clone A: the project, its DVC remote, pushed to the team's git remote.
    a, b = tmp_path / "a", tmp_path / "b"
    env = git_project(a, mirror_dir, TINY_CHAR)
    env["MLFLOW_TRACKING_URI"] = url
    sh(["dvc", "remote", "add", "-d", "storage", str(storage)], a, env)
    sh(["git", "add", ".dvc/config"], a, env)
    sh(["git", "commit", "-qm", "DVC remote: the team's storage"], a, env)
    sh(["git", "remote", "add", "origin", str(remote)], a, env)
    sh(["git", "push", "-q", "-u", "origin", "main"], a, env)
    sh(["git", "clone", "-q", str(remote), str(b)], tmp_path, env)

    # A runs two experiments against the server (a2 trains longer: the better one) and pushes.
    sh(["dvc", "exp", "run", "-n", "a1", "-S", "train.max_steps=2"], a, env)
    sh(["dvc", "exp", "run", "-n", "a2", "-S", "train.max_steps=6"], a, env)
    sh(["git", "add", "-A"], a, env)
    sh(["git", "commit", "-qm", "a2's results"], a, env)
    sh(["git", "push", "-q"], a, env)
    sh(["dvc", "exp", "push", "origin", "a1", "a2"], a, env)
    sh(["dvc", "push"], a, env)
    assert not (a / "mlflow.db").exists() and not (a / "mlartifacts").exists()  # all on the server

    # B pulls: the same outputs, byte for byte, and a clean pipeline.
    sh(["git", "pull", "-q"], b, env)
    sh(["dvc", "exp", "pull", "origin", "a1", "a2"], b, env)
    sh(["dvc", "pull"], b, env)
    assert snapshot(b) == snapshot(a) and any(k.startswith("models/") for k in snapshot(b))
    assert "Data and pipelines are up to date." in sh(["dvc", "status"], b, env)
    assert {"a1", "a2"} <= set(sh(["dvc", "exp", "list", "--all-commits", "--name-only"], b, env).split())

    # The champion, resolved through the server in B, is A's models/best (a2's model).
    client = MlflowClient(url)
    champion = client.get_model_version_by_alias("gptcore", "champion")
    assert champion.run_id == json.loads((a / "metrics/mlflow_run.json").read_text())["run_id"]
    assert generate(b, env, "--model", "models:/gptcore@champion") == generate(a, env, "--checkpoint", "models/best")

    # Both clones experiment at once against the one server: no run lost, every version
    # tagged, and champion on the better of all.
    procs = [subprocess.Popen(["dvc", "exp", "run", "-n", name, "-S", f"train.seed={seed}"], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, seed, root in (("a3", 3, a), ("b1", 4, b))]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
    exp_id = client.get_experiment_by_name("gptcore").experiment_id
    runs = client.search_runs([exp_id])
    assert sorted(r.info.run_name for r in runs) == ["a1", "a2", "a3", "b1"]
    assert all(r.info.status == "FINISHED" for r in runs)
    versions = client.search_model_versions("name='gptcore'")
    assert len(versions) == 4
    for v in versions:
        assert {"eval_val_loss", "eval_bits_per_byte", "data_digest", "dvc_exp_name"} <= set(v.tags), v.tags
    best = min(versions, key=lambda v: (float(v.tags["eval_val_loss"]), int(v.version)))
    assert client.get_model_version_by_alias("gptcore", "champion").version == best.version
    assert any(artifacts.rglob("model.safetensors"))  # the checkpoints live in the server's store
