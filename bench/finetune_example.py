"""The fine-tuning worked example (docs/finetune.md): the champion `make repro` registered,
fine-tuned on other text, against training from scratch on the same text and steps.

    make repro                                   # pretrain: models:/gptcore@champion
    [GPTCORE_MIRROR=../shared/mirror] python bench/finetune_example.py [--steps 200] [--seeds 1337 1338 1339]
                                     [--arms scratch pretrain-recipe finetune-recipe]

The other text is the Python standard library's top-level modules (README: "Train on your
own text"), split by whole files (data.split: documents), so validation is modules no run saw.
Arms (each `dvc exp run -S ...` on that text, for --steps optimizer steps):

    scratch          train.init_from=scratch, the pretraining settings
    pretrain-recipe  train.init_from=models:/gptcore@champion, the pretraining settings
    finetune-recipe  the champion with a lower peak rate and a short warm-up (FINETUNE below)

Every run is a real `dvc exp run` in a throwaway clone of this project's committed HEAD (the
workspace is untouched), logging to this project's MLflow store, so the fine-tunes appear in
`mlflow ui` with their lineage tags and register as the stdlib data's champion, never as
`champion`. Each finished run appends one JSON line to --out (a long sweep can stop and
resume: finished runs are skipped); a Markdown table of every run and each arm's mean ends it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The stdlib worked example's settings (README), with the steps and seed set per run.
CORPUS = ["-S", 'data.sources=[{path: "data/corpus/*.py"}]', "-S", "data.split=documents",
          "-S", 'sample.prompts=["import", "def main(", "class Parser"]', "-S", "sample.repetition_penalty=1.3"]
CHAMPION = "models:/gptcore@champion"
# The candidate fine-tuning settings (what docs/finetune.md suggested before they were measured):
# a fifth of the peak rate and a fifth of the warm-up.
FINETUNE = {"train.learning_rate": "3e-4", "train.min_lr": "3e-5", "train.warmup_steps": "10"}
ARMS = {
    "scratch": {"train.init_from": "scratch"},
    "pretrain-recipe": {"train.init_from": CHAMPION},
    "finetune-recipe": {"train.init_from": CHAMPION, **FINETUNE},
}


def _clone(work: Path) -> Path:
    """A clone of HEAD with the corpus in place and tokenize depending on it; GPT-2's BPE
    files are copied from this project's data/raw, so no download is needed."""
    clone = work / "project"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    if (ROOT / "data" / "raw").is_dir():
        shutil.copytree(ROOT / "data" / "raw", clone / "data" / "raw", dirs_exist_ok=True)
    corpus = clone / "data" / "corpus"
    corpus.mkdir(parents=True)
    for path in sorted(Path(sysconfig.get_path("stdlib")).glob("*.py")):
        shutil.copyfile(path, corpus / path.name)
    dvc_yaml = clone / "dvc.yaml"
    text = dvc_yaml.read_text(encoding="utf-8")
    if "# - data/corpus" not in text:
        sys.exit("dvc.yaml has no '# - data/corpus' line to enable (README: 'Train on your own text')")
    dvc_yaml.write_text(text.replace("# - data/corpus", "- data/corpus", 1), encoding="utf-8")
    return clone


def _run(clone: Path, env: dict, arm: str, seed: int, steps: int) -> dict:
    sets = {**ARMS[arm], "train.seed": str(seed), "train.max_steps": str(steps)}
    name = f"{arm}-s{seed}-{steps}"
    args = ["dvc", "exp", "run", "-n", name, *CORPUS, *(a for k, v in sets.items() for a in ("-S", f"{k}={v}"))]
    print(f"\n== {name}: {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    if subprocess.run(args, cwd=clone, env=env).returncode != 0:
        sys.exit(f"{name}: dvc exp run failed; its output is above (offline? set GPTCORE_MIRROR: README)")
    seconds = time.perf_counter() - t0
    metrics = json.loads((clone / "metrics" / "eval.json").read_text())
    val_log = [line.split(",") for line in (clone / "metrics" / "val_log.csv").read_text().splitlines()[1:]]
    first = next((float(v) for s, v in val_log if int(s) == 0), None)  # the init model, before step 1
    return {"name": name, "arm": arm, "seed": seed, "steps": steps, "settings": sets, "step0_val_loss": first,
            "val_loss": metrics["val_loss"], "bits_per_byte": metrics["bits_per_byte"],
            "wall_s": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--out", default="bench/finetune_example.jsonl", help="results, one JSON line per run")
    args = ap.parse_args()

    from bench.machine import describe, headline
    from gptcore.store import tracking_uri

    if not (ROOT / "mlflow.db").exists() and "MLFLOW_TRACKING_URI" not in os.environ:
        sys.exit("no MLflow store with a champion here: run `make repro` first")
    out = Path(args.out)
    done = {json.loads(line)["name"]: json.loads(line) for line in out.read_text().splitlines()} \
        if out.exists() else {}
    machine = headline(describe())
    env = {**os.environ, "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri(ROOT),
           "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="gptcore-finetune-") as work:
        clone = None
        for seed in args.seeds:  # seed-major: a stopped sweep still has whole seeds of every arm
            for arm in args.arms:
                name = f"{arm}-s{seed}-{args.steps}"
                if name in done:
                    rows.append(done[name])
                    continue
                clone = clone or _clone(Path(work))
                row = {**_run(clone, env, arm, seed, args.steps), "machine": machine}
                with out.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
    print(f"\n{machine}\n\n| run | step-0 val loss | val loss | bits/byte | wall |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        first = f"{r['step0_val_loss']:.4f}" if r["step0_val_loss"] is not None else "-"
        print(f"| {r['name']} | {first} | {r['val_loss']:.4f} | {r['bits_per_byte']:.4f} | {r['wall_s']:.0f} s |")
    for arm in args.arms:
        losses = [r["val_loss"] for r in rows if r["arm"] == arm]
        if losses:
            print(f"| **{arm}**, mean of {len(losses)} | | {statistics.mean(losses):.4f} | | |")


if __name__ == "__main__":
    main()
