"""Training a byte-level BPE on the corpus's train split (``tokenizer.kind: bpe``).

Hugging Face ``tokenizers`` does the training: its BPE trainer is Rust, counts words as
the text streams past (memory grows with the distinct words, not the corpus), and breaks
ties between equally frequent pairs by their ids, so the same text gives the same merges
in every process. Only the result is kept, as the ranks :class:`BPETokenizer` hands to
tiktoken: one encoding path for both BPEs, and the corpus chunking rules of
:mod:`gptcore.data.cuts` hold for both, since the pre-tokenizer is GPT-2's.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import DataError
from .tokenizer import BPETokenizer, byte_chars

MIN_VOCAB = 257 + 1  # the 256 bytes, at least one merge, end-of-text
# A pair seen once is one place in the text, not a pattern: merging it spends an id on memorising.
MIN_FREQUENCY = 2


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """A byte-level BPE of ``vocab_size`` ids (end-of-text included) learned from ``texts``,
    each a separate stretch of text (a pre-tokenizer piece never spans two)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # only the tokenize stage trains

    if vocab_size < MIN_VOCAB:
        raise DataError(f"tokenizer.vocab_size={vocab_size}: a byte-level BPE needs at least {MIN_VOCAB} ids "
                        "(256 bytes, one merge, end-of-text)")
    hf = Tokenizer(models.BPE())
    # GPT-2's pre-tokenizer regex (tiktoken's r50k pattern is the same expression), on bytes
    # spelled as GPT-2 spells them; no prefix space, so text encodes as tiktoken encodes it.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=MIN_FREQUENCY, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    hf.train_from_iterator(texts, trainer=trainer)
    to_byte = {c: b for b, c in byte_chars().items()}
    spelled = sorted(hf.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [bytes(to_byte[c] for c in text) for text, _ in spelled]
    # The alphabet first (in GPT-2's byte order, as tiktoken's GPT-2 ranks have it), then the merges in
    # the order they were learned: ids are ranks.
    alphabet = {bytes([b]) for b in range(256)}
    merged = [t for t in tokens if t not in alphabet]
    tokens = [bytes([b]) for b in byte_chars()] + merged
    if len(tokens) + 1 < vocab_size:
        raise DataError(f"tokenizer.vocab_size={vocab_size}: the train split has only {len(merged)} byte pairs "
                        f"seen at least {MIN_FREQUENCY} times, enough for {len(tokens) + 1} ids; allowed: "
                        f"tokenizer.vocab_size <= {len(tokens) + 1}, or more text")
    return BPETokenizer(tokens)
