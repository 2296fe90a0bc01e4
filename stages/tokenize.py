"""Stage: split the text 90/10 by characters and tokenize into data.processed_dir."""

import json

from gptcore.config import load_params
from gptcore.corpus import tokenize_corpus
from gptcore.stage import run_stage


def main() -> None:
    params = load_params()
    meta = tokenize_corpus(params.data, params.tokenizer.kind)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    run_stage(main)
