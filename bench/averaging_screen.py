"""Averaging screen: which weight average of the default recipe's trajectory generalises
best (issue #21), measured on the whole validation split.

    python bench/averaging_screen.py --seed 1337 [--threads 1] [--from-step 700] [--schemes NAME ...]
                                     [--out bench/averaging_cpu_zen3_fp32.jsonl]
                                     [--set train.dtype=float32 ...]
    python bench/averaging_screen.py --summarize bench/averaging_cpu_zen3_fp32.jsonl

The committed table (bench/averaging_cpu_zen3_fp32.jsonl, at 41a8a3c) was screened when
the trainer's own average was ``ema_decay 0.99, ema_warmup tf`` and the MLPs were GELU,
with the schemes of that time; to screen them again: ``--set train.ema_decay=0.99 --set
train.ema_warmup=tf --set model.mlp_activation=gelu --schemes ema0.98 ema0.995_cum
ema0.998_cum swa500 swa700``.

One training run per seed (params.yaml's recipe, as ``make repro`` trains it) carries
several weight averages side by side. Averaging never feeds back into training, so every
scheme averages the very same trajectory: the differences between schemes are paired,
free of the ±0.035 between-seed noise a recipe sweep has to average away. The trainer's own
average (``train.ema_decay``, ``train.ema_warmup``) is the ``default`` row, so each run
also reproduces what the pipeline publishes for its seed; every row records those two
settings, and ``--summarize`` refuses a file whose ``default`` rows disagree on them.

At every evaluation from ``--from-step`` on, each average is swapped into the model and
measured on the trainer's 10 fixed validation batches, the estimate that picks the best
step. After training, each scheme's pick is measured on the whole split, as the evaluate
stage measures the published checkpoint. (A whole-split pass costs about twice an
estimate: measuring every step on it would add half an hour per seed on 2 CPU cores.)

Schemes (``n`` = optimizer updates so far; the EMA update is ``avg += (1 - d) (w - avg)``):

- ``ema<d>``: decay ``min(d, (1 + n) / (10 + n))``, the trainer's ``train.ema_warmup: tf``;
- ``ema<d>_cum``: decay ``min(d, n / (1 + n))``, ``train.ema_warmup: mean``: a plain
  running mean until the cap binds (at n = d / (1 - d)), then an EMA of window about
  1 / (1 - d);
- ``swa<s>``: the uniform mean of the weights after steps s, s+1, ... (tail averaging).

Each measurement is appended to ``--out`` as one JSON line as soon as it is taken.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ema0.99 is the default before 2026-12-02; ema0.995_cum is today's (the `default` row).
SCHEMES = ["ema0.99", "ema0.98", "ema0.998_cum", "swa500", "swa700"]


def rule(name: str):
    """The lerp weight (1 - decay) of update ``n``, or None before a tail average starts."""
    if name.startswith("swa"):
        start = int(name[3:])
        return lambda n: None if n < start else 1.0 / (n - start + 1)
    d, _, warm = name[3:].partition("_")
    d = float(d)
    if not name.startswith("ema") or warm not in ("", "cum") or not 0 < d < 1:
        raise ValueError(name)
    from gptcore.training.averaging import warmed_decay

    warmup = "mean" if warm == "cum" else "tf"  # names from before train.ema_warmup existed
    return lambda n: 1.0 - warmed_decay(d, warmup, n)


def run(params, schemes: list[str], from_step: int, out: Path, overrides: dict) -> None:
    import torch

    from gptcore.data.dataset import TokenData
    from gptcore.evaluate import evaluate_tokens
    from gptcore.training.averaging import WeightAverage
    from gptcore.training.loop import Trainer

    seed = params.train.seed

    class Scheme(WeightAverage):
        def __init__(self, model, name):
            super().__init__(model, decay=0.0)
            self.weight = rule(name)

        @torch.no_grad()
        def step(self, n: int) -> None:
            w = self.weight(n)
            if w is not None:
                torch._foreach_lerp_(self.average, [p.detach() for p in self.params], w)

    class ScreenTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.schemes = {name: Scheme(self.model, name) for name in schemes}
            self.best: dict[str, tuple] = {}  # scheme -> (estimate, step, averaged weights)

        def _train_step(self, lr):
            loss = super()._train_step(lr)
            for scheme in self.schemes.values():
                scheme.step(self.state.step + 1)  # the loop counts the step after this returns
            return loss

        def _evaluate(self) -> bool:
            stop = super()._evaluate()
            if self.state.step >= from_step:
                for name, avg in {"default": self.average, **self.schemes}.items():
                    with avg.applied():
                        est = self.estimate_val_loss()
                    if est < self.best.get(name, (float("inf"),))[0]:  # the first best, as the trainer
                        self.best[name] = (est, self.state.step, [a.clone() for a in avg.average])
                    record({"scheme": name, "step": self.state.step, "estimate": est})
                    print(f"seed {seed} step {self.state.step} {name}: estimate {est:.4f}",
                          file=sys.stderr, flush=True)
            return stop

        def publish(self) -> None:
            """Each scheme's best-estimate average, measured on the whole split."""
            for name, (est, step, weights) in self.best.items():
                avg = self.average if name == "default" else self.schemes[name]
                avg.average = weights
                with avg.applied():
                    ev = evaluate_tokens(self.model, self.data.val, self.data.tokenizer.eot_id,
                                         self.data.meta["val_bytes"], batch_size=params.evaluate.batch_size,
                                         dtype=params.evaluate.dtype, device=self.device, progress=False)
                record({"scheme": name, "step": step, "estimate": est, "picked": True,
                        "val_loss": ev["val_loss"], "bits_per_byte": ev["bits_per_byte"]})
                print(f"seed {seed} {name}: best step {step}, whole split {ev['val_loss']:.4f}",
                      file=sys.stderr, flush=True)

    def record(row: dict) -> None:
        row = {"seed": seed, **row, "overrides": overrides, "threads": torch.get_num_threads(),
               "ema_decay": params.train.ema_decay, "ema_warmup": params.train.ema_warmup}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    if params.train.ema_decay <= 0:
        raise SystemExit("train.ema_decay is 0: the default row is the trainer's own average")
    data = TokenData.load(ROOT / params.data.processed_dir)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        # progress: the trainer's validation lines (its bar stays off where stderr is no terminal)
        trainer = ScreenTrainer(params, data, Path(tmp) / "best", Path(tmp) / "last", progress=True)
        trainer.train()
        trainer.publish()
    print(f"seed {seed}: {time.monotonic() - t0:.0f} s", file=sys.stderr)


def summarize(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # Rows from before the rows said so were screened against ema_decay 0.99, warm-up tf.
    baselines = {(r.get("ema_decay", 0.99), r.get("ema_warmup", "tf")) for r in rows if r["scheme"] == "default"}
    if len(baselines) > 1:
        raise SystemExit(f"{path}: its default rows average differently ({sorted(baselines)}): "
                         "the pairs would mix baselines; keep one baseline per file")
    seeds = sorted({r["seed"] for r in rows})
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    picked: dict[str, dict[int, dict]] = {}
    for name in schemes:
        for seed in seeds:
            rs = [r for r in rows if r["scheme"] == name and r["seed"] == seed and r.get("picked")]
            if rs:
                picked.setdefault(name, {})[seed] = rs[-1]
    base = picked.get("default", {})
    lines = ["| scheme | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | vs default (paired) | best steps |",
             "| --- | " + " | ".join("---" for _ in seeds) + " | --- | --- | --- |"]
    for name, by_seed in picked.items():
        cells = [f"{by_seed[s]['val_loss']:.4f}" if s in by_seed else "" for s in seeds]
        common = [s for s in by_seed if s in base]
        delta = (statistics.mean(by_seed[s]["val_loss"] - base[s]["val_loss"] for s in common)
                 if common else float("nan"))
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {statistics.mean(r['val_loss'] for r in by_seed.values()):.4f} | {delta:+.4f} | "
                     + "/".join(str(by_seed[s]["step"]) for s in seeds if s in by_seed) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--schemes", nargs="+", default=SCHEMES, metavar="NAME",
                    help=f"averages beside the trainer's own (default: {' '.join(SCHEMES)})")
    ap.add_argument("--from-step", type=int, default=700, help="measure the averages from this step on")
    ap.add_argument("--out", type=Path, default=Path("averaging.jsonl"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a params override (repeatable), e.g. train.dtype=float32")
    ap.add_argument("--summarize", type=Path, metavar="JSONL", help="print the table of a finished screen")
    args = ap.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
        return
    if args.seed is None:
        raise SystemExit("--seed is required (or --summarize FILE)")
    for name in args.schemes:
        try:
            rule(name)
        except ValueError:
            raise SystemExit(f"--schemes: {name!r} is not ema<decay>, ema<decay>_cum or swa<step>") from None
    from recipe_sweep import parse_sets, with_overrides  # bench/ is this script's sys.path[0]

    overrides = parse_sets(args.set)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    # patience 0: every average is measured at every evaluation, however the trainer's own fares
    params = with_overrides({**overrides, "train.patience": 0}, args.seed, "auto")
    run(params, args.schemes, args.from_step, args.out, overrides)


if __name__ == "__main__":
    main()
