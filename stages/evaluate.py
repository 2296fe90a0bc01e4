"""Stage: loss, perplexity and bits per byte of the best model over the whole val split."""

import json
from pathlib import Path

from gptcore.checkpoint import load_checkpoint
from gptcore.config import load_params
from gptcore.data.dataset import TokenData
from gptcore.errors import CheckpointError
from gptcore.evaluate import evaluate_tokens
from gptcore.io import atomic_write_json
from gptcore.stage import run_stage
from gptcore.tracking import Tracker, read_run_file
from gptcore.training.device import resolve_device


def main() -> None:
    params = load_params()
    device = resolve_device(params.train.device)
    checkpoint = Path(params.train.out_dir) / "best"
    model, tokenizer, _ = load_checkpoint(checkpoint, device=device)
    data = TokenData.load(params.data.processed_dir)
    if not tokenizer.same_as(data.tokenizer):
        raise CheckpointError(f"{checkpoint}: trained with another tokenizer ({tokenizer.describe()}) than "
                              f"{params.data.processed_dir} ({data.tokenizer.describe()}); retrain, or "
                              "evaluate it on the data it was trained on")
    metrics = evaluate_tokens(model, data.val, data.tokenizer.eot_id, data.meta["val_bytes"],
                              batch_size=params.evaluate.batch_size, dtype=params.evaluate.dtype,
                              device=device)
    atomic_write_json("metrics/eval.json", metrics)
    tracker = Tracker().attach(read_run_file())
    tracker.log_metrics({"eval_" + k: v for k, v in metrics.items()})
    tracker.set_tags({"stage.evaluate": "done"})
    val = next(d for d in data.describe() if d["context"] == "validation")
    tracker.score_model(metrics, val["digest"])
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    run_stage(main)
