"""What fine-tuning Hugging Face's 124 M-parameter ``gpt2`` costs here: step time and peak RSS.

No download is possible on the machines this project is measured on, so the model is a
GPT-2-small-shaped ``GPT2LMHeadModel`` with random weights (the same shapes and FLOPs as the
real one), written with ``save_pretrained`` and read back through ``train.init_from: hf:<dir>``
exactly as a user's download would be. The Trainer then takes ``--steps`` optimizer steps on
Tiny Shakespeare's GPT-2 tokens; the median step time (after one warm-up step) and the
process's peak RSS are printed as one JSON line.

    python bench/bench_finetune_gpt2.py [--batch-size 1] [--block-size 256] [--steps 4]
                                        [--dtype float32|bfloat16] [--threads 0]

Needs the tokenized data: run `dvc repro tokenize` first (or point --data at a
processed dir).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/processed")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=256, help="training window (<= 1024, GPT-2's context)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel

    from gptcore.config import Params
    from gptcore.data.dataset import TokenData
    from gptcore.training.init_from import load_init
    from gptcore.training.loop import Trainer

    data = TokenData.load(args.data)
    with tempfile.TemporaryDirectory(prefix="gpt2-small-") as tmp:
        GPT2LMHeadModel(GPT2Config()).save_pretrained(tmp)  # 124 M parameters, GPT-2 small's config
        # GPT-2 small's shape; block_size stays 1024 because wpe is a 1024-row table.
        model = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "position": "learned",
                 "mlp_activation": "gelu", "dropout": 0.0}
        params = Params.from_dict({
            "model": model,
            "train": {"init_from": f"hf:{tmp}", "device": "cpu", "dtype": args.dtype, "threads": args.threads,
                      "batch_size": args.batch_size, "max_steps": args.steps + 1, "warmup_steps": 1,
                      "eval_interval": 10_000, "eval_batches": 1, "checkpoint_interval": 10_000,
                      "ema_decay": 0.0, "optimizer": "adamw", "learning_rate": 3e-5, "min_lr": 3e-6}})
        init = load_init(params.train.init_from, params.model, data.tokenizer)
        with tempfile.TemporaryDirectory() as work:
            trainer = Trainer(params, data, Path(work) / "best", Path(work) / "last", progress=False, init=init)
            # Windows shorter than the model's context: the sampler draws block_size-token
            # windows, so rebuild it at the benchmark's length (the model takes any length).
            from gptcore.data.dataset import BatchSampler
            trainer.sampler = BatchSampler(data.train, args.block_size, args.batch_size, seed=1)
            times = []
            for step in range(args.steps + 1):
                t0 = time.perf_counter()
                trainer._train_step(3e-5)
                if step:  # the first step allocates optimizer state and warms caches
                    times.append(time.perf_counter() - t0)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = args.batch_size * args.block_size
    med = statistics.median(times)
    print(json.dumps({"model": "gpt2-small-shaped (random)", "parameters": trainer.model.num_parameters(),
                      "batch_size": args.batch_size, "block_size": args.block_size, "dtype": args.dtype,
                      "step_s": round(med, 3), "tokens_per_s": round(tokens / med, 1),
                      "peak_rss_mb": round(rss_mb)}))


if __name__ == "__main__":
    main()
