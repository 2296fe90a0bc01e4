"""The experiment's saved training view (what `mlflow ui` opens at the README's link): the
tracker writes it into a new store, adds it to an existing one once, replaces an older one,
and never loses a run's tracking over it. `make ui-check` renders it in Chromium."""

from __future__ import annotations

import json

import pytest
from ui_check import training_view_problems

from gptcore.store import EXPERIMENT, EXPERIMENT_KIND, TRAINING_VIEW_TAG
from gptcore.tracking import Tracker

pytestmark = pytest.mark.slow  # mlflow ui, and Chromium where installed: `make test-all` and CI


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return tmp_path


def _client(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")


def _tags(store) -> dict[str, str]:
    return _client(store).get_experiment_by_name(EXPERIMENT).tags


def _as_rest(tags: dict[str, str]) -> dict:
    return {"name": EXPERIMENT, "tags": [{"key": k, "value": v} for k, v in tags.items()]}


def test_a_new_store_gets_the_kind_and_the_training_view(store):
    Tracker(store)._connect()
    tags = _tags(store)
    assert all(tags[k] == v for k, v in EXPERIMENT_KIND.items())
    assert training_view_problems(_as_rest(tags)) == []
    view = json.loads(tags[TRAINING_VIEW_TAG])  # the envelope MLflow's "Views" menu lists
    assert view["name"] == "gptcore training" and isinstance(view["createdAt"], int)
    state = json.loads(view["state"])
    assert state["orderByKey"] == "metrics.`eval_val_loss`" and state["orderByAsc"] is True
    assert [c["metricKey"] for c in state["compareRunCharts"]][:2] == ["val_loss", "train_loss"]


def test_an_existing_store_gets_the_view_once_and_an_older_view_is_replaced(store):
    _client(store).create_experiment(EXPERIMENT)  # a store from before the view existed
    assert training_view_problems(_as_rest(_tags(store)))  # no view: ui_check says so
    Tracker(store)._connect()
    written = _tags(store)[TRAINING_VIEW_TAG]
    assert training_view_problems(_as_rest(_tags(store))) == []
    Tracker(store)._connect()
    assert _tags(store)[TRAINING_VIEW_TAG] == written  # not rewritten by every stage
    exp_id = _client(store).get_experiment_by_name(EXPERIMENT).experiment_id
    older = json.dumps({"name": "gptcore training", "createdAt": 1, "state": json.dumps({"selectedColumns": []})})
    _client(store).set_experiment_tag(exp_id, TRAINING_VIEW_TAG, older)
    Tracker(store)._connect()
    assert json.loads(_tags(store)[TRAINING_VIEW_TAG])["state"] == json.loads(written)["state"]


def test_a_failed_view_write_costs_the_run_nothing(store, monkeypatch):
    from mlflow.tracking import MlflowClient

    _client(store).create_experiment(EXPERIMENT)

    def locked(*args, **kwargs):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(MlflowClient, "set_experiment_tag", locked)
    tracker = Tracker(store).start({"a": 1})
    assert tracker.enabled  # the run is tracked; the next stage writes the view
    assert TRAINING_VIEW_TAG not in _tags(store)
