"""Where a text may be cut into chunks that encode, one by one, to exactly the ids of the
whole text: the tokenizer streams a corpus of any size (or a line of any length) in
~1 MiB chunks without changing a single token.

GPT-2's pre-tokenizer splits text into pieces before byte-pair encoding, and no token
spans two pieces. A cut is safe where a piece always ends: before a whitespace character
that a non-space follows (:func:`last_safe_cut`), where letters, numbers and other
characters meet (:func:`last_class_cut`), or, inside one long piece, where BPE ends a
token anyway (:func:`bpe_cut`).
"""

from __future__ import annotations

import re
import unicodedata

from .tokenizer import Tokenizer

# The last whitespace character (of those GPT-2's pre-tokenizer treats as whitespace too)
# that a non-space character follows; the greedy prefix makes one search find the last.
_LAST_CUT = re.compile("[\\s\\S]*[ \\t\\r\\n\\u3000\\xa0](?=\\S)")


def last_safe_cut(text: str, lo: int, hi: int) -> int | None:
    """The index of the last safe cut in ``text[lo:hi]``: cut before a whitespace
    character that a non-space character follows. GPT-2's pre-tokenizer always starts
    a piece there: a run of whitespace before a non-space gives up its last character
    to the next piece (``\\s+(?!\\S)`` backtracks; a space joins the word, a newline,
    tab or ideographic space stands alone), so encoding the two sides apart gives the
    ids of encoding them together. (Python's ``\\S`` is stricter than the tokenizer's.)"""
    m = _LAST_CUT.match(text, lo + 1, hi)
    return None if m is None else m.end() - 1


def _char_class(c: str) -> int:
    """GPT-2's pre-tokenizer classes: letters (\\p{L}), numbers (\\p{N}), anything else."""
    major = unicodedata.category(c)[0]
    return 0 if major == "L" else 1 if major == "N" else 2


def last_class_cut(text: str, lo: int, hi: int) -> int | None:
    """The index of the last cut in ``text[lo:hi]`` between two non-space characters of
    different classes (letter, number, other), not right after an apostrophe. Outside
    whitespace the pre-tokenizer's pieces are maximal runs of one class (``\\p{L}+``,
    ``\\p{N}+``, ``[^\\s\\p{L}\\p{N}]+``) or a contraction that starts at an apostrophe
    (``'s``, ``'ll``, ...), so a piece always ends at such a place and encoding the two sides
    apart gives the whole text's ids. Used where a long stretch has no whitespace cut
    (minified code, text with its spaces stripped, CJK with punctuation), so chunks stay
    ~1 MiB and memory bounded. A run of one class has no such place: it is cut by size."""
    for i in range(hi - 1, lo, -1):
        a, b = text[i - 1], text[i]
        if a == "'" or a.isspace() or b.isspace():
            continue
        if _char_class(a) != _char_class(b):
            return i
    return None


def bpe_cut(tokenizer: Tokenizer, text: str, target: int, chunk_chars: int) -> int:
    """A cut near ``target`` inside one long pre-tokenizer piece (a run of one class).

    Byte-pair merges are local: where the whole piece's encoding ends a token, encoding
    the two sides apart gives the same ids (a merge on one side never changes the other's
    pairs, and the pair across that place never merged). Two windows around ``target``
    with different edges are encoded; a place where both end a token is, far from either
    edge, where the whole piece ends one. Where they agree nowhere (a periodic run such as
    'aaaa...', whose merges line up from the piece's start), ``target`` itself is used:
    the one place where chunked ids may differ from whole-text encoding."""
    w = max(8, min(256, chunk_chars // 8))

    def token_ends(a: int, b: int) -> set[int]:
        window = text[a:b]
        ends, at = set(), 0
        for i in tokenizer.encode(window):
            at += len(tokenizer.decode_bytes([i]))
            ends.add(at)
        out, nbytes = set(), 0
        for k, ch in enumerate(window):  # byte offsets -> character offsets
            nbytes += len(ch.encode("utf-8"))
            if nbytes in ends:
                out.add(a + k + 1)
        return out

    both = token_ends(target - 2 * w, target + 2 * w) & token_ends(target - 2 * w + 7, target + 2 * w - 5)
    near = [c for c in both if abs(c - target) <= w]
    return min(near, key=lambda c: abs(c - target)) if near else target
