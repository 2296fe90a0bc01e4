"""MLflow tracking against a real local store (SQLite): resuming a run logs each
metric's steps exactly once."""

from __future__ import annotations

import os

import pytest

from gptcore.tracking import Tracker


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return tmp_path


def _history(tracker: Tracker, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in tracker._client.get_metric_history(tracker.run_id, key))


def test_resumed_run_skips_only_what_each_metric_already_has(store):
    first = Tracker(store).start({"a": 1})
    assert first.enabled
    for step in (1, 2, 3):
        first.log_metrics({"train_loss": 10.0 - step}, step=step)
    first.log_metrics({"val_loss": 5.0}, step=2)
    # Killed here: step 3's train_loss is in the store, its val_loss is not.
    again = Tracker(store).start({"a": 1}, run_id=first.run_id)
    assert again.run_id == first.run_id
    for step in (3, 4):  # the resumed run redoes step 3 identically
        again.log_metrics({"train_loss": 10.0 - step, "val_loss": 5.0 - step / 10}, step=step)
    assert _history(again, "train_loss") == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0)]
    assert _history(again, "val_loss") == [(2, 5.0), (3, 4.7), (4, 4.6)]
    assert os.path.exists(store / "mlflow.db")
