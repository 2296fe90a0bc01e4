"""bench/averaging_screen.py's averaging rules compute the averages its docstring names:
a screen that averaged something else would rank the wrong schemes for an hour per seed."""

from __future__ import annotations

import json

import pytest
import torch
from project_copy import bench_module

from gptcore.training.averaging import WeightAverage


@pytest.fixture(scope="module")
def screen():
    return bench_module("averaging_screen")


def averaged(weight, values: list[float], init: float = 0.0) -> float:
    """Lerp an average through ``values`` (update n = 1, 2, ...) with the rule's weights."""
    avg = init
    for n, v in enumerate(values, start=1):
        w = weight(n)
        if w is not None:
            avg += w * (v - avg)
    return avg


def test_tail_average_is_the_uniform_mean_from_its_start_step(screen):
    values = [float(v * v) for v in range(1, 21)]
    assert averaged(screen.rule("swa5"), values) == pytest.approx(sum(values[4:]) / 16)
    assert screen.rule("swa5")(4) is None  # untouched before it starts


def test_cumulative_warm_up_is_a_running_mean_until_the_cap_binds(screen):
    values = [float(v) for v in range(1, 31)]
    cap = 0.95  # binds at n = 19
    weight = screen.rule(f"ema{cap}_cum")
    assert averaged(weight, values[:19], init=7.0) == pytest.approx((7.0 + sum(values[:19])) / 20)
    assert weight(40) == pytest.approx(1 - cap)


@pytest.mark.parametrize("name, warmup", [("ema0.9", "tf"), ("ema0.9_cum", "mean")])
def test_ema_rules_are_the_trainers_own_averages(screen, name, warmup):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    trainer_avg = WeightAverage(model, 0.9, warmup)
    mine = [p.detach().clone() for p in trainer_avg.params]
    weight = screen.rule(name)
    for n in range(1, 40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        trainer_avg.update()
        for a, p in zip(mine, trainer_avg.params):
            a.lerp_(p.detach(), weight(n))
    for a, b in zip(mine, trainer_avg.average):
        assert torch.equal(a, b)  # the same float operations: a screen row is what the pipeline trains


def test_summary_reports_each_schemes_pick_paired_with_the_default(screen, tmp_path):
    rows = [
        {"seed": 1, "scheme": "default", "step": 800, "estimate": 4.6},
        {"seed": 1, "scheme": "default", "step": 800, "estimate": 4.6, "picked": True, "val_loss": 4.50},
        {"seed": 2, "scheme": "default", "step": 900, "estimate": 4.7, "picked": True, "val_loss": 4.60},
        {"seed": 1, "scheme": "swa700", "step": 1000, "estimate": 4.5, "picked": True, "val_loss": 4.48},
        {"seed": 2, "scheme": "swa700", "step": 1000, "estimate": 4.6, "picked": True, "val_loss": 4.56},
    ]
    path = tmp_path / "screen.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = screen.summarize(path).splitlines()
    default = next(line for line in table if line.startswith("| default "))
    swa = next(line for line in table if line.startswith("| swa700 "))
    assert "| 4.5500 | +0.0000 | 800/900 |" in default
    assert "| 4.5200 | -0.0300 | 1000/1000 |" in swa


@pytest.mark.parametrize("name", ["ema0.99_x", "ema1.5", "swaX", "sma0.9"])
def test_a_scheme_name_outside_the_three_families_is_refused(screen, name):
    with pytest.raises(ValueError):
        screen.rule(name)


def test_summary_refuses_a_file_that_mixes_baselines(screen, tmp_path):
    old = {"seed": 1, "scheme": "default", "step": 800, "estimate": 4.6, "picked": True, "val_loss": 4.5}
    new = {**old, "seed": 2, "ema_decay": 0.995, "ema_warmup": "mean"}
    path = tmp_path / "screen.jsonl"
    path.write_text(json.dumps(old) + "\n" + json.dumps(new) + "\n")
    with pytest.raises(SystemExit, match=r"default rows average differently .*0.99, 'tf'.*0.995, 'mean'"):
        screen.summarize(path)
    path.write_text(json.dumps(new) + "\n" + json.dumps({**new, "seed": 3}) + "\n")
    assert "| default |" in screen.summarize(path)
