"""Fixtures shared by the test suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach the network: Hugging Face must not try the Hub, MLflow must not phone home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mirror_dir() -> Path:
    """The offline copies of the pipeline's downloads (``<repo>/../shared/mirror``).

    Override with ``GPTCORE_MIRROR``. A missing mirror fails the tests that need it
    rather than skipping them.
    """
    path = Path(os.environ.get("GPTCORE_MIRROR") or REPO.parent / "shared" / "mirror").resolve()
    missing = [n for n in ("input.txt", "vocab.bpe", "encoder.json") if not (path / n).is_file()]
    if missing:
        pytest.fail(f"mirror directory {path} lacks {', '.join(missing)}; set GPTCORE_MIRROR")
    return path


def char_tokenizer(text: str):
    """The char-level tokenizer of ``text``'s characters (what tokenizing it would build)."""
    from gptcore.data.tokenizer import CharTokenizer

    return CharTokenizer(sorted(set(text)))


def never_ending_checkpoint(directory: Path, seed: int, std: float, block_size: int = 32) -> Path:
    """Save a random tiny char-level model that never picks end-of-text greedily (its
    embedding is zero, so its logit is 0 while the largest logit is positive): a greedy
    completion runs to its token limit. ``seed`` and ``std`` pick the random weights."""
    import string

    import torch

    from gptcore.checkpoint import save_checkpoint
    from gptcore.config import GPTConfig
    from gptcore.model import GPT

    tok = char_tokenizer(string.ascii_letters + " \n.,:;!?'-")
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
        model.transformer.wte.weight[tok.eot_id] = 0.0
    return save_checkpoint(directory, model, tok)
