"""The shipped sweep recipes (bench/recipes.yaml) are valid configurations: a typo in one
would otherwise surface only when someone starts an hour-long sweep that includes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from project_copy import REPO, bench_module

FILE = yaml.safe_load((REPO / "bench" / "recipes.yaml").read_text())
RECIPES = [name for name in FILE if name != "base"]


@pytest.fixture(scope="module")
def sweep():
    return bench_module("recipe_sweep")


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_is_a_valid_configuration(sweep, name):
    over = sweep.load_recipes(REPO / "bench" / "recipes.yaml")[name]
    assert over == {**FILE["base"], **(FILE[name] or {})}  # its own overrides on top of the base
    params = sweep.with_overrides(over, seed=1338, device="cpu")
    d = params.to_dict()
    for dotted, value in over.items():  # each override lands where it says, validated
        section, key = dotted.split(".", 1)
        assert d[section][key] == value, dotted
    assert d["train"]["seed"] == 1338


@pytest.mark.parametrize("runner", ["recipe_sweep", "sweep_direct"])
def test_a_bad_recipe_value_is_one_line_naming_the_recipe(tmp_path, runner):
    bad = tmp_path / "recipes.yaml"
    bad.write_text("oops: {train.label_smoothing: 1.5}\n")
    args = ["queue", str(bad)] if runner == "recipe_sweep" else [str(bad), "--out", str(tmp_path / "s.jsonl")]
    p = subprocess.run([sys.executable, str(REPO / "bench" / f"{runner}.py"), *args],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode != 0
    assert "recipe 'oops'" in p.stderr and "label_smoothing" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "s.jsonl").exists()  # nothing trained, nothing written


def test_the_base_is_the_muon_recipe_and_the_winner_is_params_yaml(sweep):
    # Rows measured before the switch stay comparable: the base undoes what params.yaml
    # took from #21's sweep, and that sweep's winner on top of the base is params.yaml.
    from gptcore.config import load_params

    recipes = sweep.load_recipes(REPO / "bench" / "recipes.yaml")
    muon = sweep.with_overrides(recipes["muon"], seed=1337, device="auto")
    assert (muon.model.position, muon.model.mlp_activation, muon.train.label_smoothing,
            muon.train.ema_decay) == ("learned", "gelu", 0.0, 0.0)
    measured = sweep.with_overrides(recipes["rope_ls0.02_ema0.99"], seed=1337, device="auto")
    assert (measured.train.ema_decay, measured.train.ema_warmup) == (0.99, "tf")  # as it was measured
    previous = sweep.with_overrides(recipes["rope_ls0.02_ema0.995_mean"], seed=1337, device="auto")
    assert previous.model.mlp_activation == "gelu"  # the default before ReLU², as measured
    assert sweep.with_overrides(recipes["rope_ls0.02_ema0.995_mean_relu2"], seed=1337,
                                device="auto").train.weight_decay == 0.1  # the default before wd 0.3
    assert sweep.with_overrides(recipes["rope_ls0.02_ema0.995_mean_relu2_wd0.3"], seed=1337,
                                device="auto") == load_params(REPO / "params.yaml")


def test_a_recipe_with_its_own_tokenizer_gets_that_vocabulary(sweep):
    # model.vocab_size: auto in params.yaml follows the recipe's tokenizer, as in the pipeline
    # (a direct sweep or bench_recipe_cost once built a 50,257-row model for a 4,096-id BPE).
    recipes = sweep.load_recipes(REPO / "bench" / "recipes.yaml")
    assert sweep.with_overrides(recipes["bpe4k_wd0.3"], seed=1337).model.vocab_size == 4096
    assert sweep.with_overrides(recipes["bpe8k"], seed=1337).model.vocab_size == 8192
    assert sweep.with_overrides(recipes["char1000"], seed=1337).model.vocab_size == 66
    assert sweep.with_overrides(recipes["muon"], seed=1337).model.vocab_size == 50257


def _gone(pid: int) -> bool:
    """Ended: no such process, or a zombie nobody has reaped yet (a container's init may not)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_run_ends_when_its_sweep_is_killed(tmp_path):
    # A direct sweep's run trains for up to an hour in its own process: kill -9 the sweep and the
    # run must not keep a core busy, unseen. The "sweep" here is a real parent process
    # launching a real child that calls the run's own guard; then SIGKILL, then wait.
    parent = tmp_path / "sweep.py"
    parent.write_text(textwrap.dedent(f"""
        import os, subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", (
            "import os, sys, time; sys.path.insert(0, {str(REPO / "bench")!r}); import sweep_direct; "
            "sweep_direct.die_with_parent(int(os.environ['GPTCORE_SWEEP_PID'])); "
            "print('ready', flush=True); time.sleep(300)")],
            env={{**os.environ, "GPTCORE_SWEEP_PID": str(os.getpid())}}, stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        print(child.pid, flush=True)
        child.wait()
    """))
    sweep = subprocess.Popen([sys.executable, str(parent)], stdout=subprocess.PIPE, text=True)
    run = None
    try:
        run = int(sweep.stdout.readline())
        assert not _gone(run)
        sweep.send_signal(signal.SIGKILL)
        sweep.wait(timeout=30)
        deadline = time.monotonic() + 30
        while not _gone(run) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(run), "the run outlived its sweep"
    finally:
        sweep.kill()
        if run is not None and not _gone(run):  # a failed guard must not leave its sleeper behind
            os.kill(run, signal.SIGKILL)


def test_a_run_whose_sweep_already_ended_does_not_start():
    # The guard's other half: the sweep died before the guard was set (its pid is not
    # this process's parent any more), so the run exits instead of training unowned.
    p = subprocess.run([sys.executable, "-c",
                        f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import sweep_direct; "
                        "sweep_direct.die_with_parent(1)"], capture_output=True, text=True)
    if sys.platform.startswith("linux"):
        assert p.returncode != 0 and "has ended" in p.stderr
        assert "Traceback" not in p.stderr
    else:
        assert p.returncode == 0
