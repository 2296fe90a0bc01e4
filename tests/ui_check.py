"""Does `mlflow ui` show each run with its name, dataset and model, the training runs with
their losses, and the registered model with its champion? A check you can run after
`make repro` (and `dvc exp run`s); `make ui-check` runs it.

    python tests/ui_check.py [--store mlflow.db] [--screenshot docs/mlflow_run.png] [--no-browser]

Starts `mlflow ui` on a free localhost port and reads through its REST API:

* each run of the experiment `gptcore`: a readable name, two dataset inputs, a logged model;
* the experiment's saved view "gptcore training" (tag `mlflow.sharedViewState.training`,
  written by the pipeline): the runs table with eval_val_loss, eval_bits_per_byte and
  best_val_loss as columns, charts of val_loss and train_loss;
* the registered model `gptcore`: its `champion` alias and the champion version's tags
  (eval_val_loss, eval_bits_per_byte, data_digest).

It prints the links that open the training view. With headless Chromium installed
(Debian: `apt-get install chromium`) it also renders the pages, each in a fresh browser
profile (tests/browser.py), and checks the same facts in the page itself: every run's page
(name, dataset, model), the training view's loss columns (headers in a 1280-pixel window,
the best five runs' eval_val_loss heading the table), its charts, the Models page, the
`gptcore` model's page and the champion version's page (the alias and the eval tags); it
saves a screenshot of the newest run's page. Without Chromium (or with --no-browser) it says
so and checks the REST API only (the CI test `tests/test_pipeline.py` does the same, on a
tiny pipeline).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from gptcore.registry import CHAMPION, REGISTERED_MODEL
from gptcore.store import EXPERIMENT, TRAINING_VIEW_TAG, TRAINING_VIEW_URL

LOSS_COLUMNS = ("eval_val_loss", "eval_bits_per_byte", "best_val_loss")
LOSS_CHARTS = ("val_loss", "train_loss")
VERSION_TAGS = ("eval_val_loss", "eval_bits_per_byte", "data_digest")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(store: Path, env: dict | None = None, timeout: float = 90) -> Iterator[str]:
    """A real `mlflow ui` over ``store`` on a free localhost port, until the block ends;
    yields its base URL once it answers /health."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    mlflow = Path(sys.executable).parent / "mlflow"
    log = tempfile.TemporaryFile()  # a file, not a pipe: the server's request log never blocks it
    server = subprocess.Popen([str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{store}", "--host",
                               "127.0.0.1", "--port", str(port)], stdout=log, stderr=log,
                              start_new_session=True, env={**(env or os.environ), "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"mlflow ui exited: {log.read().decode(errors='replace')[-2000:]}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow ui did not start within {timeout:.0f} s") from None
                time.sleep(0.5)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def api(base: str, path: str, body: dict | None = None) -> dict:
    """GET (or POST ``body``) one MLflow REST endpoint; the decoded JSON."""
    req = urllib.request.Request(base + path, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def training_view_urls(base: str, experiment_id: str) -> dict[str, str]:
    """The links that open the experiment's runs table in the saved training view, and its charts."""
    table = f"{base}/#/experiments/{experiment_id}/{TRAINING_VIEW_URL}"
    return {"table": table, "charts": table + "&compareRunsMode=CHART"}


def training_view_problems(experiment: dict) -> list[str]:
    """What the experiment's saved training view lacks (REST: the experiment's tags)."""
    tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
    if TRAINING_VIEW_TAG not in tags:
        return [f"experiment {experiment['name']!r} has no saved training view (tag {TRAINING_VIEW_TAG}); "
                "run a pipeline stage once (its tracker adds it to an existing store)"]
    try:
        state = json.loads(json.loads(tags[TRAINING_VIEW_TAG])["state"])
    except (ValueError, KeyError, TypeError) as exc:
        return [f"tag {TRAINING_VIEW_TAG} is not a saved view ({type(exc).__name__}: {exc})"]
    columns = state.get("selectedColumns", [])
    charts = [c.get("metricKey") for c in state.get("compareRunCharts", []) if not c.get("deleted")]
    return ([f"the training view does not show column {m}" for m in LOSS_COLUMNS if f"metrics.`{m}`" not in columns]
            + [f"the training view does not chart {m}" for m in LOSS_CHARTS if m not in charts])


def registry_facts(base: str) -> tuple[dict | None, dict[str, dict[str, str]]]:
    """The registered model ``gptcore`` (None when there is none) and every version's tags."""
    try:
        model = api(base, "/api/2.0/mlflow/registered-models/get?name=" + REGISTERED_MODEL)["registered_model"]
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None, {}
        raise
    query = urllib.parse.urlencode({"filter": f"name='{REGISTERED_MODEL}'", "max_results": 1000})
    versions = api(base, "/api/2.0/mlflow/model-versions/search?" + query).get("model_versions", [])
    return model, {v["version"]: {t["key"]: t["value"] for t in v.get("tags", [])} for v in versions}


def registry_problems(model: dict | None, versions: dict[str, dict[str, str]]) -> list[str]:
    """What the registry lacks: the model, its champion alias, the champion's eval tags."""
    if model is None:
        return [f"no registered model {REGISTERED_MODEL!r}"]
    aliases = {a["alias"]: a["version"] for a in model.get("aliases", [])}
    if CHAMPION not in aliases:
        return [f"registered model {REGISTERED_MODEL!r} has no {CHAMPION!r} alias (aliases: {sorted(aliases)})"]
    champion = aliases[CHAMPION]
    if champion not in versions:
        return [f"alias {CHAMPION!r} names version {champion}, which the registry does not list"]
    return [f"version {champion} ({CHAMPION}) has no tag {t}" for t in VERSION_TAGS if t not in versions[champion]]


# ---------------------------------------------------------------------------- rendering

# The texts of ``needles`` that the page does not show (yet), as a JSON array.
_MISSING = ("(() => {{ const t = (document.body ? document.body.innerText : '').replace(/\\u00a0/g, ' ');"
            " return {needles}.filter(s => !t.includes(s)); }})()")

# Per loss column of the runs table: its header, if rendered inside the window, and its cells'
# [row index, text].
_COLUMNS = """(() => { const out = {};
  for (const m of %s) {
    const id = 'metrics.`' + m + '`', sel = '[col-id="' + CSS.escape(id) + '"]';
    const head = [...document.querySelectorAll('.ag-header-cell' + sel)].find(h => {
      const r = h.getBoundingClientRect(); return r.width > 0 && r.left >= 0 && r.right <= window.innerWidth; });
    out[m] = {header: head ? head.innerText.trim() : null,
              cells: [...document.querySelectorAll('.ag-cell' + sel)].map(c => [
                Number((c.closest('[row-index]') || {getAttribute: () => NaN}).getAttribute('row-index')),
                c.innerText.trim()])};
  }
  return out; })()"""

# The first chart section's name and its charts' titles.
_CHARTS = """(() => { const grid = document.querySelector('[data-testid=draggable-chart-cards-grid]');
  const head = document.querySelector('[data-testid=experiment-view-compare-runs-section-header]');
  return {section: head ? head.innerText.trim() : null,
          charts: grid ? [...grid.querySelectorAll('h4')].map(h => h.innerText.trim()) : []}; })()"""


def _page(url: str, window: tuple[int, int] = (1280, 900)):
    """A fresh headless Chromium (its own new profile) with ``url`` open."""
    from browser import Browser

    browser = Browser(window=window, timeout=60)
    browser.__enter__()
    try:
        browser.open(url)
    except BaseException:
        browser.close()
        raise
    return browser


def _until(browser, js: str, done, timeout: float = 45.0):
    """Evaluate ``js`` until ``done(value)`` or ``timeout``; the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = browser.evaluate(js)
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def _missing_texts(browser, needles: list[str], timeout: float = 45.0) -> list[str]:
    return _until(browser, _MISSING.format(needles=json.dumps(needles)), lambda missing: not missing, timeout)


def _screenshot(browser, path: Path) -> None:
    data = browser.send("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(data))


def render_run(url: str, run_name: str, screenshot: Path | None) -> list[str]:
    """The run's page shows its name, its train split and its logged model."""
    wanted = {"run name": run_name, "dataset": "train split", "logged model": "gptcore-best"}
    with contextlib.closing(_page(url)) as b:
        missing = _missing_texts(b, list(wanted.values()))
        if screenshot is not None:
            # The MLflow Assistant's panel opens on a profile's first visit: close it, for the run's sake.
            close = '[data-component-id="mlflow.assistant.chat_panel.close"]'
            if b.evaluate(f"!!document.querySelector({json.dumps(close)})"):
                b.click(close)
                _until(b, f"!document.querySelector({json.dumps(close)})", bool, 5)
            _screenshot(b, screenshot)
    return [f"{what} {text!r} not on the rendered page" for what, text in wanted.items() if text in missing]


def render_training_view(urls: dict[str, str], runs: list[dict], rows: int = 5) -> list[str]:
    """In a fresh profile and a 1280-pixel window, the training view's table shows the loss
    columns, sorted by eval_val_loss: the best ``rows`` runs' values first in sight (the table
    renders only the rows in sight); its charts open on val_loss and train_loss."""
    problems = []
    best = sorted(m["value"] for r in runs for m in r["data"].get("metrics", []) if m["key"] == "eval_val_loss")[:rows]

    def first(cells: list) -> list[str]:  # the column's first texts, top down
        ranked = [c for c in cells if isinstance(c[0], (int, float))]  # a cell outside a row: null
        return [text for _, text in sorted(ranked, key=lambda c: c[0])][:len(best)]

    def same(text: str, value: float) -> bool:
        try:
            return abs(float(text) - value) <= 1e-9 * max(1.0, abs(value))
        except ValueError:
            return False

    def heads(cols) -> bool:  # the best runs' eval_val_loss, best first, head the table
        top = first(cols["eval_val_loss"]["cells"])
        return len(top) == len(best) and all(same(t, v) for t, v in zip(top, best))

    with contextlib.closing(_page(urls["table"])) as b:
        columns = _until(b, _COLUMNS % json.dumps(list(LOSS_COLUMNS)),
                         lambda cols: all(c["header"] == m for m, c in cols.items()) and heads(cols))
        problems += [f"training view: no {m} column in sight (a 1280-pixel window)"
                     for m, c in columns.items() if c["header"] != m]
        if not heads(columns):
            problems.append(f"training view: the eval_val_loss column starts {first(columns['eval_val_loss']['cells'])}"
                            f", not with the best runs' {best}")
        problems += [f"training view: {t!r} not on the page" for t in _missing_texts(b, ["Sort: eval_val_loss"], 5)]
    with contextlib.closing(_page(urls["charts"])) as b:
        charts = _until(b, _CHARTS, lambda c: c["section"] and all(m in c["charts"] for m in LOSS_CHARTS))
        problems += [f"training view charts: no {m} chart in the first section ({charts})" for m in LOSS_CHARTS
                     if m not in charts["charts"]]
    return problems


def landing(base: str, experiment_id: str) -> str:
    """Where a fresh profile lands on opening the experiment as the list links it (a note)."""
    with contextlib.closing(_page(f"{base}/#/experiments/{experiment_id}")) as b:
        href = _until(b, "location.href", lambda h: any(f"/{experiment_id}/{t}" in h for t in
                                                          ("overview", "runs", "traces")), 30)
    return href.split("#", 1)[-1]


def render_registry(base: str, model: dict, versions: dict[str, dict[str, str]]) -> list[str]:
    """The Models page lists ``gptcore``; its page and the champion version's page show the
    champion alias and the version's eval tags."""
    problems = []
    champion = next(a["version"] for a in model["aliases"] if a["alias"] == CHAMPION)
    latest = max(versions, key=int)
    with contextlib.closing(_page(f"{base}/#/models")) as b:
        missing = _missing_texts(b, [REGISTERED_MODEL, f"Version {latest}"])
        problems += [f"Models page: {t!r} not shown" for t in missing]
    rows_js = ("[...document.querySelectorAll('[role=row]')].map(r => r.innerText.replace(/\\u00a0/g, ' ')"
               ".replace(/\\s+/g, ' ').trim())")
    tags = versions[champion]
    wanted = [f"@ {CHAMPION} ", *(f"{t} : {tags[t]}" for t in ("eval_val_loss", "eval_bits_per_byte"))]
    if int(champion) in sorted(map(int, versions), reverse=True)[:25]:  # the model page's first page
        with contextlib.closing(_page(f"{base}/#/models/{REGISTERED_MODEL}")) as b:
            def row(rows):
                return next((r + " " for r in rows if r.startswith(f"Version {champion} ")), "")
            found = row(_until(b, rows_js, lambda rows: all(w in row(rows) for w in wanted)))
            problems += [f"model page, version {champion}'s row: {w.strip()!r} not shown"
                         for w in wanted if w not in found]
    with contextlib.closing(_page(f"{base}/#/models/{REGISTERED_MODEL}/versions/{champion}")) as b:
        problems += [f"version {champion}'s page: {t!r} not shown" for t in
                     _missing_texts(b, [f"@ {CHAMPION}", "eval_val_loss", tags["eval_val_loss"], "eval_bits_per_byte"])]
    return problems


def main() -> int:
    from browser import find_chromium

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="mlflow.db", help="the SQLite store (default: ./mlflow.db)")
    ap.add_argument("--screenshot", default=str(Path(__file__).resolve().parents[1] / "docs" / "mlflow_run.png"),
                    help="where to save the newest run's page (default: the repo's docs/mlflow_run.png; '': none)")
    ap.add_argument("--no-browser", action="store_true", help="check through the REST API only")
    args = ap.parse_args()
    store = Path(args.store).resolve()
    if not store.exists():
        print(f"error: {store}: no MLflow store; run `make repro` first", file=sys.stderr)
        return 2
    browser = None if args.no_browser else find_chromium()
    failures = []

    def report(what: str, problems: list[str]) -> None:
        print(f"  {what}: " + ("ok" if not problems else "; ".join(problems)))
        failures.extend(problems)

    try:
        with mlflow_ui(store) as base:
            exp = api(base, f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={EXPERIMENT}")["experiment"]
            runs = api(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                                              "order_by": ["attributes.start_time DESC"]})["runs"]
            how = ("rendering each page in headless Chromium, a fresh profile per page" if browser else
                   "pages NOT rendered: " + ("--no-browser" if args.no_browser else "Chromium not found")
                   + "; checking through the REST API only")
            print(f"mlflow ui at {base}: {len(runs)} run(s) in experiment {EXPERIMENT}; {how}")
            for i, run in enumerate(runs):
                info, tags = run["info"], {t["key"]: t["value"] for t in run["data"].get("tags", [])}
                datasets = [d["dataset"]["name"] for d in run.get("inputs", {}).get("dataset_inputs", [])]
                model_id = tags.get("gptcore.model_id")
                problems = [p for p, bad in (("no dataset inputs", len(datasets) != 2),
                                             ("no logged model", not model_id)) if bad]
                if browser:
                    url = (f"{base}/#/experiments/{exp['experiment_id']}/runs/{info['run_id']}"
                           "?workflowType=machine_learning")  # the model-training layout, as the links below
                    shot = Path(args.screenshot).resolve() if i == 0 and args.screenshot else None
                    problems += render_run(url, info["run_name"], shot)
                    if shot:
                        print(f"screenshot of {info['run_name']!r}: {shot}")
                report(f"run {info['run_name']!r}: datasets {datasets}, model {model_id}", problems)

            urls = training_view_urls(base, exp["experiment_id"])
            links = training_view_urls("http://127.0.0.1:5000", exp["experiment_id"])  # `mlflow ui`'s own address
            print(f"training view, runs sorted by eval_val_loss with eval_val_loss, eval_bits_per_byte and "
                  f"best_val_loss as columns (with `mlflow ui`): {links['table']}")
            print(f"its charts, val_loss and train_loss across runs first: {links['charts']}")
            problems = training_view_problems(exp)
            if browser and not problems:
                problems = render_training_view(urls, runs)
            report("training view" + (" (rendered, fresh profile, 1280-pixel window)" if browser else " (REST)"),
                   problems)
            if browser:
                print(f"  note: a fresh profile opening the experiment as the Experiments list links it lands on "
                      f"{landing(base, exp['experiment_id'])} (MLflow 3.17 lays the page out by its sidebar "
                      "toggle, GenAI by default, not by the mlflow.experimentKind tag); the links above open "
                      "the training view")

            model, versions = registry_facts(base)
            problems = registry_problems(model, versions)
            aliases = {a["alias"]: a["version"] for a in (model or {}).get("aliases", [])}
            for number in sorted(versions, key=int):
                held = [a for a, v in aliases.items() if v == number]
                print(f"  {REGISTERED_MODEL} version {number}: eval_val_loss "
                      f"{versions[number].get('eval_val_loss', '(not scored)')}, aliases {held or 'none'}")
            if browser and not problems:
                problems = render_registry(base, model, versions)
            report(f"registered model {REGISTERED_MODEL!r}, alias {CHAMPION!r} and its version's tags"
                   + (" (rendered: Models page, model page, version page)" if browser else " (REST)"), problems)
    except RuntimeError as exc:  # BrowserError is one too
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("ok" if not failures else f"{len(failures)} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
