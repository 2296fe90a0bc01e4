"""The aliases' rules on a real MLflow store (SQLite), scored the way the evaluate stage
scores: the champion ends on the best version whatever order concurrent stages write in,
a hand-picked champion is not overruled by versions it was picked over, and other
validation data never takes it."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from gptcore import registry
from gptcore.registry import CHAMPION, REGISTERED_MODEL, VERSION_TAG

SHAKESPEARE, STDLIB = "a" * 64, "b" * 64


@pytest.fixture
def client(tmp_path):
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    c.create_experiment("gptcore", artifact_location=(tmp_path / "artifacts").as_uri())
    c.create_registered_model(REGISTERED_MODEL)
    return c


def new_version(client) -> str:
    """A run with a registered version, as the train stage leaves it; the run's id."""
    run = client.create_run(client.get_experiment_by_name("gptcore").experiment_id).info.run_id
    version = client.create_model_version(REGISTERED_MODEL, source="file:///nowhere", run_id=run)
    client.set_tag(run, VERSION_TAG, version.version)
    return run


def holder(client, alias: str = CHAMPION) -> str:
    return str(client.get_model_version_by_alias(REGISTERED_MODEL, alias).version)


def test_the_champion_is_the_best_on_its_data_whatever_the_order(client):
    v1, v2, v3 = (new_version(client) for _ in range(3))
    assert registry.score(client, v1, {"val_loss": 2.0}, SHAKESPEARE, {}).endswith(
        "aliases now on it: champion-aaaaaaaa, champion")
    assert holder(client) == "1"
    assert registry.score(client, v2, {"val_loss": 1.5}, SHAKESPEARE, {}).endswith("champion-aaaaaaaa, champion")
    # Two clones' evaluate stages at once: v3's read came before v2's tags, so it set the
    # alias on itself after v2 had; its next check takes it back to the best, v2.
    client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, "3")
    line = registry.score(client, v3, {"val_loss": 1.8}, SHAKESPEARE, {})
    assert line == "model gptcore version 3: eval val loss 1.8000; it holds no alias"
    assert holder(client) == "2" and holder(client, "champion-aaaaaaaa") == "2"
    # A tie keeps the earlier version; a NaN never holds.
    v4, v5 = new_version(client), new_version(client)
    registry.score(client, v4, {"val_loss": 1.5}, SHAKESPEARE, {})
    registry.score(client, v5, {"val_loss": math.nan}, SHAKESPEARE, {})
    assert holder(client) == "2"


def test_other_data_gets_its_own_alias_and_never_the_champion(client):
    v1, v2 = new_version(client), new_version(client)
    registry.score(client, v1, {"val_loss": 4.5}, SHAKESPEARE, {})
    assert registry.score(client, v2, {"val_loss": 1.2}, STDLIB, {}).endswith("aliases now on it: champion-bbbbbbbb")
    assert holder(client) == "1" and holder(client, "champion-bbbbbbbb") == "2"


def test_a_promoted_champion_yields_only_to_later_better_versions(client):
    runs = [new_version(client) for _ in range(3)]
    for run, loss in zip(runs, (2.0, 1.5, 1.8)):
        registry.score(client, run, {"val_loss": loss}, SHAKESPEARE, {})
    assert holder(client) == "2"
    registry.promote(client, version="1")  # by hand: v2 and v3 were passed over
    assert holder(client) == "1"
    v4 = new_version(client)  # worse than v2, but v2 is not a candidate any more
    registry.score(client, v4, {"val_loss": 1.9}, SHAKESPEARE, {})
    assert holder(client) == "4"
    v5 = new_version(client)
    registry.score(client, v5, {"val_loss": 2.5}, SHAKESPEARE, {})
    assert holder(client) == "4" and holder(client, "champion-aaaaaaaa") == "2"
