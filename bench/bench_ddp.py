"""Data-parallel scaling on the CPU: the Trainer's loop on the default model (params.yaml),
one process with 2 threads beside `torchrun --nproc-per-node 2` with 1 thread each
(DistributedDataParallel over gloo), at the same global batch, measured in one run.

    .venv/bin/python bench/bench_ddp.py [--batch-size 8] [--steps 8] [--warmup 2] [--repeats 1]
                                        [--dtype float32|bfloat16] [--json]

A report, not a target. Each row is the real training loop (gptcore.training.loop.Trainer: real
batches from the memory-mapped token files, params.yaml's model and optimizer, on the
CPU); tokens/s is the global batch x block_size over the median step time of the timed
steps after ``--warmup`` (rank 0's step, which includes the gradient all-reduce).
``--batch-size`` is the global batch: the 2-process row gives each rank half.

``--dtype`` is float32 by default, not params.yaml's bfloat16: on a CPU without AVX-512
BF16 or AMX (the 2-core AVX2 EPYC this was written on) torch runs bfloat16 matmuls in a
reference kernel, measured 27x slower than float32 (2048x128 @ 128x512, one thread), so
a bfloat16 row there takes most of a minute per step and measures that kernel, not the scaling.
(torch's Muon, the default optimizer for the blocks' matrices, orthogonalises in bfloat16
whatever ``--dtype`` says; each rank runs the whole optimizer step, so that part does not
shrink with more processes.)

Data: the project's data/processed when `dvc repro` has made it for params.yaml's
tokenizer; otherwise Tiny Shakespeare from ``GPTCORE_MIRROR`` (default ../shared/mirror),
tokenized into a temporary directory. With ``--repeats`` the rows take turns (a busy
moment on a shared machine hits both); the table shows each row's median run. The
defaults are modest: a default-model step takes seconds on a 2-core CPU, so the whole
report takes a few minutes there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = {"1 process x 2 threads": (1, 2), "2 processes x 1 thread": (2, 1)}  # (processes, threads each)


def worker(data: Path, out: Path, batch_size: int, threads: int, steps: int, warmup: int, dtype: str) -> None:
    """One row's training, in this process (under torchrun: in each rank); rank 0 prints its JSON."""
    from gptcore.config import Params, load_params
    from gptcore.data.dataset import TokenData
    from gptcore.training.loop import Trainer

    base = load_params(ROOT / "params.yaml").to_dict()
    total = warmup + steps
    # One evaluation (one batch) at the end and no resume checkpoint: only training steps are timed.
    train = {**base["train"], "device": "cpu", "dtype": dtype, "batch_size": batch_size, "threads": threads,
             "max_steps": total, "eval_interval": total, "eval_batches": 1, "checkpoint_interval": total,
             "patience": 0}
    params = Params.from_dict({**base, "train": train})
    trainer = Trainer(params, TokenData.load(data), best_dir=out / "best", resume_dir=out / "last",
                      progress=False)
    result = trainer.train()
    if not trainer.is_main:
        return
    timed = [row[3] for row in result.train_log[warmup:]]  # [step, loss, lr, tokens/s]; tokens/s is global
    print(json.dumps({"tokens_per_s": statistics.median(timed), "timed_steps": len(timed),
                      "world_size": trainer.dist.world_size, "threads": threads,
                      "batch_per_process": batch_size, "dtype": trainer.dtype,
                      "block_size": params.model.block_size, "parameters": result.num_parameters}))


def data_dir(tmp: Path) -> tuple[Path, str]:
    """The token files to train on, and where they came from."""
    from gptcore.config import DataConfig, load_params
    from gptcore.data.corpus import tokenize_corpus
    from gptcore.data.fetch import fetch_sources
    from gptcore.data.sources import SOURCES

    params = load_params(ROOT / "params.yaml")
    processed = ROOT / params.data.processed_dir
    try:
        if json.loads((processed / "meta.json").read_text())["tokenizer"] == params.tokenizer.kind:
            return processed, str(processed.relative_to(ROOT))
    except (OSError, ValueError, KeyError):
        pass
    mirror = Path(os.environ.get("GPTCORE_MIRROR") or ROOT.parent / "shared" / "mirror")
    raw = tmp / "raw"
    fetch_sources(raw, SOURCES, mirror=mirror)  # verified copies: the corpus and GPT-2's BPE files
    # The default data.sources (Tiny Shakespeare's url:), read from raw_dir as the download stage leaves it.
    tokenize_corpus(DataConfig(raw_dir=str(raw), processed_dir=str(tmp / "processed")), params.tokenizer.kind)
    return tmp / "processed", f"Tiny Shakespeare from {mirror}, tokenized ({params.tokenizer.kind})"


def run_row(name: str, data: Path, tmp: Path, batch_size: int, steps: int, warmup: int, dtype: str) -> dict:
    processes, threads = ROWS[name]
    script = [str(Path(__file__).resolve()), "--worker", str(data), str(tmp / f"out-{processes}"), "--batch-size",
              str(batch_size // processes), "--threads", str(threads), "--steps", str(steps),
              "--warmup", str(warmup), "--dtype", dtype]
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node",
               str(processes), *script]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MLFLOW_DISABLE_TELEMETRY": "true",
           "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        sys.exit(f"row {name!r} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=8, help="global batch (even; default %(default)s)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per row, taking turns (default %(default)s)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="training autocast dtype (default %(default)s: without AVX-512 BF16 or AMX, "
                         "bfloat16 matmuls run in a reference kernel ~27x slower)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--worker", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)  # internal
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)  # internal: the worker's
    args = ap.parse_args(argv)
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]), args.batch_size, args.threads, args.steps, args.warmup,
               args.dtype)
        return 0
    if args.batch_size % 2:
        ap.error("--batch-size must be even: the 2-process row gives each rank half")

    from machine import describe, headline

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, source = data_dir(tmp)
        runs: dict[str, list[dict]] = {name: [] for name in ROWS}
        for _ in range(args.repeats):
            for name in ROWS:
                runs[name].append(run_row(name, data, tmp, args.batch_size, args.steps, args.warmup, args.dtype))
    rows = {}
    for name, results in runs.items():
        results.sort(key=lambda r: r["tokens_per_s"])
        rows[name] = {**results[len(results) // 2], "all_tokens_per_s": [round(r["tokens_per_s"]) for r in results]}
    base = rows["1 process x 2 threads"]["tokens_per_s"]
    for r in rows.values():
        r["ratio_vs_1x2"] = r["tokens_per_s"] / base
    info = describe()
    first = next(iter(rows.values()))
    if args.json:
        print(json.dumps({"benchmark": "ddp_scaling", "global_batch": args.batch_size,
                          "block_size": first["block_size"], "parameters": first["parameters"],
                          "dtype": first["dtype"], "steps": args.steps, "warmup": args.warmup,
                          "data": source, "machine": info, "rows": rows}, indent=2))
        return 0
    print(f"Trainer loop, default model ({first['parameters']:,} parameters, {first['dtype']}), global batch "
          f"{args.batch_size} x {first['block_size']} tokens, median of {args.steps} steps after {args.warmup}")
    print(f"data: {source}")
    print(headline({**info, "threads": "1x2 vs 2x1"}))
    print(f"{'':24s} {'tokens/s':>9s} {'vs 1x2':>7s} {'batch/proc':>10s}  all runs (tokens/s)")
    for name, r in rows.items():
        print(f"{name:24s} {r['tokens_per_s']:9,.0f} {r['ratio_vs_1x2']:6.2f}x {r['batch_per_process']:10d}  "
              f"{', '.join(f'{t:,}' for t in r['all_tokens_per_s'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
