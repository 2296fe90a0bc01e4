"""MLflow tracking that never takes a run down with it.

Default store: SQLite at ``<root>/mlflow.db`` with artifacts in ``<root>/mlartifacts``,
where ``<root>`` is ``DVC_ROOT`` when DVC runs the stage (``dvc exp run --temp/--queue``
run in a temporary copy, where relative paths would vanish) and the current directory
otherwise. ``MLFLOW_TRACKING_URI`` overrides everything (a team's tracking server).

One MLflow run per pipeline execution: the train stage creates it and records its id
in ``metrics/mlflow_run.json``; evaluate and sample log into the same run. Every call
is guarded: if MLflow is unavailable the stage warns once and carries on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

EXPERIMENT = "gptcore"
RUN_FILE = "metrics/mlflow_run.json"


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def _configure_env() -> None:
    # Offline-friendly defaults a user can still override: no telemetry, and fail fast
    # instead of retrying for minutes when a tracking server is down.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


class Tracker:
    """A thin, failure-tolerant wrapper over one MLflow run."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or project_root()
        self.run_id: str | None = None
        self._client = None
        self._disabled_reason: str | None = None
        self._logged: dict[str, int] = {}  # per metric: highest step already in the run when reattaching

    # -- guarded plumbing -------------------------------------------------------------
    def _warn(self, what: str, exc: BaseException) -> None:
        if self._disabled_reason is None:
            self._disabled_reason = f"{what}: {type(exc).__name__}: {exc}"
            msg = (f"MLflow unavailable ({self._disabled_reason}); continuing without tracking. "
                   "Outputs in metrics/ and models/ are unaffected.")
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            print(f"warning: {msg}", file=sys.stderr)

    @property
    def enabled(self) -> bool:
        return self._disabled_reason is None and self.run_id is not None

    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        if self._disabled_reason is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never break a stage
            self._warn(what, exc)
            return None

    def _connect(self):
        _configure_env()
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            artifacts = (self.root / "mlartifacts").as_uri() if uri.startswith("sqlite") else None
            exp_id = client.create_experiment(EXPERIMENT, artifact_location=artifacts)
        else:
            exp_id = exp.experiment_id
        return client, exp_id

    # -- run lifecycle ----------------------------------------------------------------
    def start(self, params: dict[str, Any], tags: dict[str, str] | None = None,
              run_id: str | None = None) -> "Tracker":
        """Create a run (or reattach to ``run_id`` when resuming) and log the params."""
        def _start():
            client, exp_id = self._connect()
            self._client = client
            if run_id is not None:
                run = client.get_run(run_id)
                self.run_id = run.info.run_id
                client.update_run(self.run_id, status="RUNNING")
                # A run killed without warning logged steps past its last resume
                # checkpoint; the resumed run redoes them identically, so skip them. Per
                # metric: a kill between logging train_loss and val_loss of one step
                # must not lose that step's val_loss.
                self._logged = {key: max((m.step for m in client.get_metric_history(self.run_id, key)),
                                         default=-1) for key in run.data.metrics}
                return
            all_tags = {"git_commit": git_commit(self.root) or "unknown",
                        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""), **(tags or {})}
            run = client.create_run(exp_id, tags={k: v for k, v in all_tags.items() if v},
                                    run_name=os.environ.get("DVC_EXP_NAME") or None)
            self.run_id = run.info.run_id
            from mlflow.entities import Param
            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):
                client.log_batch(self.run_id, params=items[i:i + 100])

        self._call("start run", _start)
        return self

    def attach(self, run_id: str | None) -> "Tracker":
        """Log into an existing run (evaluate and sample stages)."""
        if run_id is None:
            self._warn("attach", RuntimeError(f"no run id in {RUN_FILE}"))
            return self

        def _attach():
            self._client, _ = self._connect()
            self.run_id = self._client.get_run(run_id).info.run_id

        self._call("attach to run", _attach)
        return self

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric
        import time

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                 if v is not None and (step is None or step > self._logged.get(k, -1))]
        if not batch:
            return  # all already logged before an interruption (see start)
        self._call("log metrics", self._client.log_batch, self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag
        self._call("set tags", self._client.log_batch, self.run_id,
                   tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self._call("log text", self._client.log_text, self.run_id, text, artifact_file)

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        if self.enabled:
            self._call("log table", self._client.log_table, self.run_id, data, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self._call("end run", self._client.set_terminated, self.run_id, status)


def write_run_file(run_id: str | None, path: str | Path = RUN_FILE) -> None:
    from .io import atomic_write_json

    atomic_write_json(path, {"run_id": run_id})


def read_run_file(path: str | Path = RUN_FILE) -> str | None:
    try:
        return json.loads(Path(path).read_text()).get("run_id")
    except (FileNotFoundError, json.JSONDecodeError):
        return None
