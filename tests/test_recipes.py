"""The shipped sweep recipes (bench/recipes.yaml) are valid configurations: a typo in one
would otherwise surface only when someone starts an hour-long sweep that includes it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import yaml

from project_copy import REPO

RECIPES = yaml.safe_load((REPO / "bench" / "recipes.yaml").read_text())


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("recipe_sweep", REPO / "bench" / "recipe_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_is_a_valid_configuration(sweep, name):
    over = RECIPES[name] or {}
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
