"""Tokenization throughput and memory: gptcore's streamed ``tokenize_corpus`` vs one
``tiktoken`` ``encode_ordinary`` call on the whole text; with ``--tokenizer bpe``, training
a byte-level BPE on the train split and encoding, streamed, vs Hugging Face ``tokenizers``
given the whole text at once.

    .venv/bin/python bench/bench_tokenize.py [--sizes 10 100] [--threads 0] [--repeats 3] [--json]
    .venv/bin/python bench/bench_tokenize.py --tokenizer bpe [--vocab-size 4096] ...

The corpus is Tiny Shakespeare (from ``GPTCORE_MIRROR``, default ``../shared/mirror``)
repeated to each size in MB, written to a temporary directory. Each row runs in its own
process, so its peak RSS (``VmHWM``: Python, numpy and tiktoken included) is its own:

* ``gptcore streamed``: ``tokenize_corpus`` with the GPT-2 tokenizer, end to end: scan
  (sha256 + UTF-8 check), 90/10 split, chunked batch encoding across threads, uint16
  token files written.
* ``tiktoken single call``: read the file, ``encode_ordinary(text)`` once, write the ids
  as uint16 -- what a one-file ``prepare.py`` does. Same encoding (built from the same
  verified GPT-2 files), no split.

With ``--tokenizer bpe`` the rows are:

* ``gptcore streamed bpe``: ``tokenize_corpus`` with ``tokenizer.kind: bpe``: the scan, a
  pass over the train split into the BPE trainer, then the streamed encoding as above.
* ``tokenizers whole text``: read the file, train ``tokenizers``' BPE (the same trainer
  and settings) on the first 90 % as one string, encode the whole text with it
  (``encode_batch`` over its lines, all cores), write uint16 ids: the in-memory way.

Each row runs ``--repeats`` times, the rows taking turns; the table shows the run with
the median time (``all_seconds`` in the JSON lists every run: this VM's throughput
varies between runs). MB/s = corpus MB (10^6 bytes) / wall seconds of the row's work: building the encoding
from the two verified GPT-2 files, reading, encoding, writing (imports excluded).
The token counts must agree (the split may cut one token in two). Compare numbers from
the same run only: the machine's cores may be shared.
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
sys.path.insert(0, str(ROOT))

ROWS = ("gptcore streamed", "tiktoken single call")
BPE_ROWS = ("gptcore streamed bpe", "tokenizers whole text")


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb / 1024


def run_row(row: str, corpus: Path, raw: Path, out: Path, threads: int, vocab_size: int = 4096) -> dict:
    """One row, in this process: returns its timing, token count and peak RSS."""
    import numpy as np

    from gptcore.config import CorpusSource, DataConfig
    from gptcore.data.corpus import tokenize_corpus
    from gptcore.data.tokenizer import GPT2Tokenizer

    t0 = time.perf_counter()  # both rows build the encoding from the verified files inside the timing
    if row == ROWS[0]:
        meta = tokenize_corpus(DataConfig(raw_dir=str(raw), processed_dir=str(out),
                                          sources=(CorpusSource(path=str(corpus)),)),
                               "gpt2", threads=threads or None)
        tokens = meta["train_tokens"] + meta["val_tokens"]
    elif row == BPE_ROWS[0]:
        meta = tokenize_corpus(DataConfig(raw_dir=str(raw), processed_dir=str(out),
                                          sources=(CorpusSource(path=str(corpus)),)),
                               "bpe", threads=threads or None, vocab_size=vocab_size)
        tokens = meta["train_tokens"] + meta["val_tokens"]
    elif row == BPE_ROWS[1]:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        from gptcore.data.bpe import MIN_FREQUENCY

        text = corpus.read_text(encoding="utf-8")
        hf = Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.train_from_iterator([text[:int(len(text) * 0.9)]], trainer=trainers.BpeTrainer(
            vocab_size=vocab_size - 1, min_frequency=MIN_FREQUENCY, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[]))
        ids = [i for enc in hf.encode_batch(text.splitlines(keepends=True)) for i in enc.ids]
        out.mkdir(parents=True, exist_ok=True)
        np.asarray(ids, dtype=np.uint16).tofile(out / "all.bin")
        tokens = len(ids)
    else:
        tok = GPT2Tokenizer(raw)
        text = corpus.read_text(encoding="utf-8")
        ids = tok.encode(text)  # tiktoken's encode_ordinary, one call
        out.mkdir(parents=True, exist_ok=True)
        np.asarray(ids, dtype=np.uint16).tofile(out / "all.bin")
        tokens = len(ids)
    seconds = time.perf_counter() - t0
    mb = corpus.stat().st_size / 1e6
    return {"row": row, "corpus_mb": round(mb, 1), "seconds": round(seconds, 2),
            "mb_per_s": round(mb / seconds, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds), "peak_rss_mb": round(_peak_rss_mb(), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100], help="corpus sizes in MB")
    parser.add_argument("--threads", type=int, default=0, help="gptcore's encoding threads (0: its default)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the median is reported")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--tokenizer", choices=("gpt2", "bpe"), default="gpt2",
                        help="gpt2: GPT-2's BPE (default); bpe: train a BPE on the train split, then encode")
    parser.add_argument("--vocab-size", type=int, default=4096, help="--tokenizer bpe: the vocabulary's ids")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: ROW CORPUS RAW OUT
    args, rest = parser.parse_known_args(argv)
    if args.row:
        print(json.dumps(run_row(args.row, *map(Path, rest), threads=args.threads, vocab_size=args.vocab_size)))
        return 0

    from machine import describe, headline

    from gptcore.data.fetch import fetch_sources
    from gptcore.data.sources import SOURCES

    mirror = Path(os.environ.get("GPTCORE_MIRROR") or ROOT.parent / "shared" / "mirror")
    info = describe()
    rows = []
    names = BPE_ROWS if args.tokenizer == "bpe" else ROWS
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fetch_sources(tmp / "raw", SOURCES, mirror=mirror)  # verified copies of the mirror's files
        one = (tmp / "raw" / "input.txt").read_bytes()
        for size in args.sizes:
            corpus = tmp / f"corpus_{size}mb.txt"
            with open(corpus, "wb") as f:
                for _ in range(max(1, round(size * 1e6 / len(one)))):
                    f.write(one)
            runs: dict[str, list[dict]] = {row: [] for row in names}
            for _ in range(args.repeats):  # the rows take turns: a busy moment hits both
                for i, row in enumerate(names):
                    out = tmp / f"out_{size}_{i}"
                    proc = subprocess.run([sys.executable, __file__, "--row", row, str(corpus),
                                           str(tmp / "raw"), str(out), "--threads", str(args.threads),
                                           "--vocab-size", str(args.vocab_size)],
                                          capture_output=True, text=True, cwd=ROOT)
                    if proc.returncode:
                        sys.exit(f"row {row!r} failed:\n{proc.stderr}")
                    runs[row].append(json.loads(proc.stdout))
                    shutil.rmtree(out, ignore_errors=True)
            for results in runs.values():  # the run with the median time, and every time
                results.sort(key=lambda r: r["seconds"])
                rows.append({**results[len(results) // 2], "all_seconds": [r["seconds"] for r in results]})
            corpus.unlink()
        for r in rows:
            ref = next(x for x in rows if x["corpus_mb"] == r["corpus_mb"] and x["row"] == names[1])
            r["ratio_vs_tiktoken"] = round(r["mb_per_s"] / ref["mb_per_s"], 2)
            r["rss_vs_tiktoken"] = round(r["peak_rss_mb"] / ref["peak_rss_mb"], 2)
            # The same ids, but for the split: the split may cut a token in two, and the streamed
            # trainer sees each ~1 MiB stretch apart (a few merges may differ at its edges).
            assert abs(r["tokens"] - ref["tokens"]) <= (1 if names is ROWS else ref["tokens"] // 1000), (r, ref)
    if args.json:
        print(json.dumps({"machine": info, "rows": rows}, indent=2))
        return 0
    print(headline(info))
    print(f"{'row':<22} {'MB':>6} {'s':>7} {'MB/s':>7} {'tokens/s':>11} {'peak RSS MB':>12} "
          f"{'speed vs ' + names[1]:>18} {'RSS vs it':>16}")
    for r in rows:
        print(f"{r['row']:<22} {r['corpus_mb']:>6} {r['seconds']:>7} {r['mb_per_s']:>7} {r['tokens_per_s']:>11,} "
              f"{r['peak_rss_mb']:>12} {r['ratio_vs_tiktoken']:>17}x {r['rss_vs_tiktoken']:>15}x  "
              f"(all runs: {', '.join(f'{t} s' for t in r['all_seconds'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
