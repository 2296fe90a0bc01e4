"""A team's tracking server for the end-to-end tests: a throwaway PostgreSQL cluster (the
machine's own packages: initdb, pg_ctl) on a loopback port, and a real ``mlflow server`` on it
serving the artifacts itself (clients see ``mlflow-artifacts:``), as docs/experiments.md
"A team" runs it. Where PostgreSQL is not installed the same server runs on SQLite, and the
backend used is printed: the test is never skipped."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin() -> Path | None:
    """The directory of PostgreSQL's server programs (Debian keeps them off PATH)."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name))
    return Path(dirs[-1]) if dirs else None


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A fresh PostgreSQL cluster with a database ``mlflow``; yields its SQLAlchemy URI
    (psycopg 3, the ``team`` extra's driver) and removes the cluster afterwards. PostgreSQL
    refuses to run as root, so under root the cluster runs as the ``postgres`` account the
    Debian package creates."""
    bindir = pg_bin()
    assert bindir is not None, "PostgreSQL is not installed"
    user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
    # Not under pytest's tmp_path: its parents are private to root, which postgres can't enter.
    root = Path(tempfile.mkdtemp(prefix="gptcore-pg-"))
    data, port = root / "data", free_port()
    as_user = ["runuser", "-u", "postgres", "--"] if user else []
    if user:
        os.chown(root, user.pw_uid, user.pw_gid)

    def run(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, text=True, timeout=120)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "gptcore", "--auth=trust", "-E", "UTF8")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60",
            "-o", f"-p {port} -c listen_addresses=127.0.0.1 -k {root}", "start")
        try:
            run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "gptcore", "mlflow")
            yield f"postgresql+psycopg://gptcore@127.0.0.1:{port}/mlflow"
        finally:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@contextlib.contextmanager
def backend(tmp: Path) -> Iterator[tuple[str, str]]:
    """(backend store URI, name): PostgreSQL where installed, else SQLite, said out loud."""
    if pg_bin() is not None and (os.geteuid() != 0 or _has_user("postgres")):
        with postgres() as uri:
            print("tracking server backend: PostgreSQL", file=sys.stderr)
            yield uri, "postgresql"
    else:
        print("tracking server backend: SQLite (PostgreSQL, or its postgres account, is not installed here; "
              ".ci/run installs it where apt-get can)", file=sys.stderr)
        yield f"sqlite:///{tmp / 'server.db'}", "sqlite"


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, env: dict) -> Iterator[str]:
    """``mlflow server`` on ``backend_uri`` storing artifacts in ``artifacts`` (proxied: the
    clients never see the path); yields its URL and stops it afterwards."""
    port = free_port()
    log = open(artifacts.parent / f"mlflow-server-{port}.log", "w")  # closed in the finally below
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", backend_uri,
         "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, Path(log.name).read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer /health in 120 s"
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()
