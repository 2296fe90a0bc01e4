"""`echo` and `logprobs` on /v1/completions, as scoring tools use them (lm-evaluation-harness's
`local-completions` sends the text with `echo: true, logprobs: 1, max_tokens: 0`): a passage of
validation text scored through the API equals the evaluate stage's loss on the same tokens;
generated tokens' log-probabilities are the model's own (before temperature), the same as
scoring the text afterwards; streamed ones add up to the non-streamed ones. Real server process,
the official `openai` client."""

from __future__ import annotations

import numpy as np
import openai
import pytest
from test_serve import (
    BLOCK,
    MODEL,
    PROMPT,
    WAIT_S,
    check_error,
    checkpoint,  # noqa: F401 - the fixture, shared
    request,
    running_server,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):  # noqa: F811
    with running_server(checkpoint, tmp_path_factory.mktemp("logprobs"), "--max-tokens", "64") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=WAIT_S) as c:
        yield c


@pytest.fixture(scope="module")
def passage(mirror_dir) -> str:
    """Validation text (the last 10 % of Tiny Shakespeare): 3 contexts' worth of characters."""
    text = (mirror_dir / "input.txt").read_text(encoding="utf-8")
    start = int(len(text) * 0.9) + 1000
    return text[start:start + 3 * BLOCK + 1]


def score(client, text: str, top: int = 1):
    answer = client.completions.create(model=MODEL, prompt=text, echo=True, logprobs=top, max_tokens=0)
    [choice] = answer.choices
    assert choice.text == text and choice.finish_reason == "length" and answer.usage.completion_tokens == 0
    return choice.logprobs


def test_scoring_a_passage_equals_the_evaluate_stage(client, checkpoint, passage):  # noqa: F811
    from gptcore.checkpoint import load_checkpoint
    from gptcore.evaluate import evaluate_tokens

    one = passage[:BLOCK + 1]  # one window: the evaluate stage's own numbers
    lp = score(client, one)
    assert lp.tokens == list(one) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == list(range(len(one)))
    model, tokenizer, _ = load_checkpoint(checkpoint)
    ids = tokenizer.encode(one)
    # evaluate_tokens predicts its first token from eot_id: give it the passage's first token,
    # and its one window is this request's.
    ev = evaluate_tokens(model, np.array(ids[1:]), eot_id=ids[0], n_bytes=1, batch_size=1, progress=False)
    nats = [-v for v in lp.token_logprobs[1:]]
    assert abs(sum(nats) / len(nats) - ev["val_loss"]) < 1e-4
    # The alternatives: the most probable ones, the chosen token among them when it is the top one.
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert len(top) == 1 and max(top.values()) >= value - 1e-6
        if token in top:
            assert abs(top[token] - value) < 1e-5

    # Longer than the context: every token scored once; the first window's as before.
    long = score(client, passage, top=0)
    assert len(long.token_logprobs) == len(passage) and long.token_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in long.token_logprobs[1:]) and long.top_logprobs[1] == {}
    assert long.token_logprobs[:BLOCK + 1] == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_generated_tokens_carry_the_models_own_logprobs(client):
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3)
    [choice] = greedy.choices
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.tokens) == 12
    assert lp.text_offset == list(range(12))
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and value <= 0
        assert abs(max(top.values()) - value) < 1e-5 and top[token] == value  # greedy takes the top one
    # Scoring the text afterwards gives the same numbers: one distribution, cached or not.
    rescored = score(client, PROMPT + choice.text, top=0)
    assert rescored.token_logprobs[len(PROMPT):] == pytest.approx(lp.token_logprobs, abs=1e-4)

    # Before temperature, as OpenAI's: a hot sample's tokens score what the model gives them.
    hot = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.7, seed=5, logprobs=0)
    [h] = hot.choices
    again = score(client, PROMPT + h.text, top=0)
    assert again.token_logprobs[len(PROMPT):] == pytest.approx(h.logprobs.token_logprobs, abs=1e-4)
    assert "".join(h.logprobs.tokens) == h.text and h.logprobs.top_logprobs == [{}] * len(h.text)


def test_streamed_logprobs_add_up_to_the_whole(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0.9, seed=11,
                                      logprobs=2).choices[0]
    tokens, values, offsets, text = [], [], [], ""
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0.9, seed=11,
                                           logprobs=2, stream=True):
        c = chunk.choices[0]
        text += c.text
        if c.logprobs is not None:
            tokens += c.logprobs.tokens
            values += c.logprobs.token_logprobs
            offsets += c.logprobs.text_offset
    assert text == whole.text and tokens == whole.logprobs.tokens
    assert values == pytest.approx(whole.logprobs.token_logprobs, abs=1e-6)
    assert offsets == list(range(20))


def test_echo_without_logprobs_and_n_choices(client):
    answer = client.completions.create(model=MODEL, prompt=["ab", "Hark"], echo=True, max_tokens=3, n=2,
                                       temperature=0)
    assert [c.text[:len(p)] for c, p in zip(answer.choices, ["ab", "ab", "Hark", "Hark"])] == \
        ["ab", "ab", "Hark", "Hark"]
    assert all(len(c.text) in (5, 7) and c.logprobs is None for c in answer.choices)


@pytest.mark.parametrize("body, param, words", [
    ({"logprobs": 6}, "logprobs", ["0 <= logprobs <= 5"]),
    ({"logprobs": True}, "logprobs", ["0 <= logprobs <= 5"]),
    ({"echo": "yes"}, "echo", ["true or false"]),
    ({"echo": True, "stream": True}, "echo", ["without stream"]),
    ({"logprobs": 1, "stop": "\n"}, "logprobs", ["stop strings"]),
])
def test_bad_echo_and_logprobs_are_400s(server, body, param, words):
    check_error(*request(server.port, "POST", "/v1/completions", {"prompt": PROMPT, **body}), 400, param=param,
                words=words)
    assert request(server.port, "GET", "/health")[1]["rows_in_flight"] == 0  # refused before anything queued
