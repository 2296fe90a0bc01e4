"""The model as an MLflow citizen, on a tiny pipeline, in the order a user meets it:
`dvc repro` registers version 1 as champion; a worse experiment registers version 2 and
leaves the alias; a better one takes it; a run on other validation data never does; the
champion loads with `mlflow.pyfunc.load_model` in a fresh process and answers through a
real `mlflow models serve`, with the completions `gptcore generate` gives; `gptcore
promote` moves the alias by hand. Real DVC, real MLflow store, real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from project_copy import TINY, git_project
from test_pipeline import VENV_BIN, _mlflow_client, _run
from test_serve import _free_port

pytestmark = pytest.mark.slow  # real dvc repro / exp run and MLflow servers: `make test-all` and CI

PROMPTS = ["ROMEO:", "HAMLET:"]
GREEDY = {"temperature": 0.0, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def project(tmp_path_factory, mirror_dir):
    root = tmp_path_factory.mktemp("registry") / "gptcore"
    env = git_project(root, mirror_dir, TINY)
    # MLflow's system-metrics monitor samples every 10 s; a tiny run is over sooner.
    return root, {**env, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5"}


def versions(root: Path) -> dict[str, object]:
    client = _mlflow_client(root)
    return {str(v.version): v for v in client.search_model_versions("name='gptcore'")}


def alias(root: Path, name: str = "champion") -> str:
    return str(_mlflow_client(root).get_model_version_by_alias("gptcore", name).version)


def run_id(root: Path) -> str:
    return json.loads((root / "metrics/mlflow_run.json").read_text())["run_id"]


def cli_completion(root: Path, env: dict, *source: str, prompt: str) -> str:
    out = _run([str(VENV_BIN / "gptcore"), "generate", *source, "--prompt", prompt, "--temperature", "0",
                "--max-new-tokens", str(GREEDY["max_new_tokens"])], root, env).stdout
    assert out.startswith(prompt) and out.endswith("\n")
    return out[len(prompt):-1]


def test_repro_registers_version_1_as_champion(project):
    root, env = project
    out = _run([str(VENV_BIN / "dvc"), "repro"], root, env).stdout
    assert "model gptcore version 1: eval val loss" in out and "champion" in out
    [v1] = versions(root).values()
    assert str(v1.version) == "1" and alias(root) == "1"
    ev = json.loads((root / "metrics/eval.json").read_text())
    digest = next(d for d in json.loads(_dataset_inputs(root)) if d["context"] == "validation")["digest"]
    assert float(v1.tags["eval_val_loss"]) == pytest.approx(ev["val_loss"])
    assert float(v1.tags["eval_bits_per_byte"]) == pytest.approx(ev["bits_per_byte"])
    assert v1.tags["data_digest"] == digest
    assert v1.tags["git_commit"] == _run(["git", "rev-parse", "HEAD"], root, env).stdout.strip()
    assert alias(root, f"champion-{digest[:8]}") == "1"
    assert v1.run_id == run_id(root)
    # The train run carries MLflow's system metrics (CPU, memory) beside its losses.
    system = {k for k in client_metrics(root) if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    # The logged model is a pyfunc from code: no pickle anywhere in it.
    client = _mlflow_client(root)
    model = client.get_logged_model(client.get_run(v1.run_id).data.tags["gptcore.model_id"])
    location = Path(model.artifact_location.removeprefix("file://"))
    files = [p.relative_to(location).as_posix() for p in location.rglob("*") if p.is_file()]
    assert "MLmodel" in files and "mlflow_pyfunc.py" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))], files
    mlmodel = (location / "MLmodel").read_text()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel
    assert "torch==" in (location / "requirements.txt").read_text()


def client_metrics(root: Path) -> dict:
    return _mlflow_client(root).get_run(run_id(root)).data.metrics


def _dataset_inputs(root: Path) -> str:
    client = _mlflow_client(root)
    run = client.get_run(run_id(root))
    return json.dumps([{"context": [t.value for t in d.tags if t.key == "mlflow.data.context"][0],
                        "digest": d.dataset.digest} for d in run.inputs.dataset_inputs])


def test_a_worse_experiment_registers_a_version_and_leaves_the_alias(project):
    root, env = project
    _run([str(VENV_BIN / "dvc"), "exp", "run", "-n", "worse", "--set-param", "train.max_steps=2"], root, env)
    v = versions(root)
    assert set(v) == {"1", "2"} and v["2"].tags["dvc_exp_name"] == "worse"
    assert float(v["2"].tags["eval_val_loss"]) > float(v["1"].tags["eval_val_loss"])
    assert alias(root) == "1"


def test_a_better_experiment_takes_the_alias(project):
    root, env = project
    _run([str(VENV_BIN / "dvc"), "exp", "run", "-n", "better", "--set-param", "train.max_steps=12"], root, env)
    v = versions(root)
    assert set(v) == {"1", "2", "3"}
    assert float(v["3"].tags["eval_val_loss"]) < float(v["1"].tags["eval_val_loss"])
    assert alias(root) == "3"
    # The registry's URI, the run and the workspace checkpoint are the same model.
    expected = cli_completion(root, env, "--checkpoint", "models/best", prompt="ROMEO:")
    assert cli_completion(root, env, "--model", "models:/gptcore@champion", prompt="ROMEO:") == expected
    assert cli_completion(root, env, "--model", "models:/gptcore/3", prompt="ROMEO:") == expected


def test_other_validation_data_never_replaces_the_champion(project):
    """Another split is other validation data: its first version is that data's champion
    (``champion-<digest>``), but ``champion`` stays, whatever the loss."""
    root, env = project
    _run([str(VENV_BIN / "dvc"), "exp", "run", "-n", "other-data", "--set-param", "data.val_fraction=0.2",
          "--set-param", "train.max_steps=12"], root, env)
    v = versions(root)
    assert set(v) == {"1", "2", "3", "4"} and v["4"].tags["data_digest"] != v["3"].tags["data_digest"]
    assert alias(root) == "3"
    assert alias(root, f"champion-{v['4'].tags['data_digest'][:8]}") == "4"
    assert alias(root, f"champion-{v['3'].tags['data_digest'][:8]}") == "3"


def test_the_champion_loads_in_a_fresh_process_with_generate_s_completions(project):
    root, env = project
    expected = [cli_completion(root, env, "--model", "models:/gptcore@champion", prompt=p) for p in PROMPTS]
    code = ("import json, sys, mlflow.pyfunc; m = mlflow.pyfunc.load_model('models:/gptcore@champion'); "
            f"print(json.dumps(list(m.predict({PROMPTS!r}, params={GREEDY!r}))))")
    # A fresh process, offline, with the store as the only link to the project.
    fresh = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    out = _run([sys.executable, "-c", code], root.parent, fresh).stdout
    assert json.loads(out.strip().splitlines()[-1]) == expected


def test_mlflow_models_serve_answers_with_the_champion(project, tmp_path):
    """The real `mlflow models serve` process, from the registry URI, local env."""
    root, env = project
    expected = [cli_completion(root, env, "--model", "models:/gptcore@champion", prompt=p) for p in PROMPTS]
    port = _free_port()
    log = open(tmp_path / "serve.log", "wb")
    serve_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    proc = subprocess.Popen([str(VENV_BIN / "mlflow"), "models", "serve", "-m", "models:/gptcore@champion",
                             "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"],
                            cwd=tmp_path, env=serve_env, stdout=log, stderr=log, start_new_session=True)
    try:
        body = json.dumps({"inputs": PROMPTS, "params": GREEDY}).encode()
        url = f"http://127.0.0.1:{port}/invocations"
        answer = _post_when_up(proc, url, body, tmp_path / "serve.log")
        assert answer == {"predictions": expected}
        # Bad params: one line naming the param, no traceback with the server's paths. A
        # billion greedy tokens (a loop on "::::" that never ends) is refused, not decoded.
        for params, words in (({"temperature": -1}, "temperature=-1.0"), ({"seed": 2**70}, "seed="),
                              ({"temperature": 0, "max_new_tokens": 10**9}, "max_new_tokens <= 1024")):
            req = urllib.request.Request(url, json.dumps({"inputs": ["ROMEO:"], "params": params}).encode(),
                                         {"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(req, timeout=60)
            error = json.loads(refused.value.read())
            assert refused.value.code == 400 and error["error_code"] == "INVALID_PARAMETER_VALUE", error
            # MLflow's pyfunc wrapper puts one line of its own first ("Failed to predict data ...").
            lines = error["message"].splitlines()
            assert len(lines) <= 2 and words in lines[-1] and "Traceback" not in error["message"], error
            assert "stack_trace" not in error and "site-packages" not in json.dumps(error), error
    finally:
        _stop(proc)
        log.close()


def test_gptcore_serve_takes_a_model_uri(project, tmp_path):
    root, env = project
    expected = cli_completion(root, env, "--model", "models:/gptcore@champion", prompt="ROMEO:")
    port = _free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([str(VENV_BIN / "gptcore"), "serve", "--model", "models:/gptcore@champion",
                             "--port", str(port)], cwd=root, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        body = json.dumps({"prompt": "ROMEO:", "temperature": 0, "max_tokens": GREEDY["max_new_tokens"]}).encode()
        answer = _post_when_up(proc, f"http://127.0.0.1:{port}/v1/completions", body, tmp_path / "serve.log")
        assert answer["choices"][0]["text"] == expected
    finally:
        _stop(proc)
        log.close()


def _post_when_up(proc, url: str, body: bytes, log: Path, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
            return json.loads(urllib.request.urlopen(req, timeout=60).read())
        except OSError:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(1)


def _stop(proc) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_promote_moves_the_alias_by_hand(project):
    root, env = project
    gptcore = str(VENV_BIN / "gptcore")
    assert "champion -> gptcore version 1" in _run([gptcore, "promote", "1"], root, env).stdout
    assert alias(root) == "1"
    run_2 = versions(root)["2"].run_id
    _run([gptcore, "promote", "--run", run_2], root, env)
    assert alias(root) == "2"
    bad = subprocess.run([gptcore, "promote", "99"], cwd=root, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "version '99'" in bad.stderr and "Traceback" not in bad.stderr
    assert alias(root) == "2"
    missing = subprocess.run([gptcore, "generate", "--model", "models:/gptcore@nobody", "--max-new-tokens", "2"],
                             cwd=root, env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "models:/gptcore@nobody" in missing.stderr
    assert "Traceback" not in missing.stderr
