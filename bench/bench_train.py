"""Training throughput: gptcore vs Hugging Face GPT2LMHeadModel, same machine, same run.

Both train the reference model (4 layers, 4 heads, d_model 128, context 256, vocab
50,257) with AdamW on identical random batches; tokens/s is the median over timed
steps after warm-up. Rows:
  hf fp32            GPT2LMHeadModel, labels= loss (the peer as users run it)
  hf bf16 autocast   the same under torch.autocast(bfloat16)
  gptcore fp32       our model, logits + F.cross_entropy
  gptcore default    our training path: bf16 autocast + fused LM-head/cross-entropy,
                     glibc allocator tuned (gptcore.perf), as `dvc repro` runs it

    python bench/bench_train.py [--batch-size 8] [--steps 6] [--threads 0]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from gptcore.config import GPTConfig
from gptcore.model import GPT
from gptcore.perf import keep_freed_memory


def time_steps(step, n_warmup: int, n_steps: int) -> float:
    for _ in range(n_warmup):
        step()
    times = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPTConfig()
    B, T = args.batch_size, cfg.block_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(cfg.vocab_size, (B, T), generator=g)
    y = torch.randint(cfg.vocab_size, (B, T), generator=g)

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                    n_positions=T, vocab_size=cfg.vocab_size, resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0)).train()
    ours = GPT(cfg).train()
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    our_opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def hf_step(ctx):
        def step():
            with ctx():
                loss = hf(input_ids=x, labels=x).loss
            loss.backward()
            hf_opt.step()
            hf_opt.zero_grad(set_to_none=True)
        return step

    def our_step(ctx, fused):
        def step():
            with ctx():
                _, loss = ours(x, y, return_logits=not fused)
            loss.backward()
            our_opt.step()
            our_opt.zero_grad(set_to_none=True)
        return step

    rows = [("hf fp32", hf_step(contextlib.nullcontext)),
            ("hf bf16 autocast", hf_step(bf16)),
            ("gptcore fp32", our_step(contextlib.nullcontext, fused=False))]
    results = {}
    for name, step in rows:
        results[name] = B * T / time_steps(step, args.warmup, args.steps)
    keep_freed_memory()  # process-wide from here on, so it is measured last
    results["gptcore default"] = B * T / time_steps(our_step(bf16, fused=True), args.warmup, args.steps)

    base = results["hf fp32"]
    print(f"train step, batch {B} x {T} tokens, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'':20s} {'tokens/s':>10s} {'vs hf fp32':>11s}")
    for name, tps in results.items():
        print(f"{name:20s} {tps:10,.0f} {tps / base:10.2f}x")


if __name__ == "__main__":
    main()
