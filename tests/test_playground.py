"""The playground page of `gptcore serve` (GET /), against the real server on a tiny
char-level checkpoint: served verbatim over HTTP, and, in headless Chromium (driven by
tests/browser.py), streaming a completion into the page, showing the server's errors,
splitting stop strings and stopping a stream.

The page's completion is compared with the server's own non-streamed answer to the same
request at temperature 0 (greedy, so deterministic): the page must show exactly what the
server generated, neither dropping nor garbling streamed pieces.

Without Chromium the browser tests are skipped with a warning saying so (Debian:
`apt-get install chromium`); the HTTP check still runs.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
from browser import Browser, find_chromium
from conftest import REPO, never_ending_checkpoint
from test_serve import MODEL, running_server

pytestmark = pytest.mark.slow  # a real server, and Chromium where installed: `make test-all` and CI

PAGE = REPO / "gptcore" / "serving" / "playground.html"
IDS = ("prompt", "generate", "stop", "output", "error", "model", "max_tokens", "temperature", "top_k",
       "top_p", "repetition_penalty", "seed", "stop_strings", "stats")
WAIT_S = 120  # upper bound for one step (server start, a generation), only to fail instead of hanging


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """test_cli's tiny char model, which never ends a completion early."""
    return never_ending_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0, std=0.3)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory) -> str:
    """A real `gptcore serve` on a free localhost port for this module (test_serve's
    helper); its base URL once /health answers ok."""
    with running_server(checkpoint, tmp_path_factory.mktemp("serve"), "--max-batch", "2") as s:
        yield s.base


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium for this module; the browser tests are skipped, loudly, without one."""
    if find_chromium() is None:
        why = ("Chromium not found (Debian: apt-get install chromium): the playground's browser "
               "tests are skipped; GET / is still checked over HTTP")
        warnings.warn(why, stacklevel=2)
        pytest.skip(why)
    with Browser() as b:
        yield b


def get(base: str, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(base + path, timeout=10) as r:
        return r.status, r.read()


def complete(base: str, body: dict) -> tuple[int, dict]:
    """POST /v1/completions (not streamed); the status and the decoded JSON, errors included."""
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=WAIT_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def text_of(b: Browser, element_id: str) -> str:
    return b.evaluate(f"document.getElementById({json.dumps(element_id)}).textContent")


def open_playground(b: Browser, base: str, **settings: str) -> None:
    """Open the page, wait until it shows the served model, and fill in ``settings``
    (element id -> text) as typed input."""
    b.open(base + "/")
    model = json.loads(get(base, "/v1/models")[1])["data"][0]["id"]
    b.wait_for(f"document.getElementById('model').textContent === {json.dumps(model)}", timeout=WAIT_S)
    for element_id, text in settings.items():
        b.type_text(f"#{element_id}", text, clear=True)


def generate(b: Browser) -> str:
    """Click Generate and wait until the request is over; the page's final state."""
    b.click("#generate")
    return b.wait_for("document.body.dataset.state !== 'running' && document.body.dataset.state",
                      timeout=WAIT_S)


# --------------------------------------------------------------------------- HTTP


def test_root_serves_the_playground_verbatim(server):
    with urllib.request.urlopen(server + "/", timeout=10) as r:
        assert r.status == 200
        assert r.headers.get_content_type() == "text/html"
        body = r.read()
    assert body == PAGE.read_bytes()
    html = body.decode()
    for element_id in IDS:
        assert f'id="{element_id}"' in html, element_id
    # Served offline: nothing loaded from elsewhere.
    for external in ("http://", "https://", "src="):
        assert external not in html, external


# --------------------------------------------------------------------------- browser


def test_playground_streams_the_servers_completion(server, browser):
    prompt = "ROMEO:\nWhat"
    open_playground(browser, server, prompt=prompt, max_tokens="40", temperature="0")
    assert generate(browser) == "done", text_of(browser, "error")
    model = text_of(browser, "model")
    status, expected = complete(server, {"model": model, "prompt": prompt, "max_tokens": 40, "temperature": 0,
                                         "top_k": 0, "top_p": 1, "repetition_penalty": 1})
    assert status == 200, expected
    completion = expected["choices"][0]["text"]
    assert len(completion) == 40  # end-of-text never wins greedily: the completion ran to max_tokens
    assert text_of(browser, "output") == prompt + completion
    # Appended as it arrived: one text node per streamed piece, not one blob at the end.
    assert browser.evaluate("document.getElementById('output').lastChild.childNodes.length") > 1
    assert "40 chars" in text_of(browser, "stats") and "finish_reason: length" in text_of(browser, "stats")
    assert browser.evaluate("document.getElementById('error').hidden")


def test_playground_shows_the_servers_error(server, browser):
    open_playground(browser, server, prompt="ROMEO:", max_tokens="10", temperature="-1")
    assert generate(browser) == "error"
    status, expected = complete(server, {"model": text_of(browser, "model"), "prompt": "ROMEO:", "max_tokens": 10,
                                         "temperature": -1})
    assert 400 <= status < 500 and expected["error"]["message"], expected
    assert browser.evaluate("!document.getElementById('error').hidden")
    assert text_of(browser, "error") == expected["error"]["message"]
    assert text_of(browser, "output") == "ROMEO:"  # the prompt, and nothing generated


def test_playground_sends_one_stop_string_per_line(server, browser):
    prompt = "ROMEO:"
    _, greedy = complete(server, {"prompt": prompt, "max_tokens": 40, "temperature": 0})
    stop = greedy["choices"][0]["text"][10]  # a character the greedy completion reaches, maybe "," or "\n"
    # Two lines: the stop string (a newline written as \n, as the page's hint says) and one never generated.
    open_playground(browser, server, prompt=prompt, max_tokens="40", temperature="0",
                    stop_strings=stop.replace("\n", "\\n") + "\nnever, generated")
    assert generate(browser) == "done", text_of(browser, "error")
    status, expected = complete(server, {"prompt": prompt, "max_tokens": 40, "temperature": 0,
                                         "stop": [stop, "never, generated"]})
    assert status == 200 and expected["choices"][0]["finish_reason"] == "stop", expected
    assert text_of(browser, "output") == prompt + expected["choices"][0]["text"]
    assert "finish_reason: stop" in text_of(browser, "stats")


def test_playground_stop_button_aborts_the_stream(server, browser):
    open_playground(browser, server, prompt="ROMEO:", max_tokens="1000", temperature="0")
    # A slow network (about 20 pieces a second): the tiny model would otherwise finish all
    # 1000 tokens (about 0.6 s) before Stop could be clicked, and the test would race it.
    browser.send("Network.enable", session=True)
    browser.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "uploadThroughput": -1,
                                                      "downloadThroughput": 4000}, session=True)
    browser.click("#generate")
    state = browser.wait_for("(document.getElementById('output').textContent.length > 'ROMEO:'.length"
                             " || document.body.dataset.state !== 'running') && document.body.dataset.state",
                             timeout=WAIT_S)
    assert state == "running", text_of(browser, "error")
    browser.click("#stop")
    assert browser.wait_for("document.body.dataset.state !== 'running' && document.body.dataset.state",
                            timeout=WAIT_S) == "stopped", text_of(browser, "error")
    assert "stopped by you" in text_of(browser, "stats")
    assert browser.evaluate("document.getElementById('error').hidden")
    assert len(text_of(browser, "output")) < len("ROMEO:") + 1000
    # The server let go of the aborted request: a new one is still answered.
    status, answer = complete(server, {"prompt": "ROMEO:", "max_tokens": 5, "temperature": 0})
    assert status == 200 and len(answer["choices"][0]["text"]) == 5, answer


def test_playground_asks_for_the_key_and_sends_it(checkpoint, browser, tmp_path):
    key = "playground-key-42"
    with running_server(checkpoint, tmp_path, "--api-key", key) as s:
        browser.open(s.base + "/")
        # /health says a key is needed: the field shows, and listing the model failed with 401.
        browser.wait_for("!document.getElementById('key_field').hidden", timeout=WAIT_S)
        browser.wait_for("!document.getElementById('error').hidden", timeout=WAIT_S)
        assert "needs an API key" in text_of(browser, "error")
        browser.type_text("#api_key", key, clear=True)
        browser.evaluate("document.getElementById('api_key').dispatchEvent(new Event('change'))")
        browser.wait_for(f"document.getElementById('model').textContent === {json.dumps(MODEL)}",
                         timeout=WAIT_S)
        browser.type_text("#prompt", "ROMEO:", clear=True)
        browser.type_text("#max_tokens", "8", clear=True)
        browser.type_text("#temperature", "0", clear=True)  # greedy never ends this model: 8 tokens, always
        assert generate(browser) == "done", text_of(browser, "error")
        assert len(text_of(browser, "output")) == len("ROMEO:") + 8
        assert browser.evaluate("document.getElementById('error').hidden")
