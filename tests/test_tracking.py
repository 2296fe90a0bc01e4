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


def test_run_name_is_the_commit_plus_changed_params(tmp_path):
    import subprocess

    from gptcore.tracking import readable_run_name

    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}
    assert readable_run_name(tmp_path, {"train.seed": 1}) is None  # not a git repo
    (tmp_path / "params.yaml").write_text("train:\n  seed: 1\n  learning_rate: 0.001\nsample:\n  stop: []\n")
    for cmd in (["git", "init", "-q"], ["git", "add", "params.yaml"], ["git", "commit", "-qm", "p"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True)
    short = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                           text=True).stdout.strip()
    assert readable_run_name(tmp_path, {"train.seed": 1, "train.learning_rate": 0.001, "sample.stop": ()}) == short
    assert readable_run_name(tmp_path, {"train.seed": 7, "train.learning_rate": 0.001}) == f"{short} train.seed=7"
    # data.sources: the committed default (parsed, so omitted keys compare equal) is no
    # change; another corpus shows as its paths.
    from gptcore.config import Params, flatten

    default = flatten(Params().to_dict())
    assert readable_run_name(tmp_path, {"data.sources": default["data.sources"]}) == short
    mine = Params.from_dict({"data": {"sources": [{"path": "data/corpus"}, {"path": "more/*.txt"}]}})
    assert readable_run_name(tmp_path, {"data.sources": flatten(mine.to_dict())["data.sources"]}) == \
        f"{short} data.sources=data/corpus,more/*.txt"


def test_datasets_and_model_are_logged_and_the_model_loads_back(store, tmp_path, monkeypatch):
    import torch
    from conftest import char_tokenizer
    from mlflow.entities import LoggedModelStatus

    from gptcore.checkpoint import load_checkpoint, save_checkpoint
    from gptcore.config import GPTConfig
    from gptcore.data.dataset import TokenData
    from gptcore.errors import CheckpointError
    from gptcore.model import GPT
    from gptcore.registry import MODEL_ID_TAG, download_run_model

    tok = char_tokenizer("abcdefgh")
    data = TokenData(torch.tensor(tok.encode("abcabcabc")), torch.tensor(tok.encode("cab")), {"dtype": "uint16"}, tok)
    t = Tracker(store).start({"a": 1})
    t.log_datasets(data.describe())
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=8))
    save_checkpoint(tmp_path / "ckpt", model, tok)
    model_id = t.log_model(tmp_path / "ckpt", step=5)
    run = t._client.get_run(t.run_id)
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {
        f"train split ({tok.describe()})", f"val split ({tok.describe()})"}
    assert run.data.tags[MODEL_ID_TAG] == model_id
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model_id, 5)]
    assert t._client.get_logged_model(model_id).status == LoggedModelStatus.READY

    monkeypatch.chdir(store)  # the default store is ./mlflow.db
    back, _, _ = load_checkpoint(download_run_model(t.run_id, tmp_path / "dl"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    bare = Tracker(store).start({"a": 2})
    with pytest.raises(CheckpointError, match="has no logged model"):
        download_run_model(bare.run_id, tmp_path / "dl2")
    with pytest.raises(CheckpointError, match="not found"):
        download_run_model("f" * 32, tmp_path / "dl3")
