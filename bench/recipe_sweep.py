"""Recipe sweeps as DVC experiments, compared in MLflow.

    python bench/recipe_sweep.py queue bench/recipes.yaml [--only NAME ...] [--seeds 1337 1338 1339]
                                       [--jobs 2] [--set train.dtype=float32 ...] [--md FILE]
    python bench/recipe_sweep.py report [--only NAME ...] [--md FILE]
    python bench/recipe_sweep.py import bench/sweep_h200.jsonl --machine "1x H200, bf16"

``queue`` puts each recipe x seed in DVC's queue as its own named experiment,
``dvc exp run --queue -n <recipe>-s<seed> -S key=value ... -S train.seed=<seed>``, runs the
queue with ``dvc queue start -j <jobs>`` (each experiment in its own temporary copy of the
repository), waits for it, and prints the results table. Every run is an ordinary DVC
experiment (``make exps``, ``dvc exp show``, ``dvc exp apply <recipe>-s<seed>``) and an MLflow
run in the project's store, named after the experiment, with its params, metrics, samples and
machine. A recipe x seed already finished in MLflow is not run again, so an interrupted sweep
resumes where it stopped. Run it in the project's root, a git repository with a commit
(DVC's queue runs committed code plus the workspace's changes).

``report`` makes the table from MLflow alone: each recipe's runs (mean and spread of the
evaluate stage's whole-split val loss, bits/byte), the machine they ran on, and the
``dvc exp run`` command that reproduces them. ``--md FILE`` also writes it to FILE.

``import`` logs rows measured without DVC or MLflow (``bench/sweep_direct.py``, a lent GPU
machine) as MLflow runs, tagged with their source file and machine, so one table has them all.

The recipes file maps a name to dotted overrides of params.yaml, the keys
``dvc exp run --set-param`` takes; an optional ``base`` entry (not a recipe) is applied under
every recipe's own overrides; ``--set KEY=VALUE`` (YAML value) applies to every recipe after
its own, e.g. ``--set train.dtype=float32`` on a CPU without bf16 kernels::

    base: {train.ema_decay: 0.0}
    muon: {}
    steps2000: {train.max_steps: 2000}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NAME = re.compile(r"(?P<recipe>.+)-s(?P<seed>\d+)")  # an experiment's name: <recipe>-s<seed>
SOURCE_TAG, RECIPE_TAG, MACHINE_TAG = "gptcore.sweep_source", "gptcore.recipe", "gptcore.machine"


def load_recipes(path: Path, common: dict | None = None) -> dict[str, dict]:
    """name -> the overrides a run applies: the file's ``base``, the recipe's, then ``common``."""
    import yaml

    recipes = yaml.safe_load(Path(path).read_text()) or {}
    base = recipes.pop("base", None) or {}
    return {name: {**base, **(over or {}), **(common or {})} for name, over in recipes.items()}


def parse_sets(items: list[str]) -> dict:
    """``--set KEY=VALUE`` options as {dotted key: YAML value}."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. train.dtype=float32")
        out[key] = yaml.safe_load(value)
    return out


def with_overrides(overrides: dict, seed: int, device: str = "auto", root: Path = ROOT):
    """params.yaml in ``root`` with the overrides, the seed and the device: validated Params."""
    import yaml

    from gptcore.config import Params, load_params

    d = load_params(root / "params.yaml").to_dict()
    if yaml.safe_load((root / "params.yaml").read_text()).get("model", {}).get("vocab_size", "auto") == "auto":
        # to_dict resolved "auto" with params.yaml's tokenizer; a recipe's own (bpe 4,096 ids, say) sizes it
        d["model"]["vocab_size"] = "auto"
    for dotted, value in {**overrides, "train.seed": seed, "train.device": device}.items():
        section, _, key = dotted.partition(".")
        if section not in d or key not in d[section]:
            raise SystemExit(f"unknown param {dotted!r}; the keys are params.yaml's, e.g. train.max_steps")
        d[section][key] = value
    return Params.from_dict(d)


def set_arg(key: str, value) -> str:
    """One ``-S key=value`` argument, the value written as YAML (1e-07 must stay a float)."""
    import yaml

    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def reproduce(overrides: dict, seeds: list[int]) -> str:
    """The command that reproduces a recipe's runs: one queued experiment per seed (DVC
    expands a comma list into a grid), then the queue."""
    sets = [f"-S {set_arg(k, v)}" for k, v in overrides.items()]
    seed = ",".join(str(s) for s in seeds)
    if len(seeds) == 1:
        return " ".join(["dvc exp run", *sets, f"-S train.seed={seed}"])
    return " ".join(["dvc exp run --queue", *sets, f"-S train.seed={seed}"]) + " && dvc queue start -j 2"


# -- MLflow ---------------------------------------------------------------------------------

def _client(root: Path):
    from gptcore import store

    store.configure_env()
    from mlflow.tracking import MlflowClient

    uri = store.tracking_uri(root)
    client = MlflowClient(uri)
    return client, store.experiment(client, root, uri)


def sweep_runs(root: Path) -> list[dict]:
    """Every finished sweep run in the project's store: a queued experiment named
    <recipe>-s<seed> that got through evaluate, or an imported row."""
    client, exp_id = _client(root)
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], "attributes.status = 'FINISHED'", max_results=1000, page_token=token)
        runs += page
        token = page.token
        if not token:
            break
    out = []
    for r in runs:
        name = r.data.tags.get("dvc_exp_name") or r.info.run_name or ""
        match = NAME.fullmatch(name)
        if "eval_val_loss" not in r.data.metrics or not (match or SOURCE_TAG in r.data.tags):
            continue
        out.append({"recipe": r.data.tags.get(RECIPE_TAG) or match["recipe"],
                    "seed": int(r.data.params.get("train.seed") or match["seed"]), "name": name,
                    "source": r.data.tags.get(SOURCE_TAG, "dvc exp"),
                    "machine": r.data.tags.get(MACHINE_TAG, "not recorded"),
                    "val_loss": r.data.metrics["eval_val_loss"],
                    "bits_per_byte": r.data.metrics.get("eval_bits_per_byte"),
                    "best_step": r.data.metrics.get("best_step"), "params": dict(r.data.params),
                    "start": r.info.start_time})
    return out


def overrides_of(run: dict, root: Path) -> dict:
    """What a run changed: for an imported row, the overrides it recorded; for an experiment,
    each param that differs from params.yaml (compared as MLflow stores them, as text)."""
    params = {k: v for k, v in run["params"].items() if k != "train.seed"}
    if run["source"] != "dvc exp":
        return params
    from gptcore.config import load_params
    from gptcore.schema import flatten

    now = flatten(load_params(root / "params.yaml").to_dict())
    return {k: v for k, v in params.items() if k in now and str(now[k]) != v and k != "train.device"}


def table(runs: list[dict], root: Path, only: list[str] | None = None) -> str:
    groups: dict[tuple, list[dict]] = {}
    for run in sorted(runs, key=lambda r: r["start"]):
        if only and run["recipe"] not in only:
            continue
        key = (run["recipe"], run["source"], run["machine"], json.dumps(overrides_of(run, root), sort_keys=True))
        groups.setdefault(key, []).append(run)
    lines = ["| recipe | seeds | val loss mean | spread (max-min) | bits/byte | best step | machine | source | "
             "reproduce |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (recipe, source, machine, over), rs in groups.items():
        rs = list({r["seed"]: r for r in rs}.values())  # a seed re-run: its latest run
        v = [r["val_loss"] for r in rs]
        bpb = [r["bits_per_byte"] for r in rs if r["bits_per_byte"] is not None]
        steps = "/".join(str(int(r["best_step"])) if r["best_step"] is not None else "?" for r in rs)
        seeds = sorted(r["seed"] for r in rs)
        lines.append(f"| {recipe} | {', '.join(map(str, seeds))} | {statistics.mean(v):.4f} | {max(v) - min(v):.4f} | "
                     f"{f'{statistics.mean(bpb):.4f}' if bpb else '?'} | {steps} | {machine} | {source} | "
                     f"`{reproduce(json.loads(over), seeds)}` |")
    return "\n".join(lines)


def report(root: Path, only: list[str] | None, md: Path | None) -> None:
    runs = sweep_runs(root)
    text = table(runs, root, only)
    if len(text.splitlines()) == 2:
        raise SystemExit("no finished sweep runs in MLflow" + (f" for {only}" if only else "")
                         + "; run `python bench/recipe_sweep.py queue RECIPES` first")
    print(text)
    if md is not None:
        from gptcore.io import atomic_write_text

        atomic_write_text(md, "<!-- made by `python bench/recipe_sweep.py report` from the project's MLflow runs "
                              "(`make sweeps`); do not edit -->\n\n" + text + "\n")
        print(f"wrote {md}", file=sys.stderr)


def import_rows(root: Path, path: Path, machine: str, recipes: dict[str, dict] | None = None) -> None:
    """Each measured row of a sweep_direct .jsonl as a finished MLflow run (once: a file's
    rows already imported are skipped). Its params: the row's overrides, over its recipe's in
    ``recipes`` when it has one there (a recipes file keeps each recipe as it was measured,
    while a row written before a ``base`` existed recorded only the recipe's own keys)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    bad = [i + 1 for i, r in enumerate(rows) if not {"name", "seed", "val_loss"} <= set(r)]
    if bad:
        raise SystemExit(f"{path}: line(s) {bad} are not sweep rows (name, seed, val_loss); nothing imported")
    client, exp_id = _client(root)
    have = {(r["recipe"], r["seed"]) for r in sweep_runs(root) if r["source"] == str(path)}
    from mlflow.entities import Metric, Param

    added = 0
    for row in rows:
        if (row["name"], row["seed"]) in have:
            continue
        run = client.create_run(exp_id, run_name=f"{row['name']}-s{row['seed']}",
                                tags={SOURCE_TAG: str(path), RECIPE_TAG: row["name"], MACHINE_TAG: machine})
        now = int(time.time() * 1000)
        settings = {**(recipes or {}).get(row["name"], {}), **row.get("overrides", {}), "train.seed": row["seed"]}
        params = [Param(k, str(v)) for k, v in settings.items()]
        metrics = [Metric(f"eval_{k}", float(row[k]), now, 0) for k in ("val_loss", "bits_per_byte") if k in row]
        metrics += [Metric(k, float(row[k]), now, 0) for k in ("best_step", "steps", "wall_s", "tokens_per_s")
                    if row.get(k) is not None]
        client.log_batch(run.info.run_id, params=params, metrics=metrics)
        client.set_terminated(run.info.run_id, "FINISHED")
        added += 1
    print(f"{path}: {added} run(s) imported, {len(rows) - added} already there", file=sys.stderr)


# -- the queue ------------------------------------------------------------------------------

def _dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    # Output goes through files, not pipes: `dvc queue start` leaves a daemon worker that
    # inherits them, and a pipe it holds open would keep this call waiting for its EOF.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run(["dvc", *args], cwd=root, stdin=subprocess.DEVNULL, stdout=out, stderr=err).returncode
        out.seek(0)
        err.seek(0)
        p = subprocess.CompletedProcess(args, code, out.read(), err.read())
    if check and p.returncode != 0:
        lines = [line for line in (p.stderr or p.stdout).splitlines() if line.strip()]
        # DVC ends its errors with a support footer ("Having any troubles? ..."): name its ERROR line.
        fallback = lines[-1] if lines else f"exit {p.returncode}"
        reason = next((line for line in lines if line.startswith("ERROR")), fallback)
        raise SystemExit(f"`dvc {' '.join(args)}` failed: {reason}")
    return p


def queue_status(root: Path, names: set[str]) -> dict[str, str]:
    """Our experiments' states in `dvc queue status`: Queued, Running, Success or Failed."""
    out = {}
    for line in _dvc(root, "queue", "status").stdout.splitlines():
        cols = line.split()
        if len(cols) >= 3 and cols[1] in names:
            out[cols[1]] = cols[-1]
    return out


def run_queue(root: Path, recipes: dict[str, dict], names: list[str], seeds: list[int], jobs: int) -> list[str]:
    """Queue what MLflow lacks, run it `jobs` at a time, wait; returns the failed names."""
    for name in names:  # a bad override fails here, before anything is queued
        try:
            with_overrides(recipes[name], seeds[0], root=root)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - ConfigError or an unknown key: one line naming it
            raise SystemExit(f"recipe {name!r}: {e}") from None
    # Done: a finished run of that name with exactly these settings (the same recipe name
    # with other --set values is another experiment, and runs).
    from gptcore.schema import flatten

    done = {(r["name"], json.dumps({k: r["params"].get(k) for k in sorted(recipes[r["recipe"]])}))
            for r in sweep_runs(root) if r["source"] == "dvc exp" and r["recipe"] in recipes}

    def wanted(name: str, seed: int) -> str:
        settings = flatten(with_overrides(recipes[name], seed, root=root).to_dict())
        return json.dumps({k: str(settings[k]) for k in sorted(recipes[name])})

    todo = [(n, s) for n in names for s in seeds if (f"{n}-s{s}", wanted(n, s)) not in done]
    print(f"{len(todo)} experiment(s) to run ({len(names) * len(seeds) - len(todo)} already in MLflow), "
          f"{jobs} at a time", file=sys.stderr)
    queued = set()
    try:
        for name, seed in todo:
            exp = f"{name}-s{seed}"
            sets = [a for k, v in recipes[name].items() for a in ("-S", set_arg(k, v))]
            _dvc(root, "exp", "run", "--queue", "-n", exp, *sets, "-S", f"train.seed={seed}")
            queued.add(exp)
        if not queued:
            return []
        _dvc(root, "queue", "start", "-j", str(jobs))
        t0, shown = time.monotonic(), None
        while True:
            states = queue_status(root, queued)
            counts = {s: list(states.values()).count(s) for s in ("Queued", "Running", "Success", "Failed")}
            line = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
            if line != shown:
                print(f"[{time.monotonic() - t0:6.0f} s] {line}", file=sys.stderr, flush=True)
                shown = line
            if not counts["Queued"] and not counts["Running"]:
                break
            time.sleep(5)
    except KeyboardInterrupt:
        # Stop what this sweep started; finished experiments stay (and are skipped next time).
        _dvc(root, "queue", "remove", *[n for n, s in queue_status(root, queued).items() if s == "Queued"],
             check=False)
        _dvc(root, "queue", "kill", *[n for n, s in queue_status(root, queued).items() if s == "Running"],
             check=False)
        raise SystemExit("interrupted: the finished experiments are kept; run the same command to go on") from None
    finally:
        _dvc(root, "queue", "stop", check=False)  # the workers, once the queue is empty
    failed = sorted(n for n, s in queue_status(root, queued).items() if s == "Failed")
    for name in failed:
        log = [line for line in _dvc(root, "queue", "logs", name, check=False).stdout.splitlines() if line.strip()]
        print(f"{name} FAILED: {log[-1] if log else 'no log'} (`dvc queue logs {name}`)", file=sys.stderr)
    return failed


def project_root() -> Path:
    root = Path.cwd()
    if not (root / "dvc.yaml").exists() or not (root / ".git").exists():
        raise SystemExit(f"{root} is not a gptcore project's root (dvc.yaml and git); run the sweep from there")
    return root


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    q = sub.add_parser("queue", help="run recipes x seeds as DVC experiments, then print the table")
    q.add_argument("recipes", type=Path)
    q.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    q.add_argument("--jobs", "-j", type=int, default=2, help="experiments at a time (dvc queue start -j)")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every recipe (repeatable), e.g. train.dtype=float32")
    r = sub.add_parser("report", help="the results table from the MLflow runs")
    for p in (q, r):
        p.add_argument("--only", nargs="+", metavar="NAME")
        p.add_argument("--md", type=Path, help="also write the table to this Markdown file")
    i = sub.add_parser("import", help="log sweep_direct .jsonl rows as MLflow runs")
    i.add_argument("jsonl", type=Path, nargs="+")
    i.add_argument("--machine", required=True, help='where the rows were measured, e.g. "AMD EPYC Zen 3, float32"')
    i.add_argument("--recipes", type=Path, help="the recipes file the rows ran (their settings complete the rows')")
    args = ap.parse_args(argv)
    root = project_root()
    if args.command == "import":
        recipes = load_recipes(args.recipes) if args.recipes else None
        for path in args.jsonl:
            import_rows(root, path, args.machine, recipes)
        return
    if args.command == "report":
        return report(root, args.only, args.md)
    recipes = load_recipes(args.recipes, parse_sets(args.set))
    names = args.only or list(recipes)
    unknown = [n for n in names if n not in recipes]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; {args.recipes} has {list(recipes)}")
    failed = run_queue(root, recipes, names, args.seeds, args.jobs)
    report(root, names, args.md)
    if failed:
        raise SystemExit(f"{len(failed)} experiment(s) failed: {failed}")


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    main()
