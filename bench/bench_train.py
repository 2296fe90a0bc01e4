"""Training throughput: gptcore vs Hugging Face GPT2LMHeadModel, same machine, same run.

Both train the reference model (4 layers, 4 heads, d_model 128, context 256, vocab
50,257) with AdamW on identical random batches; tokens/s is the median over timed
steps after warm-up. Rows:
  hf fp32            GPT2LMHeadModel, labels= loss (the peer as users run it)
  hf bf16 autocast   the same under torch.autocast(bfloat16)
  gptcore fp32       our model, logits + F.cross_entropy
  gptcore default    our training path: bf16 autocast + fused LM-head/cross-entropy,
                     glibc allocator tuned (gptcore.device), as `dvc repro` runs it

    python bench/bench_train.py [--batch-size 8] [--steps 6]

Each row runs in its own process.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time

import torch

from gptcore.config import GPTConfig
from gptcore.model import GPT
from gptcore.device import keep_freed_memory


def time_steps(step, n_warmup: int, n_steps: int) -> float:
    for _ in range(n_warmup):
        step()
    times = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


ROWS = ("hf fp32", "hf bf16 autocast", "gptcore fp32", "gptcore default")


def measure(row: str, batch_size: int, warmup: int, steps: int) -> float:
    """Tokens/s of one row; called in a fresh process per row so that no row inherits
    another's heap, caches or allocator settings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPTConfig()
    B, T = batch_size, cfg.block_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(cfg.vocab_size, (B, T), generator=g)
    y = torch.randint(cfg.vocab_size, (B, T), generator=g)
    torch.manual_seed(0)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if "bf16" in row or "default" in row \
        else contextlib.nullcontext
    if row.startswith("hf"):
        model = GPT2LMHeadModel(GPT2Config(
            n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=T,
            vocab_size=cfg.vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def loss_fn():
            return model(input_ids=x, labels=x).loss  # HF shifts labels itself
    else:
        model = GPT(cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        fused = row == "gptcore default"
        if fused:
            keep_freed_memory()

        def loss_fn():
            return model(x, y, return_logits=not fused)[1]

    def step():
        with amp():
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return B * T / time_steps(step, warmup, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # internal: one row, print tokens/s
    args = ap.parse_args()
    if args.row:
        print(measure(args.row, args.batch_size, args.warmup, args.steps))
        return
    results = {}
    for row in ROWS:
        out = subprocess.run([sys.executable, __file__, "--row", row, "--batch-size", str(args.batch_size),
                              "--steps", str(args.steps), "--warmup", str(args.warmup)],
                             capture_output=True, text=True, check=True)
        results[row] = float(out.stdout.strip().splitlines()[-1])
    base = results["hf fp32"]
    print(f"train step, batch {args.batch_size} x {GPTConfig().block_size} tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'':20s} {'tokens/s':>10s} {'vs hf fp32':>11s}")
    for name, tps in results.items():
        print(f"{name:20s} {tps:10,.0f} {tps / base:10.2f}x")


if __name__ == "__main__":
    main()
