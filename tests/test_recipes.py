"""The shipped sweep recipes (bench/recipes.yaml) are valid configurations: a typo in one
would otherwise surface only when someone starts an hour-long sweep that includes it."""

from __future__ import annotations

import subprocess
import sys

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


def test_a_bad_recipe_value_is_one_line_naming_the_recipe(tmp_path):
    bad = tmp_path / "recipes.yaml"
    bad.write_text("oops: {train.label_smoothing: 1.5}\n")
    p = subprocess.run([sys.executable, str(REPO / "bench" / "recipe_sweep.py"), str(bad),
                        "--out", str(tmp_path / "s.jsonl")], capture_output=True, text=True, cwd=REPO)
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
                                device="auto") == load_params(REPO / "params.yaml")
