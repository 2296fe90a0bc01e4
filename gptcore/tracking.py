"""MLflow tracking that never takes a run down with it.

Where the store is and the experiment runs go in: ``store.py``; the model registry:
``registry.py``.

One MLflow run per pipeline execution: the train stage creates it and records its id
in ``metrics/mlflow_run.json``; evaluate and sample log into the same run. Every call
is guarded: if MLflow is unavailable the stage warns once and carries on.

What a run carries, so that a person in ``mlflow ui`` can trace it: a readable name (the
DVC experiment's name, or the git commit plus the params that differ from it), tags
linking it to git and DVC, the token splits as dataset inputs (with their digests), and
system metrics while training, and the best checkpoint as a logged pyfunc model,
registered as a version of ``gptcore`` (``gptcore generate --run <run id>`` loads it).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from . import registry, store
from .config import Params
from .errors import ConfigError, first_line
from .io import atomic_write_json
from .schema import YamlLoader, flatten
from .stage import project_root

# mlflow is imported where it is used, not here: its import is slow, and with tracking
# off, or a store that is down, a stage never pays for it.

RUN_FILE = "metrics/mlflow_run.json"


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def git_commit(root: Path) -> str | None:
    return _git(root, "rev-parse", "HEAD")


def readable_run_name(root: Path, params: dict[str, Any]) -> str | None:
    """``<short commit>`` plus each flattened param that differs from the committed
    params.yaml, e.g. ``8a63cad train.seed=1338``; None outside git."""
    short = _git(root, "rev-parse", "--short", "HEAD")
    if short is None:
        return None
    committed = _git(root, "show", "HEAD:params.yaml")
    changed = []
    if committed is not None:
        try:  # parsed, so defaults and omitted keys (a source's empty path:) compare equal
            before = flatten(Params.from_dict(yaml.load(committed, Loader=YamlLoader) or {}).to_dict())  # noqa: S506 - a SafeLoader subclass
        except (yaml.YAMLError, ConfigError):
            before = {}
        same = lambda a, b: json.dumps(a, default=str) == json.dumps(b, default=str)  # noqa: E731 - (1,) == [1]
        changed = [f"{k}={_short(v)}" for k, v in params.items() if k in before and not same(before[k], v)]
    name = " ".join([short, *changed])
    return name if len(name) <= 120 else name[:119] + "…"


def _short(value: Any) -> str:
    """A param as a run name shows it: data.sources as its paths/URLs, the rest as is."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
        return ",".join(v.get("path") or v.get("url") or "?" for v in value)
    return str(value)


class Tracker:
    """A thin, failure-tolerant wrapper over one MLflow run."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or project_root()
        self.run_id: str | None = None
        self._client = None
        self._disabled_reason: str | None = None
        self._logged: dict[str, int] = {}  # per metric: highest step already in the run when reattaching
        self._monitor = None  # MLflow's system-metrics sampler while training

    # -- guarded plumbing -------------------------------------------------------------
    def _warn(self, what: str, exc: BaseException) -> None:
        if self._disabled_reason is None:
            # One line: database errors carry the SQL statement and a URL on later lines.
            self._disabled_reason = f"{what}: {type(exc).__name__}: {first_line(exc)}"
            msg = (f"MLflow unavailable ({self._disabled_reason}); continuing without tracking. "
                   "Outputs in metrics/ and models/ are unaffected.")
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
        store.configure_env()
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = store.tracking_uri(self.root)
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(tracking_uri=uri)
        exp_id = store.experiment(client, self.root, uri)
        return client, exp_id

    # -- run lifecycle ----------------------------------------------------------------
    def start(self, params: dict[str, Any], tags: dict[str, str] | None = None,
              run_id: str | None = None) -> Tracker:
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
            from .training.device import describe_machine

            # The machine: CPU numbers (speed, and float32 vs bf16 results) depend on it.
            all_tags = {"git_commit": git_commit(self.root) or "unknown",
                        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
                        "gptcore.machine": describe_machine(), **(tags or {})}
            name = os.environ.get("DVC_EXP_NAME") or readable_run_name(self.root, params)
            run = client.create_run(exp_id, tags={k: v for k, v in all_tags.items() if v},
                                    run_name=name or None)
            self.run_id = run.info.run_id
            from mlflow.entities import Param
            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):
                client.log_batch(self.run_id, params=items[i:i + 100])

        self._call("start run", _start)
        if self.enabled:
            self._call("system metrics", self._watch_system, resumed=run_id is not None)
        return self

    def _watch_system(self, resumed: bool) -> None:
        """CPU, memory, disk, network (and GPU where its library is installed) every 10 s,
        as ``system/*`` metrics of this run: MLflow's own monitor, the one
        ``mlflow.start_run(log_system_metrics=True)`` starts. Started on the run this
        tracker made rather than through the fluent API, whose exit hook would mark a
        crashed (resumable) run FINISHED. ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false``
        turns it off."""
        from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
        if os.environ.get(MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.name, "true").lower() in ("false", "0", "no"):
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop chatter
        self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resumed,
                                             tracking_uri=store.tracking_uri(self.root))
        self._monitor.start()

    def attach(self, run_id: str | None) -> Tracker:
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

    def log_datasets(self, splits: list[dict]) -> None:
        """Each split as an MLflow dataset input: name, digest, source and token counts
        (``dataset.TokenData.describe`` builds the entries)."""
        if not self.enabled:
            return

        def _log():
            from mlflow.entities import Dataset, DatasetInput, InputTag
            inputs = [DatasetInput(Dataset(name=d["name"], digest=d["digest"], source_type="local",
                                           source=json.dumps({"uri": d["source"]}),
                                           profile=json.dumps(d["profile"])),
                                   tags=[InputTag("mlflow.data.context", d["context"])])
                      for d in splits]
            self._client.log_inputs(self.run_id, datasets=inputs)

        self._call("log datasets", _log)

    def log_model(self, directory: str | Path, step: int, name: str = "gptcore-best",
                  version_tags: dict[str, str] | None = None) -> str | None:
        """The checkpoint directory as an MLflow pyfunc model (``registry.save_pyfunc``),
        linked to this run at ``step`` and registered as a new version of ``gptcore``
        tagged with ``version_tags`` (e.g. its init model's lineage); returns the logged
        model's id (also the run's ``gptcore.model_id`` tag)."""
        if not self.enabled:
            return None

        def _log():
            from mlflow.entities import LoggedModelOutput, RunTag
            exp_id = self._client.get_run(self.run_id).info.experiment_id
            with tempfile.TemporaryDirectory(prefix="gptcore-pyfunc-") as tmp:
                saved = registry.save_pyfunc(Path(directory).resolve(), Path(tmp) / "model")
                model = self._client.create_logged_model(exp_id, name=name, source_run_id=self.run_id,
                                                         model_type="gptcore pyfunc")
                self._client.log_model_artifacts(model.model_id, str(saved))
            self._client.finalize_logged_model(model.model_id, "READY")
            self._client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step)])
            self._client.log_batch(self.run_id, tags=[RunTag(registry.MODEL_ID_TAG, model.model_id)])
            return model.model_id

        model_id = self._call("log model", _log)
        if model_id is not None:
            self._call("register model", registry.register, self._client, self.run_id, model_id, version_tags)
        return model_id

    def score_model(self, metrics: dict, data_digest: str) -> None:
        """Tag the run's registered version with its eval scores and move the champion
        aliases it has earned (``registry.score``); prints what happened."""
        if not self.enabled:
            return
        tags = {"git_commit": git_commit(self.root) or "", "dvc_exp_name": os.environ.get("DVC_EXP_NAME", "")}
        line = self._call("score model", registry.score, self._client, self.run_id, metrics, data_digest, tags)
        if line:
            print(line)

    def end(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            self._call("system metrics", self._monitor.finish)
            self._monitor = None
        if self.enabled:
            # A run left RUNNING looks alive for good: retry a store that another stage or
            # experiment holds locked (SQLite, two `dvc queue` workers) before giving up.
            for attempt in range(5):
                try:
                    self._client.set_terminated(self.run_id, status)
                    return
                except Exception as exc:  # noqa: BLE001 - tracking must never break a stage
                    if attempt == 4:
                        self._warn("end run", exc)
                        return
                    time.sleep(0.25 * 2 ** attempt)


def write_run_file(run_id: str | None, path: str | Path = RUN_FILE) -> None:
    atomic_write_json(path, {"run_id": run_id})


def read_run_file(path: str | Path = RUN_FILE) -> str | None:
    try:
        return json.loads(Path(path).read_text()).get("run_id")
    except (FileNotFoundError, json.JSONDecodeError):
        return None
