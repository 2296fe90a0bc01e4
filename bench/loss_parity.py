"""Does the fast training path learn like exact fp32? Train the default recipe for the
first N steps on the real data with (a) the default path (bf16 autocast + the fused
LM-head loss) for several seeds and (b) fp32 (exact loss) for one seed, and compare
the mean training loss over the last 50 steps and the validation loss at step N.

    python bench/loss_parity.py [--steps 300] [--seeds 1337 1338 1339] [--json]

Needs data/processed (run `dvc repro tokenize` first). The fp32 run takes a few
minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptcore.config import load_params  # noqa: E402
from gptcore.data.dataset import TokenData  # noqa: E402
from gptcore.training.loop import Trainer  # noqa: E402


def run(steps: int, seed: int, dtype: str, data: TokenData) -> dict:
    p = load_params(ROOT / "params.yaml")
    train = dataclasses.replace(p.train, max_steps=steps, seed=seed, dtype=dtype, eval_interval=steps,
                                checkpoint_interval=steps + 1, patience=0, device="cpu")
    p = dataclasses.replace(p, train=train)
    with tempfile.TemporaryDirectory() as d:
        r = Trainer(p, data, Path(d) / "best", Path(d) / "last", progress=False).train()
    tail = [row[1] for row in r.train_log[-50:]]
    return {"seed": seed, "dtype": dtype, "train_loss_last50": statistics.mean(tail),
            "val_loss": r.final_val_loss, "tokens_per_s": r.tokens_per_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    data = TokenData.load(ROOT / "data/processed")
    rows = [run(args.steps, s, "bfloat16", data) for s in args.seeds]
    rows.append(run(args.steps, args.seeds[0], "float32", data))
    fast = [r["train_loss_last50"] for r in rows[:-1]]
    summary = {"steps": args.steps, "rows": rows,
               "bf16_train_loss_mean": statistics.mean(fast),
               "bf16_train_loss_spread": max(fast) - min(fast),
               "fp32_train_loss": rows[-1]["train_loss_last50"],
               "same_seed_difference": rows[0]["train_loss_last50"] - rows[-1]["train_loss_last50"]}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"first {args.steps} steps of the default recipe; train loss = mean of the last 50 steps")
    for r in rows:
        print(f"  {r['dtype']:9s} seed {r['seed']}: train {r['train_loss_last50']:.4f}  "
              f"val {r['val_loss']:.4f}  {r['tokens_per_s']:,.0f} tok/s")
    print(f"bf16 seeds: mean {summary['bf16_train_loss_mean']:.4f}, spread {summary['bf16_train_loss_spread']:.4f}; "
          f"fp32 minus bf16 at the same seed: {-summary['same_seed_difference']:+.4f}")


if __name__ == "__main__":
    main()
