"""The decoding engine: continuous batching of rows with their own prompts, positions,
settings and budgets. Every row's logits are checked against a full forward pass over
its own window at every step, and every row's tokens against a lone, uncached decode."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_generate import BLOCK, tiny_model

from gptcore.generation.engine import Engine
from gptcore.generation.generate import generate_ids
from gptcore.generation.sampling import SamplingConfig
from gptcore.model.decode import TopLogits

VOCAB = 40
# Row settings that take every path of a step: greedy (screening depth 1), top-k (depth 5),
# the repetition penalty (all logits, per-row history), plain sampling with top-p.
SETTINGS = [
    SamplingConfig(temperature=0.0, stop_at_eot=False),
    SamplingConfig(temperature=1.0, top_k=5, seed=3, stop_at_eot=False),
    SamplingConfig(temperature=0.9, repetition_penalty=1.5, seed=4, stop_at_eot=False),
    SamplingConfig(temperature=1.2, top_p=0.8, seed=5, stop_at_eot=False),
]


class CheckedEngine(Engine):
    """An engine that, before every pick, compares each row's logits with a full forward
    pass over the row's current window (all of them, or the row's top ids and values)."""

    checked = tops = 0

    def _pick(self, rows):
        for row in rows:
            window = row.context[row.start:]
            assert 1 <= len(window) <= self.block
            with torch.no_grad():
                full = self.model(torch.tensor([window]))[0][0, -1].float()
            if isinstance(row.logits, TopLogits):  # the row's top: the full pass's, in order
                ids, values = row.logits.ids, row.logits.values
                torch.testing.assert_close(values, full[ids], atol=1e-4, rtol=0)
                assert (values[1:] <= values[:-1]).all()
                others = torch.ones_like(full, dtype=torch.bool)
                others[ids] = False  # no id left out is larger than the smallest kept (within rounding)
                assert not others.any() or full[others].max() <= values[-1] + 1e-4
                self.tops += 1
            else:
                torch.testing.assert_close(row.logits, full, atol=1e-4, rtol=0)
            self.checked += 1
        return super()._pick(rows)


@pytest.fixture(scope="module")
def model():
    return tiny_model(VOCAB, seed=2)


def lone(model, prompt, cfg, crop_to):
    return generate_ids(model, prompt, cfg, crop_to=crop_to, use_cache=False)


@pytest.mark.parametrize("crop_to", [None, 3, BLOCK])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_rows_admitted_at_different_steps_equal_lone_decodes(model, crop_to, use_cache):
    """Rows join at steps 0, 2, 5 and 9 with prompts of 1, 7, 16 and 3 tokens (16 =
    block_size: the first step crops it), run past block_size and get cropped at
    different steps; a fifth waits for a free row (max_rows 4). Each row's logits equal
    the full forward pass at every step, and its tokens a lone uncached decode."""
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (1, 7, BLOCK, 3, 5)]
    joins = [0, 2, 5, 9, 9]
    budgets = [3 * BLOCK, 2 * BLOCK + 1, BLOCK + 3, 2 * BLOCK, 9]
    cfgs = [dataclasses.replace(SETTINGS[i % 4], max_new_tokens=budgets[i]) for i in range(5)]
    engine = CheckedEngine(model, max_rows=4, crop_to=crop_to, use_cache=use_cache)
    out: dict[int, list[int]] = {i: [] for i in range(5)}
    step, widest = 0, 0
    while step <= max(joins) or engine.busy:
        for i, at in enumerate(joins):
            if at == step:
                engine.submit(prompts[i], cfgs[i], tag=i)
        events = engine.step()
        widest = max(widest, len(events))
        for row, token in events:
            out[row.tag].append(token)
        step += 1
    assert widest == 4  # four rows shared steps; the fifth waited
    assert engine.checked == sum(budgets) and engine.tops > 0  # greedy and top-k rows got their top
    for i in range(5):
        assert out[i] == lone(model, prompts[i], cfgs[i], crop_to), f"row {i}"
        assert len(out[i]) == budgets[i]


def test_rows_at_one_position_and_rows_apart_give_the_same_tokens(model):
    """Two rows submitted together (one position, no mask) and the same two submitted a
    few steps apart (a masked step) decode the same tokens."""
    cfgs = [dataclasses.replace(SETTINGS[0], max_new_tokens=20), dataclasses.replace(SETTINGS[1], max_new_tokens=20)]
    together = Engine(model, max_rows=2)
    rows = [together.submit([1, 2, 3], cfg) for cfg in cfgs]
    got = {id(r): [] for r in rows}
    for row, token in together.run():
        got[id(row)].append(token)
    apart = Engine(model, max_rows=2)
    first = apart.submit([1, 2, 3], cfgs[0])
    late = []
    events = apart.step() + apart.step() + apart.step()
    second = apart.submit([1, 2, 3], cfgs[1])
    events += apart.run()
    late = [t for r, t in events if r is second]
    assert [t for r, t in events if r is first] == got[id(rows[0])]
    assert late == got[id(rows[1])]


def test_a_cancelled_row_leaves_before_the_next_forward_pass(model):
    engine = Engine(model, max_rows=4)
    a = engine.submit([1, 2], dataclasses.replace(SETTINGS[0], max_new_tokens=30))
    b = engine.submit([3], dataclasses.replace(SETTINGS[1], max_new_tokens=30))
    waiting = engine.submit([4], dataclasses.replace(SETTINGS[1], max_new_tokens=30))
    waiting.cancel("gone")  # cancelled before it was ever admitted
    assert [r for r, _ in engine.step()] == [a, b]
    a.cancel("client went away")
    events = engine.step()
    assert [r for r, _ in events] == [b] and engine.active == [b]
    assert a.finish_reason == "client went away" and waiting.finish_reason == "gone"
    rest = [t for _, t in engine.run()]
    assert len(rest) == 28 and b.finish_reason == "length"
    # b kept its own sequence while a left: the same tokens as alone
    assert [t for r, t in events] + rest == lone(model, [3], dataclasses.replace(SETTINGS[1], max_new_tokens=30),
                                                 None)[1:]


def test_waiting_rows_take_free_rows_as_others_finish(model):
    engine = Engine(model, max_rows=2)
    budgets = [2, 6, 4, 3]
    rows = [engine.submit([i + 1], dataclasses.replace(SETTINGS[0], max_new_tokens=n), tag=i)
            for i, n in enumerate(budgets)]
    widths = []
    while engine.busy:
        widths.append(len(engine.step()))
        assert len(engine.active) <= 2
    assert max(widths) == 2 and sum(widths) == sum(budgets)
    assert all(r.finish_reason == "length" and r.produced == n for r, n in zip(rows, budgets))


def test_end_of_text_and_zero_budgets(model):
    engine = Engine(model, max_rows=2, eot_id=0)
    greedy = dataclasses.replace(SETTINGS[0], max_new_tokens=50)
    ids = generate_ids(model, [5], greedy)
    eot = ids[7]
    engine = Engine(model, max_rows=2, eot_id=eot)
    row = engine.submit([5], dataclasses.replace(greedy, stop_at_eot=True))
    none = engine.submit([5], dataclasses.replace(greedy, max_new_tokens=0))
    assert none.finished and none.finish_reason == "length"
    events = engine.run()
    assert [t for _, t in events] == ids[:ids.index(eot)] + [None]
    assert row.finish_reason == "stop"
