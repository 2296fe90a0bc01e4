"""Stage: generate from fixed prompts with a fixed seed -> metrics/samples.md (+ MLflow)."""

from pathlib import Path

from gptcore.checkpoint import load_checkpoint
from gptcore.config import load_params
from gptcore.generation.generate import generate
from gptcore.generation.sampling import sample_settings
from gptcore.io import atomic_write_text
from gptcore.stage import run_stage
from gptcore.tracking import Tracker, read_run_file
from gptcore.training.device import resolve_device


def main() -> None:
    params = load_params()
    s = sample_settings(params)  # a SamplingConfig with the prompts added
    device = resolve_device(params.train.device)
    model, tokenizer, meta = load_checkpoint(Path(params.train.out_dir) / "best", device=device)
    completions = [generate(model, tokenizer, prompt, s, device=device) for prompt in s.prompts]
    settings = (f"temperature {s.temperature}, top_k {s.top_k}, top_p {s.top_p}, "
                f"repetition_penalty {s.repetition_penalty}, seed {s.seed}, "
                f"max_new_tokens {s.max_new_tokens}; model from step {meta.get('step')}")
    parts = [f"# Samples\n\n{settings}\n"]
    for prompt, text in zip(s.prompts, completions):
        parts.append(f"## {prompt}\n\n```text\n{prompt}{text}\n```\n")
    doc = "\n".join(parts)
    atomic_write_text("metrics/samples.md", doc)
    tracker = Tracker().attach(read_run_file())
    tracker.log_text(doc, "samples.md")
    tracker.log_table({"prompt": list(s.prompts), "completion": completions}, "samples.json")
    tracker.set_tags({"stage.sample": "done"})
    print(doc)


if __name__ == "__main__":
    run_stage(main)
