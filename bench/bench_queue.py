"""What DVC's queue costs a sweep: the same runs through `bench/recipe_sweep.py queue`
(each a `dvc exp run` in a temporary copy of the repository: the pipeline's train, evaluate
and sample stages, MLflow logging) and through `bench/sweep_direct.py` (the Trainer and the
whole-split evaluation in-process, rows to a file), side by side in one run, 2 at a time.

    [GPTCORE_MIRROR=../shared/mirror] python bench/bench_queue.py [--sizes tiny default] [--steps 30]
                                                                 [--seeds 1337 1338] [--out FILE.jsonl]

Two recipes (two learning rates) x the seeds, at two sizes: ``tiny`` (1 layer, d_model 32,
6 steps: almost all of a run is overhead) and ``default`` (params.yaml's model,
--steps steps: the fixed cost beside real training). Everything runs in a throwaway clone
of HEAD with its own DVC cache and MLflow store, tokenized once before timing starts, one
torch thread per run, so the workspace and its store are untouched. Prints one line per
size and a Markdown table; --out appends the rows as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from machine import describe, headline  # noqa: E402 - bench/ is on sys.path

RATES = {"lr_a": 0.0015, "lr_b": 0.002}  # two recipes
TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "train.batch_size=4",
        "train.max_steps=6", "train.warmup_steps=2", "train.eval_interval=3", "train.eval_batches=2",
        "train.checkpoint_interval=3", "train.patience=0", "sample.max_new_tokens=12"]


def _clone(work: Path, env: dict) -> Path:
    clone = work / "project"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    # Tokenized once, before any clock starts: both arms then read the same data/processed
    # (the queue's copies get it from the DVC cache, its params being the same at both sizes).
    subprocess.run(["dvc", "repro", "-q", "tokenize"], cwd=clone, env=env, check=True)
    return clone


def _timed(args: list[str], cwd: Path, env: dict) -> float:
    t0 = time.monotonic()
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed:\n{p.stderr[-2000:]}")
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", choices=["tiny", "default"], default=["tiny", "default"])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run at the default size")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_TRACKING"))}
    env.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    machine = headline(describe("cpu"))
    print(machine, file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gptcore-queue-bench-") as work:
        clone = _clone(Path(work), env)
        seeds = [str(s) for s in args.seeds]
        n = 2 * len(seeds)
        for size in args.sizes:
            sets = [*(TINY if size == "tiny" else [f"train.max_steps={args.steps}"]), "train.threads=1"]
            set_args = [a for s in sets for a in ("--set", s)]
            recipes = Path(work) / f"recipes-{size}.yaml"  # names of its own: another size is another experiment
            recipes.write_text("".join(f"{name}_{size}: {{train.learning_rate: {lr}}}\n" for name, lr in RATES.items()))
            direct = _timed([sys.executable, str(clone / "bench" / "sweep_direct.py"), str(recipes), "--seeds", *seeds,
                             "--jobs", "2", "--threads", "1", "--device", "cpu",
                             "--out", str(Path(work) / f"direct-{size}.jsonl"), *set_args], clone, env)
            queue = _timed([sys.executable, str(clone / "bench" / "recipe_sweep.py"), "queue", str(recipes),
                            "--seeds", *seeds, "-j", "2", *set_args], clone, env)
            row = {"size": size, "runs": n, "jobs": 2, "steps": 6 if size == "tiny" else args.steps,
                   "direct_s": round(direct, 1), "queue_s": round(queue, 1),
                   "overhead_per_run_s": round((queue - direct) / n * 2, 1), "machine": machine,
                   "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True).stdout.strip()}
            rows.append(row)
            print(f"{size}: {n} runs, 2 at a time: direct {direct:.0f} s, queue {queue:.0f} s", file=sys.stderr)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
        shutil.rmtree(clone / ".dvc" / "tmp", ignore_errors=True)
    print("| size | runs (2 at a time) | direct: wall | queue: wall | queue's extra per run |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['size']} ({r['steps']} steps) | {r['runs']} | {r['direct_s']:.0f} s | {r['queue_s']:.0f} s | "
              f"{r['overhead_per_run_s']:+.1f} s |")
    print(f"\n{machine}")


if __name__ == "__main__":
    main()
