"""What every DVC stage shares: offline-safe environment and clean error exits."""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import GptcoreError, failure
from .schema import flatten, read_yaml


def offline_env() -> None:
    """Telemetry, analytics and update checks off unless the user decided otherwise. The one
    place Python sets them (the Makefile exports the same for the tools it runs)."""
    for key, value in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "1"),
                       ("DVC_NO_ANALYTICS", "1"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(key, value)


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main``; known failures become one clear line and exit code 2."""
    offline_env()
    # SIGTERM (a scheduler, `kill`, DVC stopping a queue) ends the stage like Ctrl-C: the
    # exception unwinds through the atomic writers, which delete their temporary files,
    # so no partial output is left behind. Training installs its own handlers (resume).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except (KeyboardInterrupt, GptcoreError, FloatingPointError, OSError) as exc:
        code, line = failure(exc)
        if isinstance(exc, KeyboardInterrupt):
            line += "; outputs already written are intact"
        elif isinstance(exc, OSError):
            line += "; outputs already written are intact (every write is atomic); fix the cause and run again"
        print(line, file=sys.stderr)
        sys.exit(code)


def project_root() -> Path:
    """The DVC project's root: ``DVC_ROOT`` when DVC runs the stage, else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or os.getcwd()).resolve()


def outputs_inside(params) -> None:
    """Refuse stage outputs outside the project: DVC tracks data.raw_dir, data.processed_dir and
    train.out_dir as outputs, which must lie inside the repository (one outside passed, ran
    once, then failed inside DVC with an empty reason). Relative to where the stage runs: the
    project's root, or a queued experiment's copy of it."""
    from .errors import ConfigError

    here = Path.cwd().resolve()
    for key, value in (("data.raw_dir", params.data.raw_dir), ("data.processed_dir", params.data.processed_dir),
                       ("train.out_dir", params.train.out_dir)):
        path = (here / Path(value).expanduser()).resolve()
        if path == here or here not in path.parents:
            raise ConfigError(f"{key}={value!r} is not inside the project ({here}); DVC tracks it as a stage "
                              "output, which must be a directory in the repository; allowed: a relative path "
                              "such as data/processed")


def covered(path: str | Path, deps: list[str], root: Path | None = None) -> bool:
    """Whether a declared dep (absolute, as :func:`declared_deps` gives) is ``path`` or a
    directory above it: DVC re-runs a stage only when a dep changes, so a stage refuses
    input it reads that no dep covers."""
    target = ((root or project_root()) / path).resolve()
    return any(target == Path(d) or Path(d) in target.parents for d in deps)


def declared_deps(stage: str, params: dict, root: Path | None = None) -> list[str] | None:
    """The deps ``dvc.yaml`` declares for ``stage``, with ``${a.b}`` templates filled
    from ``params`` (flattened), as absolute paths; None where there is no dvc.yaml."""
    root = root or project_root()
    if not (root / "dvc.yaml").exists():
        return None
    spec = read_yaml(root / "dvc.yaml")
    values = flatten(params)
    deps = ((spec or {}).get("stages") or {}).get(stage, {}).get("deps") or []
    fill = lambda m: str(values.get(m.group(1).strip(), m.group(0)))  # noqa: E731
    return [str((root / re.sub(r"\$\{([^}]*)\}", fill, d)).resolve()) for d in deps]
