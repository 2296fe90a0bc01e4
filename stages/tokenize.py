"""Stage: tokenize data.sources (Tiny Shakespeare by default), split into train/val,
into data.processed_dir, streamed (memory bounded whatever the corpus size). tokenizer.kind
bpe trains its vocabulary on the train split here. A char-level or bpe fine-tune
(train.init_from) encodes with the init model's characters or BPE."""

import json

from gptcore.config import load_params
from gptcore.data.corpus import tokenize_corpus
from gptcore.data.documents import untracked_sources
from gptcore.errors import ConfigError
from gptcore.init_source import check_tracked, init_bpe, init_chars
from gptcore.stage import declared_deps, outputs_inside, project_root, run_stage


def main() -> None:
    params = load_params()
    outputs_inside(params)
    deps = declared_deps("tokenize", params.to_dict())
    missing = untracked_sources(params.data, deps, project_root()) if deps is not None else []
    if missing:
        raise ConfigError(f"data.sources path(s) {', '.join(map(repr, missing))} are not deps of the tokenize "
                          "stage in dvc.yaml, so DVC would not re-run it when they change; add each under "
                          "stages.tokenize.deps (README: 'Train on your own text')")
    chars = bpe = None
    kind = params.tokenizer.kind
    if kind in ("char", "bpe"):  # GPT-2's BPE is one fixed vocabulary: nothing to take
        check_tracked(params.train.init_from, deps, project_root(), stage="tokenize")
        if kind == "char":
            chars = init_chars(params.train.init_from)
        else:
            bpe = init_bpe(params.train.init_from)
    meta = tokenize_corpus(params.data, kind, progress=True, init_chars=chars,
                           vocab_size=params.tokenizer.vocab_size, init_tokenizer=bpe)
    print(json.dumps({k: v for k, v in meta.items() if k != "sources"}, indent=2))


if __name__ == "__main__":
    run_stage(main)
