"""Does `mlflow ui` show each run with its name, dataset and model? A check you can run
after `make repro` (and `dvc exp run`s); `make ui-check` runs it.

    python tests/ui_check.py [--store mlflow.db] [--screenshot docs/mlflow_run.png]

Starts `mlflow ui` on a free localhost port, reads the runs through its REST API and
checks each has a readable name, two dataset inputs and a logged model. With headless
Chromium installed (Debian: `apt-get install chromium`) it also renders each run's page
and checks the name, the dataset and the model appear in the page itself, and saves a
screenshot of the newest run's page. Without Chromium it says so and checks the REST API
only (the CI test `tests/test_pipeline.py` does the same, on a tiny pipeline).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _chromium(browser: str, url: str, *args: str) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--virtual-time-budget=20000", "--window-size=1500,1100", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="mlflow.db")
    ap.add_argument("--screenshot", default="docs/mlflow_run.png")
    args = ap.parse_args()
    store = Path(args.store).resolve()
    if not store.exists():
        print(f"error: {store}: no MLflow store; run `make repro` first", file=sys.stderr)
        return 2
    failures = []
    try:
        with mlflow_ui(store) as base:
            exp = api(base, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=gptcore")["experiment"]
            runs = api(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                                              "order_by": ["attributes.start_time DESC"]})["runs"]
            browser = _browser()
            print(f"mlflow ui at {base}: {len(runs)} run(s) in experiment gptcore"
                  + ("" if browser else "; Chromium not found: checking through the REST API only"))
            for i, run in enumerate(runs):
                info, tags = run["info"], {t["key"]: t["value"] for t in run["data"].get("tags", [])}
                datasets = [d["dataset"]["name"] for d in run.get("inputs", {}).get("dataset_inputs", [])]
                model_id = tags.get("gptcore.model_id")
                problems = [p for p, bad in (("no dataset inputs", len(datasets) != 2),
                                             ("no logged model", not model_id)) if bad]
                if browser:
                    url = f"{base}/#/experiments/{exp['experiment_id']}/runs/{info['run_id']}"
                    dom = _chromium(browser, url, "--dump-dom")
                    for what, text in (("run name", info["run_name"]), ("dataset", "train split"),
                                       ("logged model", "gptcore-best")):
                        if text not in dom:
                            problems.append(f"{what} {text!r} not on the rendered page")
                    if i == 0:
                        shot = Path(args.screenshot).resolve()
                        shot.parent.mkdir(parents=True, exist_ok=True)
                        _chromium(browser, url, f"--screenshot={shot}")
                        print(f"screenshot of {info['run_name']!r}: {shot}")
                print(f"  {info['run_name']!r}: datasets {datasets}, model {model_id}: "
                      + ("ok" if not problems else "; ".join(problems)))
                failures += problems
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
