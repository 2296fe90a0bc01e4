"""Recipe sweeps are DVC experiments and MLflow runs (bench/recipe_sweep.py): a real
`dvc exp run --queue` per recipe x seed, run by `dvc queue start -j 2`, each an MLflow run
in the project's store; `make exps` lists them; the table is made from MLflow; rows measured
without DVC are imported into the same table. (The queue's temporary copies find the repo's
mlflow.db through DVC_ROOT, and two workers write to the one SQLite store at once.)"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from project_copy import REPO, TINY_CHAR, git_project

SWEEP = REPO / "bench" / "recipe_sweep.py"
RECIPES = "lr2e3: {train.learning_rate: 0.002}\nlr3e3: {train.learning_rate: 0.003, train.min_lr: 0.0003}\n"


def sweep(root: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SWEEP), *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)


def client(root: Path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return c, c.get_experiment_by_name("gptcore").experiment_id


@pytest.mark.slow
def test_two_recipes_by_two_seeds_on_two_workers_are_four_experiments_and_four_runs(tmp_path, mirror_dir):
    root = tmp_path / "project"
    env = git_project(root, mirror_dir, TINY_CHAR)
    recipes = tmp_path / "recipes.yaml"
    recipes.write_text(RECIPES)

    p = sweep(root, env, "queue", str(recipes), "--seeds", "1", "2", "-j", "2", "--md", str(tmp_path / "t.md"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "4 experiment(s) to run (0 already in MLflow), 2 at a time" in p.stderr
    assert "4 success" in p.stderr, p.stderr

    c, exp_id = client(root)
    runs = {r.info.run_name: r for r in c.search_runs([exp_id])}
    names = {f"{n}-s{s}" for n in ("lr2e3", "lr3e3") for s in (1, 2)}
    assert set(runs) == names
    for name, run in runs.items():
        lr = "0.002" if name.startswith("lr2e3") else "0.003"
        assert run.info.status == "FINISHED" and run.data.tags["dvc_exp_name"] == name
        assert run.data.params["train.learning_rate"] == lr and run.data.params["train.seed"] == name[-1]
        assert {"eval_val_loss", "eval_bits_per_byte", "best_step"} <= set(run.data.metrics)
        assert "cpu family" in run.data.tags["gptcore.machine"]
        assert len(c.get_metric_history(run.info.run_id, "train_loss")) == 6  # every step, once
        assert {"samples.md", "samples.json"} <= {a.path for a in c.list_artifacts(run.info.run_id)}
    assert len({r.data.metrics["eval_val_loss"] for r in runs.values()}) == 4  # four runs, not one
    with sqlite3.connect(root / "mlflow.db") as db:  # two concurrent writers left it intact
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    # The table, made from MLflow: one row per recipe, its seeds, and the command that redoes it.
    rows = [line for line in p.stdout.splitlines() if line.startswith("| lr")]
    assert len(rows) == 2, p.stdout
    by = {r.split("|")[1].strip(): r for r in rows}
    assert "| 1, 2 |" in by["lr2e3"]
    assert "`dvc exp run --queue -S train.learning_rate=0.002 -S train.seed=1,2 && dvc queue start -j 2`" in by["lr2e3"]
    assert "-S train.learning_rate=0.003 -S train.min_lr=0.0003 -S train.seed=1,2" in by["lr3e3"]
    mean = sum(runs[f"lr2e3-s{s}"].data.metrics["eval_val_loss"] for s in (1, 2)) / 2
    assert f"| {mean:.4f} |" in by["lr2e3"]
    assert (tmp_path / "t.md").read_text().count("| lr") == 2

    # make exps lists the four experiments beside their params.
    bin_dir = Path(sys.executable).parent
    shown = subprocess.run(["make", "-o", "setup", "-o", ".venv/.installed", "exps", f"BIN={bin_dir}"], cwd=root,
                           env=env, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    for name in names:
        assert name in shown.stdout, shown.stdout

    # Run again: everything is in MLflow, nothing is queued.
    again = sweep(root, env, "queue", str(recipes), "--seeds", "1", "2")
    assert again.returncode == 0 and "0 experiment(s) to run (4 already in MLflow)" in again.stderr, again.stderr
    assert len(c.search_runs([exp_id])) == 4

    # The cited command is DVC's own grid: it queues one experiment per seed.
    dvc = str(bin_dir / "dvc")
    subprocess.run([dvc, "exp", "run", "--queue", "-S", "train.learning_rate=0.002", "-S", "train.seed=1,2"],
                   cwd=root, env=env, check=True, capture_output=True, timeout=300)
    status = subprocess.run([dvc, "queue", "status"], cwd=root, env=env, capture_output=True, text=True).stdout
    # The sweep's queue worker can still be alive and take one of them at once (CI saw it):
    # the two new tasks count whether they wait or already run.
    new = [line.split() for line in status.splitlines()[1:] if len(line.split()) >= 3]
    new = [row for row in new if row[1] not in names and row[-1] in ("Queued", "Running")]
    assert len(new) == 2, status
    subprocess.run([dvc, "queue", "remove", "--queued"], cwd=root, env=env, check=True, capture_output=True)
    subprocess.run([dvc, "queue", "stop", "--kill"], cwd=root, env=env, capture_output=True)


def test_rows_measured_without_dvc_join_the_table_once(tmp_path, mirror_dir):
    root = tmp_path / "project"
    env = git_project(root, mirror_dir, TINY_CHAR)
    rows = tmp_path / "sweep.jsonl"
    rows.write_text("".join(json.dumps({"name": "rope", "overrides": {"model.position": "rope"}, "seed": s,
                                        "val_loss": v, "bits_per_byte": v / 2, "best_step": 700}) + "\n"
                            for s, v in ((1337, 4.5), (1338, 4.7))))
    p = sweep(root, env, "import", str(rows), "--machine", "1x H200, bf16")
    assert p.returncode == 0 and "2 run(s) imported, 0 already there" in p.stderr, p.stderr
    again = sweep(root, env, "import", str(rows), "--machine", "1x H200, bf16")
    assert "0 run(s) imported, 2 already there" in again.stderr, again.stderr

    table = sweep(root, env, "report")
    assert table.returncode == 0, table.stderr
    row = [line for line in table.stdout.splitlines() if line.startswith("| rope")]
    assert row == [f"| rope | 1337, 1338 | 4.6000 | 0.2000 | 2.3000 | 700/700 | 1x H200, bf16 | {rows} | "
                   "`dvc exp run --queue -S model.position=rope -S train.seed=1337,1338 && dvc queue start -j 2` |"]

    # A row written before its recipes file had a base recorded only the recipe's own keys:
    # --recipes completes it, so the cited command is the whole setting.
    recipes = tmp_path / "recipes.yaml"
    recipes.write_text("base: {model.mlp_activation: gelu}\nqk: {model.qk_norm: true}\n")
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"name": "qk", "overrides": {"model.qk_norm": True}, "seed": 7, "val_loss": 4.4}) + "\n")
    assert sweep(root, env, "import", str(old), "--machine", "m", "--recipes", str(recipes)).returncode == 0
    row = [line for line in sweep(root, env, "report", "--only", "qk").stdout.splitlines() if line.startswith("| qk")]
    assert row and "`dvc exp run -S model.mlp_activation=gelu -S model.qk_norm=True -S train.seed=7`" in row[0], row

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "x"}\n')
    refused = sweep(root, env, "import", str(bad), "--machine", "m")
    assert refused.returncode != 0 and "line(s) [1] are not sweep rows" in refused.stderr
    assert "Traceback" not in refused.stderr
    none = sweep(root, env, "report", "--only", "nosuch")
    assert none.returncode != 0 and "no finished sweep runs in MLflow for ['nosuch']" in none.stderr
