"""Step cost of a recipe against another: the trainer's own training step, side by side.

    python bench/bench_recipe_cost.py [--base muon] [--recipe rope_ls0.02_ema0.995_mean]
                                      [--dtype bfloat16] [--steps 24] [--rounds 4]

Both recipes come from bench/recipes.yaml (the base entry included), on real data
(data/processed: ``dvc repro tokenize``). Each builds the real ``Trainer`` and times its
``_train_step`` (forward, backward, clip, optimizer, weight-average update: everything a
training step does, no evaluation). The two alternate in rounds, so drift in the machine's
speed falls on both; the result is each one's median step time and the difference. Run it
on an idle machine: the difference is what to add per step to a measured ``make repro``.
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
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="muon")
    ap.add_argument("--recipe", default="rope_ls0.02_ema0.995_mean_relu2")  # params.yaml
    ap.add_argument("--dtype", default=None, help="train.dtype for both (default: params.yaml's)")
    ap.add_argument("--steps", type=int, default=24, help="timed steps per recipe per round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch
    from recipe_sweep import load_recipes, with_overrides

    from gptcore.data.dataset import TokenData
    from gptcore.training.loop import Trainer

    common = {"train.dtype": args.dtype} if args.dtype else {}
    recipes = load_recipes(ROOT / "bench" / "recipes.yaml", common)
    names = [args.base, args.recipe]
    trainers, times = {}, {name: [] for name in names}
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            params = with_overrides(recipes[name], seed=1337, device="cpu")
            data = TokenData.load(ROOT / params.data.processed_dir)
            trainers[name] = t = Trainer(params, data, Path(d) / name / "best", Path(d) / name / "last",
                                         progress=False)
            for _ in range(3):  # warm-up: allocator, oneDNN primitives
                t._train_step(params.train.learning_rate)
        for _ in range(args.rounds):
            for name in names:
                t = trainers[name]
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    t._train_step(t.cfg.learning_rate)
                    times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    out = {"cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
           "dtype": {n: trainers[n].dtype for n in names}, "median_step_s": med,
           "extra_ms_per_step": 1000 * (med[args.recipe] - med[args.base]),
           "ratio": med[args.recipe] / med[args.base], "steps_each": len(times[args.base])}
    if args.json:
        print(json.dumps(out))
        return
    for name in names:
        print(f"{name:24s} {med[name] * 1000:8.1f} ms/step ({trainers[name].dtype}, median of {len(times[name])})")
    print(f"{args.recipe} - {args.base}: {out['extra_ms_per_step']:+.1f} ms/step ({out['ratio']:.3f}x); "
          f"{out['cpu']}, {out['threads']} threads")


if __name__ == "__main__":
    main()
