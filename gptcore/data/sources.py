"""Where the pipeline's fixed inputs come from: the one place that names each upstream
file, its URL and its sha256.

The two GPT-2 files are exactly what ``tiktoken.get_encoding("gpt2")`` downloads and
hash-checks, so an encoding built from them is tiktoken's ``gpt2``, token for token.
The corpus is configurable (``data.sources`` in params.yaml); Tiny Shakespeare, defined
here, is its default. The download stage fetches the files (or takes them from
``GPTCORE_MIRROR``); the tokenizer re-checks the GPT-2 files' hashes before building
the encoding.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    """One file the pipeline downloads: its upstream URL and the sha256 it must have
    (empty: not pinned; the download stage reports the sha256 it got)."""

    url: str
    sha256: str


CORPUS_FILE = "input.txt"

TINY_SHAKESPEARE = Source(
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")

GPT2_BPE = {
    "vocab.bpe": Source(
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": Source(
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}

# What the download stage places in data.raw_dir for the default params, by file name.
SOURCES: dict[str, Source] = {CORPUS_FILE: TINY_SHAKESPEARE, **GPT2_BPE}


def files_to_fetch(data) -> dict[str, Source]:
    """Everything the download stage fetches for a :class:`~gptcore.config.DataConfig`:
    the GPT-2 BPE files and each ``url:`` entry of ``data.sources`` (local ``path:``
    entries are read in place by the tokenize stage)."""
    urls = {s.file_name: Source(s.url, s.sha256) for s in data.sources if s.url}
    return {**urls, **GPT2_BPE}
