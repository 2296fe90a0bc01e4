"""Where a checkpoint's validation loss goes: the whole-split loss (the evaluate stage's
windows, float32) broken down by how often each target token occurs in the training split.

    python bench/loss_breakdown.py models/best [--data data/processed]

Prints one markdown row per frequency band (share of the val targets, their mean nats,
their part of the mean), the probability the model puts on the vocabulary entries the
training split never contains, and, as a what-if without retraining, the loss of the
mixture (1 - e) p + e / vocab for a few e: how much a probability floor under every
token (what ``train.label_smoothing`` trains towards) could gain on this split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BANDS = [("never", 0, 0), ("once", 1, 1), ("2-5", 2, 5), ("6-50", 6, 50), ("51+", 51, None)]
FLOORS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05)


@torch.no_grad()
def target_nats(model, tokens, eot_id: int, unseen: torch.Tensor) -> tuple[np.ndarray, float]:
    """Per-token nats of every val target, in order, and the mean probability on ``unseen``."""
    from gptcore.evaluate import windows

    nats, mass = [], []
    for x, y in windows(tokens, model.config.block_size, eot_id, batch_size=8):
        logits, _ = model(x)
        logp = torch.log_softmax(logits.float(), dim=-1)
        keep = y != -1
        nats.append(-logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)[keep])
        mass.append(logp[..., unseen].logsumexp(-1).exp()[keep])
    return torch.cat(nats).numpy(), float(torch.cat(mass).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, default=Path("data/processed"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from gptcore.checkpoint import load_checkpoint
    from gptcore.data.dataset import TokenData

    data = TokenData.load(args.data)
    model, _, _ = load_checkpoint(args.checkpoint)
    vocab = model.config.vocab_size
    counts = np.bincount(np.asarray(data.train, dtype=np.int64), minlength=vocab)
    val = np.asarray(data.val, dtype=np.int64)
    nats, unseen_mass = target_nats(model, data.val, data.tokenizer.eot_id, torch.from_numpy(counts == 0))
    c = counts[val]
    print(f"{args.checkpoint}: whole-split val loss {nats.mean():.4f} nats/token over {len(nats):,} "
          f"targets; {int((counts == 0).sum()):,} of {vocab:,} vocabulary entries never occur in "
          f"the {len(counts.nonzero()[0]):,}-type, {int(counts.sum()):,}-token training split\n")
    print("| target's count in train | share of val targets | mean nats | part of the loss |")
    print("| --- | --- | --- | --- |")
    for name, lo, hi in BANDS:
        band = (c >= lo) & (c <= hi if hi is not None else True)
        if band.any():
            print(f"| {name} | {band.mean() * 100:.2f} % | {nats[band].mean():.2f} | "
                  f"{nats[band].sum() / len(nats):.3f} |")
    print(f"\nprobability on the never-seen entries, mean over val positions: {unseen_mass:.2e}")
    p = np.exp(-nats)
    floors = ", ".join(f"e={e}: {(-np.log((1 - e) * p + e / vocab)).mean():.4f}" for e in FLOORS)
    print(f"what-if, (1 - e) p + e / {vocab:,}: {floors}")


if __name__ == "__main__":
    main()
