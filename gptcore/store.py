"""The MLflow store: where it is, how to reach it, and the experiment every run goes in.

Default store: SQLite at ``<root>/mlflow.db`` with artifacts in ``<root>/mlartifacts``,
where ``<root>`` is ``DVC_ROOT`` when DVC runs the stage (``dvc exp run --temp/--queue``
run in a temporary copy, where relative paths would vanish) and the current directory
otherwise. ``MLFLOW_TRACKING_URI`` overrides everything (a team's tracking server).

The experiment ``gptcore`` carries the kind "model training" and a saved view of its
runs table (the loss columns, sorted, and loss charts), which the README's link opens.
Shared by ``tracking.py`` (logging runs) and ``registry.py`` (loading and promoting
models); mlflow itself is imported only inside the functions that use it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

from .errors import CheckpointError
from .stage import offline_env, project_root

EXPERIMENT = "gptcore"
# The experiment's kind: classic model training. MLflow's own "create experiment" dialog
# sets it; the 3.17 UI does not lay the page out by it (its sidebar toggle does: the URL's
# workflowType=, else the browser's last choice, GenAI in a fresh profile), so the link
# to the runs table is TRAINING_VIEW_URL below, not this tag alone.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# A saved view of the runs table (the MLflow UI's "Views" menu; one experiment tag
# mlflow.sharedViewState.<id> holding {name, createdAt, state}): runs sorted by
# eval_val_loss, the columns eval_val_loss, eval_bits_per_byte and best_val_loss, and in
# the chart view val_loss and train_loss across runs first. It opens, in any browser, at
#   <mlflow ui>/#/experiments/<id>/TRAINING_VIEW_URL (+ "&compareRunsMode=CHART": charts)
TRAINING_VIEW_ID = "training"
TRAINING_VIEW_TAG = f"mlflow.sharedViewState.{TRAINING_VIEW_ID}"
TRAINING_VIEW_URL = f"runs?workflowType=machine_learning&viewStateShareKey={TRAINING_VIEW_ID}"
_LOSS_COLUMNS = ["eval_val_loss", "eval_bits_per_byte", "best_val_loss"]


def _chart(kind: str, metric: str) -> dict:
    card = {"uuid": f"gptcore-{metric}", "type": kind, "metricKey": metric, "displayName": metric,
            "selectedMetricKeys": [metric], "metricSectionId": "gptcore-losses", "runsCountToCompare": 10,
            "deleted": False, "isGenerated": False}
    if kind == "LINE":
        card.update(xAxisKey="step", selectedXAxisMetricKey="", xAxisScaleType="linear", scaleType="linear",
                    lineSmoothness=0, yAxisKey="metric", yAxisExpressions=[], ignoreOutliers=False,
                    useGlobalXaxisKey=True, useGlobalLineSmoothing=True, range={})
    return card


TRAINING_VIEW = {"name": "gptcore training", "state": json.dumps({
    "orderByKey": "metrics.`eval_val_loss`", "orderByAsc": True,
    "selectedColumns": ["attributes.`Dataset`", "attributes.`Models`", *(f"metrics.`{m}`" for m in _LOSS_COLUMNS)],
    # the losses right after the run's name and date, where a 1280-pixel window shows them
    "columnOrder": ["attributes.`Run Name`", "runDateAndNestInfo", *(f"metrics.`{m}`" for m in _LOSS_COLUMNS),
                    "attributes.`Dataset`", "duration", "attributes.`Models`"],
    "compareRunSections": [{"uuid": "gptcore-losses", "name": "Losses", "display": True, "isReordered": True,
                            "deleted": False, "isGenerated": False}],
    "compareRunCharts": [_chart("LINE", "val_loss"), _chart("LINE", "train_loss"),
                         _chart("BAR", "eval_val_loss"), _chart("BAR", "eval_bits_per_byte")],
    "isAccordionReordered": True,
})}


def _training_view_tag(now_ms: int) -> str:
    return json.dumps({"name": TRAINING_VIEW["name"], "createdAt": now_ms, "updatedAt": now_ms,
                       "state": TRAINING_VIEW["state"]})


def _is_training_view(value: str | None) -> bool:
    try:
        view = json.loads(value or "")
        return view.get("name") == TRAINING_VIEW["name"] and view.get("state") == TRAINING_VIEW["state"]
    except (ValueError, AttributeError):
        return False


def configure_env() -> None:
    # Offline-friendly defaults a user can still override: no telemetry, and fail fast
    # instead of retrying for minutes when a tracking server is down.
    offline_env()
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # MLflow logs each database error with the SQL and a traceback before raising it; the
    # guarded call reports it in one line instead.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def tracking_uri(root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's SQLite store ``<root>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def experiment(client, root: Path, uri: str) -> str:
    """The id of the experiment ``gptcore``, created (with its tags) if missing."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        artifacts = (root / "mlartifacts").as_uri() if uri.startswith("sqlite") else None
        exp_id = client.create_experiment(EXPERIMENT, artifact_location=artifacts, tags={
            **EXPERIMENT_KIND, TRAINING_VIEW_TAG: _training_view_tag(int(time.time() * 1000))})
    else:
        exp_id = exp.experiment_id
        # Stores made before these tags existed (or with an older view) get them now.
        # Only the UI reads them: a failure here (two queued experiments writing the
        # same tag at once) must not cost the run its tracking.
        missing = {key: value for key, value in EXPERIMENT_KIND.items() if exp.tags.get(key) != value}
        if not _is_training_view(exp.tags.get(TRAINING_VIEW_TAG)):
            missing[TRAINING_VIEW_TAG] = _training_view_tag(int(time.time() * 1000))
        for key, value in missing.items():
            try:
                client.set_experiment_tag(exp_id, key, value)
            except Exception:  # noqa: BLE001 - a UI nicety; the next stage retries
                pass
    return exp_id


def open_store():
    """``(client, uri)`` of the project's store, for reading models out of it."""
    configure_env()
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(project_root())
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise CheckpointError(f"no MLflow store at {uri.removeprefix('sqlite:///')}; run from the "
                              "project root or set MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:  # a SQLite store is opened (and checked) right here
        return MlflowClient(tracking_uri=uri), uri
    except Exception as exc:  # noqa: BLE001 - MLflow, SQLAlchemy and requests errors alike
        raise CheckpointError(store_problem(exc, "", uri)) from None


def store_problem(exc: Exception, run_id: str, uri: str) -> str:
    """One line for why a store could not answer: the run is not there, the store can't
    be reached, or its database is not one MLflow can read."""
    code = getattr(exc, "error_code", "")
    text = " ".join(str(exc).split())
    if code == "RESOURCE_DOES_NOT_EXIST" or "not found" in text.lower() and "run" in text.lower():
        return f"run {run_id!r}: not found in {uri}; `mlflow ui` or metrics/mlflow_run.json lists the run ids"
    if any(k in text for k in ("Connection", "connect", "Max retries", "timed out", "Name or service")):
        return (f"MLflow store {uri} is unreachable ({type(exc).__name__}); start the tracking server or "
                "unset MLFLOW_TRACKING_URI to read ./mlflow.db")
    if any(k in text.lower() for k in ("not a database", "malformed", "database disk image", "no such table",
                                       "databaseerror", "file is encrypted")):
        reason = re.search(r"\(sqlite3\.\w+\) ([^\[]+)", text)
        return (f"MLflow store {uri} is corrupt or not an MLflow database "
                f"({(reason.group(1) if reason else text[:100]).strip()}); restore mlflow.db from a backup, "
                "or load the checkpoint with --checkpoint models/best")
    return f"MLflow store {uri} could not be read ({type(exc).__name__}: {text[:160]})"
