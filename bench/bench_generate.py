"""Decoding speed: gptcore's KV-cached generation vs Hugging Face ``GPT2LMHeadModel.generate``.

    .venv/bin/python bench/bench_generate.py [--device cpu|cuda] [--threads N] [--repeats 5] [--json]
                                             [--num-samples 8]

Both models are the reference architecture, ``GPTConfig()`` (4 layers, 4 heads,
n_embd 128, block_size 256, vocab 50257), with IDENTICAL random weights: HF builds
``GPT2LMHeadModel`` from a seeded random init (nothing is downloaded) and gptcore imports
its state dict with ``from_hf_state_dict``. fp32, batch 1, greedy, inference mode, CPU.

Throughput (the fair, identical workload): a 1-token prompt (``<|endoftext|>``) and
exactly 256 new tokens. That is 256 forward positions -- the prompt token plus the first
255 new ones; the 256th new token is never fed back -- which exactly fills
block_size = n_positions = 256, so neither side crops or overflows. HF runs
``generate(use_cache=True, do_sample=False, max_new_tokens=256, min_new_tokens=256)``
(min_new_tokens masks EOS until the end); gptcore runs ``generate_ids`` with
temperature 0 and ``stop_at_eot=False`` (and, to match HF's EOS masking, the check below
only compares ids up to the first EOS either side produced). A run is timed end to end
(prefill + 255 decoding steps + token selection); tokens/s = 256 / median time over
``--repeats`` runs, after ``--warmup`` untimed runs.

Time to first token: a 200-token random prompt and one new token, end to end
(HF: ``generate(max_new_tokens=1)``; gptcore: ``generate_ids`` with ``max_new_tokens=1``).

For context the table also shows gptcore's cached loop with ordinary ``nn.Module`` calls
per step (the model in train mode with dropout 0, which disables the fused eval-mode
step) and without a KV cache (a full forward over the window every step).

``--num-samples N``: also time N sampled completions of that 1-token prompt
(temperature 0.8, top-k 200, seed 0, 256 new tokens each, no end-of-text stop), decoded as
one batch (N rows of one engine, what ``gptcore generate --num-samples N`` runs) and
one after another (``generate_ids`` with seeds 0..N-1); tokens/s
counts all N x 256 tokens.

The machine's cores may be shared: compare numbers from the same run only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptcore.config import GPTConfig
from gptcore.generation.engine import Engine
from gptcore.generation.generate import SamplingConfig, generate_ids
from gptcore.model.hf import from_hf_state_dict, hf_config_dict

NEW_TOKENS = 256
TTFT_PROMPT = 200
EOT = 50256


def batched_ids(model, n: int, cfg) -> list[list[int]]:
    """N completions of <|endoftext|> decoded side by side, completion i with seed i."""
    engine = Engine(model, max_rows=n)
    for i in range(n):
        engine.submit([EOT], dataclasses.replace(cfg, seed=i), tag=i)
    out = [[] for _ in range(n)]
    for row, token in engine.run():
        out[row.tag].append(token)
    return out


def timed(fns: dict, repeats: int, warmup: int) -> tuple[dict, dict]:
    """Median wall time of each ``fn()`` over ``repeats`` runs (after ``warmup``), and
    its last result. The contenders take turns, so a busy moment on a shared machine
    hits all of them instead of one."""
    results, times = {}, {name: [] for name in fns}
    for _ in range(warmup):
        for name, fn in fns.items():
            results[name] = fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--num-samples", type=int, default=0, metavar="N",
                        help="also time N sampled completions, batched vs one after another (default: off)")
    args = parser.parse_args(argv)
    if args.num_samples < 0:
        parser.error(f"--num-samples={args.num_samples} is invalid; allowed: 0 (off) or an integer >= 1")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPTConfig()
    torch.manual_seed(args.seed)
    hf = GPT2LMHeadModel(GPT2Config(**hf_config_dict(config))).eval()
    hf.generation_config.pad_token_id = EOT
    ours = from_hf_state_dict(hf.state_dict(), config).eval().to(device)
    hf = hf.to(device)

    prompt = torch.tensor([[EOT]], device=device)
    greedy = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0, stop_at_eot=False)

    def hf_run(ids=prompt, n=NEW_TOKENS):
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), use_cache=True, do_sample=False,
                              max_new_tokens=n, min_new_tokens=n)
        return out[0, ids.size(1):].tolist()

    def ours_run(model=ours, use_cache=True):
        return generate_ids(model, [EOT], greedy, use_cache=use_cache)

    def module_run():
        ours.train()  # dropout is 0.0: same numbers, but the cached loop steps through nn.Module calls
        try:
            return ours_run()
        finally:
            ours.eval()

    t, ids = timed({"hf": hf_run, "ours": ours_run, "module": module_run}, args.repeats, args.warmup)
    t_hf, t_ours, t_module = t["hf"], t["ours"], t["module"]
    hf_ids, our_ids, module_ids = ids["hf"], ids["ours"], ids["module"]
    t, ids = timed({"nocache": lambda: ours_run(use_cache=False)}, max(1, args.repeats // 2), 1)
    t_nocache, nocache_ids = t["nocache"], ids["nocache"]

    # time to first token, 200-token prompt
    gen = torch.Generator().manual_seed(1)
    long_prompt = torch.randint(0, EOT, (1, TTFT_PROMPT), generator=gen).to(device)
    one = SamplingConfig(max_new_tokens=1, temperature=0.0, stop_at_eot=False)
    t, ids = timed({"hf": lambda: hf_run(long_prompt, 1),
                    "ours": lambda: generate_ids(ours, long_prompt[0], one)}, args.repeats, args.warmup)
    ttft_hf, ttft_ours, hf_first, our_first = t["hf"], t["ours"], ids["hf"], ids["ours"]

    # identical weights, identical greedy ids (HF masks EOS; compare up to the first EOS)
    limit = min([NEW_TOKENS] + [ids.index(EOT) for ids in (hf_ids, our_ids) if EOT in ids])
    agree = next((i for i, (a, b) in enumerate(zip(hf_ids[:limit], our_ids[:limit])) if a != b), limit)
    assert len(hf_ids) == len(our_ids) == NEW_TOKENS, (len(hf_ids), len(our_ids))
    assert our_ids == module_ids == nocache_ids, "gptcore's decoding paths disagree"
    assert hf_first == our_first, (hf_first, our_first)
    assert agree >= min(16, limit), f"gptcore and HF greedy ids differ at position {agree}"

    batch = None
    if args.num_samples:
        n = args.num_samples
        sampled = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.8, top_k=200, seed=0, stop_at_eot=False)
        t, ids = timed({"batched": lambda: batched_ids(ours, n, sampled),
                        "sequential": lambda: [generate_ids(ours, [EOT], dataclasses.replace(sampled, seed=i))
                                               for i in range(n)]},
                       max(1, args.repeats // 2), 1)
        # Row i is seed i's single decode up to float rounding of the batched products.
        same = sum(a == b for a, b in zip(ids["batched"], ids["sequential"]))
        batch = {"num_samples": n, "sampling": "temperature 0.8, top_k 200",
                 "rows": {f"{n} samples, one batch": n * NEW_TOKENS / t["batched"],
                          f"{n} samples, one after another": n * NEW_TOKENS / t["sequential"]},
                 "speedup": t["sequential"] / t["batched"], "samples_identical": f"{same} of {n}"}

    rows = [
        ("Hugging Face generate (KV cache)", t_hf, ttft_hf),
        ("gptcore generate_ids (KV cache)", t_ours, ttft_ours),
        ("gptcore, KV cache, nn.Module steps", t_module, None),
        ("gptcore, no KV cache", t_nocache, None),
    ]
    if args.json:
        from machine import describe

        print(json.dumps({
            "benchmark": "generate", "new_tokens": NEW_TOKENS, "machine": describe(args.device),
            "greedy_ids_identical": f"{agree} of {limit}",
            "rows": {name: {"tokens_per_s": NEW_TOKENS / t, "ratio_vs_hf": t_hf / t,
                            **({"ttft_ms": ttft * 1e3} if ttft is not None else {})}
                     for name, t, ttft in rows},
            **({"batch": {**batch, "rows": {name: {"tokens_per_s": tps} for name, tps in batch["rows"].items()}}}
               if batch else {})}, indent=2))
        return 0
    from machine import describe, headline

    print(headline(describe(args.device)))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} thread(s), fp32, batch 1, greedy; GPTConfig() = "
          f"{config.n_layer} layers, {config.n_head} heads, n_embd {config.n_embd}, "
          f"block {config.block_size}, vocab {config.vocab_size}")
    print(f"throughput: 1-token prompt + {NEW_TOKENS} new tokens; median of {args.repeats} runs "
          f"after {args.warmup} warm-up runs")
    print()
    print(f"{'':36s} {'tokens/s':>9s} {'ms/token':>9s} {'vs HF':>7s} {'TTFT, 200-token prompt':>24s}")
    for name, t, ttft in rows:
        tps = NEW_TOKENS / t
        ttft_s = f"{ttft * 1e3:.2f} ms" if ttft is not None else "-"
        print(f"{name:36s} {tps:9.1f} {t / NEW_TOKENS * 1e3:9.3f} {t_hf / t:6.2f}x {ttft_s:>24s}")
    print()
    print(f"speed-up gptcore/HF: {t_hf / t_ours:.2f}x tokens/s, {ttft_hf / ttft_ours:.2f}x time to first token")
    print(f"greedy ids identical to HF's for the first {agree} of {limit} compared tokens "
          f"({NEW_TOKENS} generated); first token after the 200-token prompt identical")
    if batch:
        print()
        print(f"--num-samples {batch['num_samples']} ({batch['sampling']}, {NEW_TOKENS} new tokens each):")
        for name, tps in batch["rows"].items():
            print(f"  gptcore, {name:30s} {tps:9.1f} tokens/s")
        print(f"  batched / one after another: {batch['speedup']:.2f}x; "
              f"samples identical to the single decodes: {batch['samples_identical']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
