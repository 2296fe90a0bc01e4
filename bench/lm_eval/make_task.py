"""Writes the local lm-evaluation-harness task ``shakespeare_next_line`` (docs/serving.md):
multiple choice over Tiny Shakespeare's validation split, which no gptcore model trains on.

Each item is a line of a speech (``context``: the speaker's name line and the lines before
it, at most 4) and four candidate next lines: the true one and three shuffles of its words,
drawn with a fixed seed. The candidates hold the same words, so neither their length nor
their vocabulary gives the answer away: only word order does. A model that knows the
language picks the true line more often than chance (25 %). (Other lines of the split as
candidates made a task that 1-4 M-parameter models could not tell from chance, directly
or through the server.)

    python bench/lm_eval/make_task.py [--items 500] [--out bench/lm_eval/shakespeare_next_line.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def items(text: str, n: int, seed: int = 1337) -> list[dict]:
    val = text[int(len(text) * 0.9):]  # data.split: chars, val_fraction 0.1: the evaluate stage's split
    lines = val.split("\n")
    rng = random.Random(seed)
    out = []
    candidates = [i for i in range(4, len(lines)) if len(set(lines[i].split())) >= 5 and lines[i - 1] and lines[i - 2]]
    for i in rng.sample(candidates, min(n, len(candidates))):
        context = "\n".join(lines[i - 4:i]).lstrip("\n").split("\n\n")[-1] + "\n"
        true = lines[i]
        wrong: list[str] = []
        while len(wrong) < 3:
            words = true.split()
            rng.shuffle(words)
            line = " ".join(words)
            if line != true and line not in wrong:
                wrong.append(line)
        choices = [true, *wrong]
        rng.shuffle(choices)
        out.append({"context": context, "choices": choices, "label": choices.index(true)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--out", default=str(Path(__file__).with_name("shakespeare_next_line.jsonl")))
    args = parser.parse_args()
    mirror = Path(os.environ.get("GPTCORE_MIRROR") or ROOT.parent / "shared" / "mirror")
    text = (mirror / "input.txt").read_text(encoding="utf-8")
    rows = items(text, args.items)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} items -> {args.out}")


if __name__ == "__main__":
    main()
