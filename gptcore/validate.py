"""Pipeline validation for a pull request: the whole pipeline at a short setting, compared
with the base branch's committed results for the same setting.

    make validate [BASE=main] [VALIDATE_SET="-S train.max_steps=200"] [TOLERANCE=0.05]
    python -m gptcore.validate [--base REV] [-S key=value ...] [--tolerance BITS]

1. The working tree's tracked files (committed or not) are copied to a temporary git
   repository and the real pipeline runs there: ``dvc exp run -S ...`` (MLflow logs into a
   throwaway store; the workspace's models/ and metrics/ are untouched).
2. Its metric files land in ``validation/`` (eval.json, train.json and the loss logs): the
   files a pull request commits, so the base branch's ``validation/`` is the baseline.
3. ``validation.md`` holds ``dvc params diff --md BASE``, ``dvc metrics diff --md BASE`` on
   validation/'s metrics and ``validation/loss.png`` (this run over the baseline's curves).
4. The exit code is 1 when bits/byte is worse than the baseline's by more than the tolerance,
   2 on an error (no baseline at BASE, a failing stage), 0 otherwise.

The same code on the same CPU class reproduces the baseline bit for bit (an empty metrics
diff); the tolerance covers other classes (float32 on AVX2-only CPUs against bfloat16 on
AVX-512/AMX ones: docs/pipeline.md "Validating a pull request").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import GptcoreError, failure
from .io import atomic_write_bytes, atomic_write_text

OUT_DIR = "validation"
REPORT = "validation.md"
SETTING = "setting.json"
FILES = ("eval.json", "train.json", "train_log.csv", "val_log.csv")
DEFAULT_SET = ["train.max_steps=200"]
DEFAULT_TOLERANCE = 0.05  # bits/byte
# Timings differ on every run: kept out of validation/, whose metrics must reproduce exactly.
TIMING_KEYS = ("tokens_per_s", "bytes_per_s", "train_time_s", "wall_time_s")


class ValidationError(GptcoreError):
    pass


def _run(args: list[str], cwd: Path, env: dict | None = None, what: str = "") -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()][-3:]
        raise ValidationError(f"{what or ' '.join(args[:3])} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return proc.stdout


def _copy_tracked(root: Path, dst: Path) -> None:
    """The working tree's tracked files as they are now (a developer's uncommitted edits
    included), plus data/raw when present so nothing is downloaded again."""
    names = _run(["git", "ls-files", "-z"], root, what="git ls-files").split("\0")
    for name in filter(None, names):
        src = root / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    if (root / "data" / "raw").is_dir():
        shutil.copytree(root / "data" / "raw", dst / "data" / "raw", dirs_exist_ok=True)


def run_short_pipeline(root: Path, sets: list[str], progress: bool = True) -> dict[str, bytes]:
    """The pipeline at ``sets`` in a temporary copy of ``root``; its metric files' bytes."""
    with tempfile.TemporaryDirectory(prefix="gptcore-validate-") as tmp:
        copy = Path(tmp) / "project"
        copy.mkdir()
        _copy_tracked(root, copy)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_TRACKING"))}
        env.update(MLFLOW_TRACKING_URI=f"sqlite:///{Path(tmp) / 'mlflow.db'}", DVC_NO_ANALYTICS="1",
                   MLFLOW_DISABLE_TELEMETRY="true", GIT_AUTHOR_NAME="validate", GIT_AUTHOR_EMAIL="validate@localhost",
                   GIT_COMMITTER_NAME="validate", GIT_COMMITTER_EMAIL="validate@localhost")
        for args in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "validate"]):
            _run(args, copy, env)
        cmd = ["dvc", "exp", "run", "-n", "validate", *(a for s in sets for a in ("-S", s))]
        if progress:
            print(f"validate: {' '.join(cmd)} (in a temporary copy)", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, cwd=copy, env=env, stdout=sys.stderr if progress else subprocess.DEVNULL,
                              stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise ValidationError(f"the pipeline failed at {' '.join(sets)} (exit {proc.returncode}); its output "
                                  "is above")
        files = {name: (copy / "metrics" / name).read_bytes() for name in FILES}
        train = {k: v for k, v in json.loads(files["train.json"]).items() if k not in TIMING_KEYS}
        files["train.json"] = (json.dumps(train, indent=2) + "\n").encode()
        return files


def _rows(table: str) -> str:
    """A Markdown table DVC printed, or "" when it has no rows (DVC prints the header alone)."""
    lines = [line for line in table.strip().splitlines() if line.strip()]
    return "\n".join(lines) if len(lines) > 2 else ""


def _baseline(root: Path, base: str, name: str) -> bytes | None:
    proc = subprocess.run(["git", "show", f"{base}:{OUT_DIR}/{name}"], cwd=root, capture_output=True)
    return proc.stdout if proc.returncode == 0 else None


def _write(root: Path, sets: list[str], files: dict[str, bytes]) -> Path:
    """validation/: the metric files and setting.json (the setting and the machine)."""
    out = root / OUT_DIR
    out.mkdir(exist_ok=True)
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    from .training.device import describe_machine  # torch: imported only once a run is done

    atomic_write_text(out / SETTING, json.dumps({"set": sets, "machine": describe_machine()}, indent=2) + "\n")
    return out


def write_baseline(root: Path, sets: list[str], progress: bool = True) -> str:
    """Run and write validation/ without comparing: the first baseline, to commit."""
    files = run_short_pipeline(root, sets, progress)
    _write(root, sets, files)
    from .plots import plot_runs
    plot_runs([("baseline", root / OUT_DIR)], root / OUT_DIR / "loss.png", smooth=20)
    bpb = json.loads(files["eval.json"])["bits_per_byte"]
    return f"baseline written to {OUT_DIR}/ (bits/byte {bpb:.4f}); commit it: git add {OUT_DIR} && git commit"


def validate(root: Path, base: str, sets: list[str], tolerance: float, progress: bool = True) -> tuple[int, str]:
    """Run, write validation/ and validation.md; (exit code, one-line verdict)."""
    known = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{base}^{{commit}}"], cwd=root,
                           capture_output=True)
    if known.returncode != 0:
        raise ValidationError(f"base {base!r}: no such git revision here (fetch it first: git fetch origin {base})")
    base_eval = _baseline(root, base, "eval.json")
    if base_eval is None:
        raise ValidationError(f"base {base!r} has no {OUT_DIR}/eval.json to compare with; run `make validate` on "
                              f"that branch (--init writes the first one) and commit {OUT_DIR}/ (docs/pipeline.md)")
    base_setting = json.loads(_baseline(root, base, SETTING) or b"{}")
    if base_setting.get("set", sets) != sets:
        raise ValidationError(f"{base}'s baseline was made at {' '.join(base_setting['set'])}, not {' '.join(sets)}; "
                              f"compare like with like: VALIDATE_SET=\"{' '.join(base_setting['set'])}\"")
    files = run_short_pipeline(root, sets, progress)
    out = _write(root, sets, files)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("this branch", out)]
        base_logs = {n: _baseline(root, base, n) for n in ("train_log.csv", "val_log.csv")}
        if all(base_logs.values()):
            for n, data in base_logs.items():
                (Path(tmp) / n).write_bytes(data)
            runs.insert(0, (f"baseline ({base})", Path(tmp)))
        from .plots import plot_runs
        plot_runs(runs, out / "loss.png", smooth=20)

    from .training.device import describe_machine

    new_bpb = json.loads(files["eval.json"])["bits_per_byte"]
    old_bpb = json.loads(base_eval)["bits_per_byte"]
    worse = new_bpb - old_bpb
    ok = worse <= tolerance
    verdict = (f"bits/byte {new_bpb:.4f} against {base}'s {old_bpb:.4f} ({worse:+.4f}; tolerance {tolerance}): "
               + ("pass" if ok else "FAIL, worse than the tolerance allows"))
    params = _rows(_run(["dvc", "params", "diff", "--md", base], root, what="dvc params diff"))
    metrics = _rows(_run(["dvc", "metrics", "diff", "--md", base, "--targets", f"{OUT_DIR}/eval.json",
                          f"{OUT_DIR}/train.json"], root, what="dvc metrics diff"))
    report = "\n".join([
        "# Pipeline validation", "",
        f"**{verdict}**", "",
        f"Setting: `{' '.join('-S ' + s for s in sets)}` · base: `{base}`", "",
        f"This run: {describe_machine()}. The baseline's: {base_setting.get('machine', 'not recorded')}.", "",
        "## Params (against the base)", "", params or "No params changed.", "",
        "## Metrics (validation/, against the base's)", "",
        metrics or "No metric changed: this run reproduces the baseline exactly.", "",
        "## Loss", "", f"![loss]({OUT_DIR}/loss.png)", ""])
    atomic_write_text(root / REPORT, report)
    return (0 if ok else 1), verdict


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="main", help="the git revision whose validation/ is the baseline (default: main)")
    ap.add_argument("-S", "--set-param", dest="sets", action="append", metavar="KEY=VALUE",
                    help=f"a param for the short run, as dvc exp run takes it (default: {' '.join(DEFAULT_SET)})")
    ap.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                    help=f"bits/byte worse than the baseline that still passes (default: {DEFAULT_TOLERANCE})")
    ap.add_argument("--init", action="store_true", help=f"write the first baseline into {OUT_DIR}/ (no comparison)")
    args = ap.parse_args(argv)
    sets = args.sets or DEFAULT_SET
    try:
        if args.init:
            print(write_baseline(Path.cwd(), sets))
            return
        code, verdict = validate(Path.cwd(), args.base, sets, args.tolerance)
    except (GptcoreError, OSError) as exc:
        print(failure(exc)[1], file=sys.stderr)
        sys.exit(2)
    print(f"{verdict}\nreport: {REPORT}")
    sys.exit(code)


if __name__ == "__main__":
    main()
