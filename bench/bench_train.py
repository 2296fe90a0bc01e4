"""Training throughput and memory: gptcore vs Hugging Face GPT2LMHeadModel, same machine, same run.

All rows train the reference model (4 layers, 4 heads, d_model 128, context 256, vocab
50,257) with fused AdamW (the same optimizer settings for every row) on identical random
batches; tokens/s is the median over timed steps after warm-up. Rows:
  hf fp32            GPT2LMHeadModel, labels= loss (the peer as users run it)
  hf bf16 autocast   the same under torch.autocast(bfloat16)
  hf compiled        the same, torch.compile'd (GPU only: on CPU compile does not pay)
  gptcore fp32       our model, logits + F.cross_entropy
  gptcore default    our training path: bf16 autocast + fused LM-head/cross-entropy and,
                     on CPU, the glibc allocator tuning (gptcore.training.device), as `dvc repro` runs it

    python bench/bench_train.py [--device cpu|cuda] [--batch-size 8] [--steps 6] [--json]
    python bench/bench_train.py --variants [--dtype float32]   # model.* variants' step cost

``--variants`` times the gptcore default row once per architecture variant of
``GPTConfig`` (rotary positions, QK-norm, ReLU², RMSNorm, zero-initialised projections,
logit soft-capping),
side by side, each against the plain default row of the same run (``--dtype float32``
runs them without bf16 autocast, for CPUs without bf16 instructions).

Each row runs in its own process, so no row inherits another's heap, caches or
allocator settings; peak memory is that process's peak RSS (CPU) or peak allocated
GPU memory (CUDA).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CPU_ROWS = ("hf fp32", "hf bf16 autocast", "gptcore fp32", "gptcore default")
GPU_ROWS = ("hf fp32", "hf bf16 autocast", "hf compiled", "gptcore fp32", "gptcore default")
VARIANTS = ("position=rope", "qk_norm=true", "mlp_activation=relu2", "norm=rmsnorm", "zero_init_proj=true",
            "logit_softcap=15")
VARIANT_ROWS = ("gptcore default", *(f"gptcore default +{v}" for v in VARIANTS))


def overrides(row: str) -> dict:
    """``gptcore default +position=rope`` -> {"position": "rope"}."""
    if "+" not in row:
        return {}
    key, value = row.split("+", 1)[1].split("=")
    if value in ("true", "false"):
        return {key: value == "true"}
    return {key: float(value) if value.replace(".", "", 1).isdigit() else value}


def time_steps(step, n_warmup: int, n_steps: int, sync) -> float:
    for _ in range(n_warmup):
        step()
    sync()
    times = []
    for _ in range(n_steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(row: str, device: str, batch_size: int, warmup: int, steps: int, dtype: str = "bfloat16") -> dict:
    """One row, in this (fresh) process: tokens/s and peak memory."""
    import contextlib

    import torch

    from gptcore.config import GPTConfig

    dev = torch.device(device)
    cfg = GPTConfig(**overrides(row))
    B, T = batch_size, cfg.block_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(cfg.vocab_size, (B, T), generator=g).to(dev)
    y = torch.randint(cfg.vocab_size, (B, T), generator=g).to(dev)
    torch.manual_seed(0)
    low = "bf16" in row or ("default" in row and dtype == "bfloat16") or "compiled" in row
    amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if low else contextlib.nullcontext
    if row.startswith("hf"):
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(
            n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=T,
            vocab_size=cfg.vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).to(dev).train()
        forward = torch.compile(model) if row == "hf compiled" else model

        def loss_fn():
            return forward(input_ids=x, labels=x).loss  # HF shifts labels itself
    else:
        from gptcore.model import GPT
        from gptcore.training.device import keep_freed_memory

        model = GPT(cfg).to(dev).train()
        fused = row.startswith("gptcore default")
        if fused and dev.type == "cpu":
            keep_freed_memory()

        def loss_fn():
            return model(x, y, return_logits=not fused)[1]

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with amp():
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    tokens_per_s = B * T / time_steps(step, warmup, steps, sync)
    if dev.type == "cuda":
        return {"tokens_per_s": tokens_per_s, "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {"tokens_per_s": tokens_per_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--variants", action="store_true", help="the default row per model.* variant, vs the default")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="autocast dtype of the gptcore default rows (default: %(default)s)")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: one row, print its JSON
    args = ap.parse_args()
    if args.row:
        print(json.dumps(measure(args.row, args.device, args.batch_size, args.warmup, args.steps, args.dtype)))
        return
    from machine import describe, headline

    rows = VARIANT_ROWS if args.variants else GPU_ROWS if args.device.startswith("cuda") else CPU_ROWS
    results = {}
    # Variants differ by a few percent, less than a shared machine drifts over a minute:
    # their rows run twice, forward then reversed, and report the mean of the two.
    order = [*rows, *reversed(rows)] if args.variants else rows
    for row in order:
        out = subprocess.run([sys.executable, __file__, "--row", row, "--device", args.device,
                              "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                              "--warmup", str(args.warmup), "--dtype", args.dtype], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"row {row!r} failed:\n{out.stderr}")
        got = json.loads(out.stdout.strip().splitlines()[-1])
        if row in results:
            got = {k: (v + results[row][k]) / 2 for k, v in got.items()}
        results[row] = got
    base_row = "gptcore default" if args.variants else "hf fp32"
    base = results[base_row]["tokens_per_s"]
    for r in results.values():
        r["ratio_vs_hf" if not args.variants else "ratio_vs_default"] = r["tokens_per_s"] / base
    info = describe(args.device)
    if args.json:
        print(json.dumps({"benchmark": "train_step", "batch_size": args.batch_size,
                          "block_size": 256, "machine": info, "rows": results}, indent=2))
        return
    mem = "peak MB (GPU)" if args.device.startswith("cuda") else "peak RSS MB"
    key = "ratio_vs_default" if args.variants else "ratio_vs_hf"
    print(f"train step, batch {args.batch_size} x 256 tokens; {headline(info)}"
          + (f"; gptcore default rows: {args.dtype}" if args.dtype != "bfloat16" else ""))
    print(f"{'':42s} {'tokens/s':>10s} {'vs ' + base_row:>17s} {mem:>14s}")
    for name, r in results.items():
        peak = r.get("peak_rss_mb", r.get("peak_mem_mb"))
        print(f"{name:42s} {r['tokens_per_s']:10,.0f} {r[key]:16.2f}x {peak:14,.0f}")


if __name__ == "__main__":
    main()
