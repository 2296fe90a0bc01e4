"""The recipe sweep without DVC or MLflow: each recipe x seed trains in its own process
through the Trainer, and each finished run is one JSON line in --out. For a machine that has
neither (a lent GPU machine runs a copy of the checkout, not a git clone, and has no DVC);
`python bench/recipe_sweep.py import OUT.jsonl --machine ...` makes the rows MLflow runs
afterwards, beside the queue's, in the same generated table. Where DVC runs, use
`python bench/recipe_sweep.py queue` instead: every run is then a DVC experiment.

    python bench/sweep_direct.py bench/recipes.yaml [--only NAME ...] [--seeds 1337 1338 1339]
                                 [--jobs 1] [--device auto] [--out sweep.jsonl]
                                 [--set train.dtype=float32 ...]

The recipes file is recipe_sweep's (a name maps to dotted overrides of params.yaml, on top of
an optional ``base``); ``--set KEY=VALUE`` applies to every recipe after its own overrides.
A run trains and then evaluates its best checkpoint on the whole val split, as the stages do.
Needs data/raw (``dvc repro download``, or a copy of the mirror); a recipe whose
``data.processed_dir`` does not exist yet (e.g. a char-level variant) is tokenized into it
first. Runs already in ``--out`` are not repeated, so an interrupted sweep keeps what it
measured. While a run trains, its validation lines go to ``<out>.logs/<recipe>-<seed>.log``.
Stopping the sweep stops its runs: Ctrl-C reaches them directly, and on Linux a run also
ends when the sweep's process dies some other way (``kill``, even ``kill -9``), so no orphan
keeps a core busy for an hour.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recipe_sweep import load_recipes, parse_sets, with_overrides  # noqa: E402 - bench/ is sys.path[0]


def die_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` (the sweep that launched it) dies (Linux).

    The kernel sends SIGTERM, the trainer's stop request, so a run ends at its next step
    boundary. Without it, killing a sweep leaves its runs training for up to an hour,
    unseen, slowing whatever runs next on the same cores."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != parent_pid:  # the sweep died before the line above took effect
        raise SystemExit("sweep_direct: the sweep that launched this run has ended")


def run_one(name: str, overrides: dict, seed: int, device: str, progress: bool = False) -> dict:
    """Train, then evaluate the best checkpoint on the whole val split (like the stages)."""
    from gptcore.checkpoint import load_checkpoint
    from gptcore.data.dataset import TokenData
    from gptcore.evaluate import evaluate_tokens
    from gptcore.training.device import resolve_device
    from gptcore.training.loop import Trainer

    params = with_overrides(overrides, seed, device)
    data = TokenData.load(ROOT / params.data.processed_dir)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        r = Trainer(params, data, Path(d) / "best", Path(d) / "last", progress=progress).train()
        dev = resolve_device(params.train.device)
        model, _, _ = load_checkpoint(Path(d) / "best", device=dev)
        ev = evaluate_tokens(model, data.val, data.tokenizer.eot_id, data.meta["val_bytes"],
                             batch_size=params.evaluate.batch_size, dtype=params.evaluate.dtype,
                             device=dev, progress=False)
    tail = [row[1] for row in r.train_log[-50:]]
    return {"name": name, "overrides": overrides, "seed": seed, "val_loss": ev["val_loss"],
            "bits_per_byte": ev["bits_per_byte"], "best_step": r.best_step, "steps": r.steps,
            "stopped_early": r.stopped_early, "train_loss_last50": statistics.mean(tail),
            "tokens": r.tokens_seen, "tokens_per_s": r.tokens_per_s,
            "wall_s": time.monotonic() - t0, "device": str(dev)}


def summarize(rows: list[dict], order: list[str]) -> str:
    lines = ["| recipe | overrides | seeds | val loss mean | spread (max-min) | bits/byte | "
             "train loss | best step | tokens |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in order:
        rs = [r for r in rows if r["name"] == name and "val_loss" in r]
        if not rs:
            continue
        v = [r["val_loss"] for r in rs]
        over = ", ".join(f"{k}={val}" for k, val in rs[0]["overrides"].items()) or "(params.yaml)"
        lines.append(
            f"| {name} | {over} | {len(rs)} | {statistics.mean(v):.3f} | {max(v) - min(v):.3f} | "
            f"{statistics.mean(r['bits_per_byte'] for r in rs):.3f} | "
            f"{statistics.mean(r['train_loss_last50'] for r in rs):.3f} | "
            f"{'/'.join(str(r['best_step']) for r in rs)} | {rs[0]['tokens']:,} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", type=Path)
    ap.add_argument("--only", nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    ap.add_argument("--out", type=Path, default=Path("sweep.jsonl"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for every recipe (repeatable), e.g. train.dtype=float32")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one run, JSON in, JSON out
    args = ap.parse_args()
    if args.one:
        die_with_parent(int(os.environ.get("GPTCORE_SWEEP_PID", os.getppid())))
        job = json.loads(args.one)
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        print(json.dumps(run_one(job["name"], job["overrides"], job["seed"], args.device, progress=True)))
        return

    recipes = load_recipes(args.recipes, parse_sets(args.set))
    names = args.only or list(recipes)
    unknown = [n for n in names if n not in recipes]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; the file has {list(recipes)}")
    from gptcore.errors import ConfigError
    for name in names:  # fail on a bad override before any training...
        try:
            params = with_overrides(recipes[name] or {}, args.seeds[0], args.device)
        except ConfigError as e:
            raise SystemExit(f"recipe {name!r}: {e}") from None
        processed = ROOT / params.data.processed_dir
        if not (processed / "meta.json").exists():  # ...and tokenize a variant's data once
            from gptcore.data.corpus import tokenize_corpus
            print(f"{name}: tokenizing {params.data.raw_dir} -> {processed} ({params.tokenizer.kind})",
                  file=sys.stderr)
            tokenize_corpus(dataclasses.replace(params.data, processed_dir=str(processed),
                                                raw_dir=str(ROOT / params.data.raw_dir)), params.tokenizer.kind)
    done = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.exists() else []
    have = {(r["name"], r["seed"]) for r in done if "val_loss" in r}
    jobs = [{"name": n, "overrides": recipes[n] or {}, "seed": s}
            for n in names for s in args.seeds if (n, s) not in have]
    # A CPU run can take an hour: each run's validation lines go to its own log (several
    # runs at once would garble one terminal; the progress bar stays off, stderr not being a
    # terminal), named here up front.
    logs = args.out.with_name(args.out.stem + ".logs")
    print(f"{len(jobs)} runs ({len(have)} already in {args.out}), {args.jobs} at a time; "
          f"progress: {logs}/<recipe>-<seed>.log", file=sys.stderr)

    def launch(job: dict) -> dict:
        cmd = [sys.executable, __file__, str(args.recipes), "--one", json.dumps(job),
               "--device", args.device, "--threads", str(args.threads)]
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{job['name']}-{job['seed']}.log"
        with log.open("w") as err:
            # The kernel ties the run to this thread, not the process; a pool worker lives
            # until the pool's last run has ended, so a finished thread never stops a run.
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                               env={**os.environ, "GPTCORE_SWEEP_PID": str(os.getpid())})
        if p.returncode != 0:
            last = [line for line in log.read_text().splitlines() if line.strip()][-1:]
            return {**job, "error": last or [f"exit {p.returncode}"], "log": str(log)}
        return json.loads(p.stdout.strip().splitlines()[-1])

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool, args.out.open("a") as out:
        for future in concurrent.futures.as_completed([pool.submit(launch, j) for j in jobs]):
            row = future.result()
            out.write(json.dumps(row) + "\n")
            out.flush()
            done.append(row)
            shown = (f"val {row['val_loss']:.4f} (best step {row['best_step']}, {row['wall_s']:.0f} s)"
                     if "val_loss" in row else f"FAILED: {row['error']}")
            print(f"{row['name']} seed {row['seed']}: {shown}", file=sys.stderr, flush=True)
    print(summarize(done, names))


if __name__ == "__main__":
    main()
