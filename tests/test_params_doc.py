"""params.yaml documents itself: every key, at every nesting level, carries a comment.

A key counts as documented when its own line has a `# ...` comment after it, or the line
directly above it is a comment line. List items (`- url: ...`, and the lines that continue
an item's mapping) are values, not keys: the comment above the list's key covers them.
Lines inside block scalars (`key: |` / `key: >`) are text, not keys.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
KEY = re.compile(r"^\s*[A-Za-z_][\w.-]*\s*:")
BLOCK_SCALAR = re.compile(r":\s*[|>][0-9+-]*\s*$")  # after the inline comment is stripped


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _strip_comment(line: str) -> tuple[str, bool]:
    """``line`` without its comment, and whether it had one. A `#` starts a comment at the
    line's start or after whitespace, outside quotes (`https://x#frag` and `"#"` are values)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'" and (i == 0 or line[i - 1] in " \t[{,:"):
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip(), True
    return line.rstrip(), False


def undocumented_keys(lines: list[str]) -> list[tuple[int, str]]:
    """(line number, key) for each key in ``lines`` without a comment on its line or the
    line directly above."""
    missing = []
    block_indent = None  # indent of the key that opened a block scalar
    item_indent = None  # column of the `-` of the list item being read
    for number, raw in enumerate(lines, start=1):
        line = raw.rstrip("\n")
        stripped = line.strip()
        if block_indent is not None:
            if not stripped or _indent(line) > block_indent:
                continue
            block_indent = None
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("- ") or stripped == "-":
            item_indent = _indent(line)
            continue
        if item_indent is not None:
            if _indent(line) > item_indent:
                continue  # a key of the list item's mapping: a value
            item_indent = None
        if not KEY.match(line):
            continue
        code, commented = _strip_comment(line)
        above = lines[number - 2].strip() if number > 1 else ""
        if not (commented or above.startswith("#")):
            missing.append((number, code.split(":", 1)[0].strip()))
        if BLOCK_SCALAR.search(code):
            block_indent = _indent(line)
    return missing


def _report(missing: list[tuple[int, str]]) -> str:
    return "params.yaml keys without a comment (inline, or on the line above): " + ", ".join(
        f"{key} (line {number})" for number, key in missing)


def test_every_params_key_is_documented():
    lines = PARAMS.read_text(encoding="utf-8").splitlines()
    missing = undocumented_keys(lines)
    assert not missing, _report(missing)


def test_the_check_finds_keys_at_every_level():
    # The real file's keys are all found: a deleted comment would be noticed.
    lines = PARAMS.read_text(encoding="utf-8").splitlines()
    keys = [line for line in lines if KEY.match(line) and not line.lstrip().startswith("-")]
    assert len(keys) > 50
    bare = [_strip_comment(line)[0] for line in lines]
    names = {key for _, key in undocumented_keys(bare)}
    # With every comment removed, these keys (top level, nested, the grad_clip and evaluate
    # regions) are all reported.
    assert {"data", "model", "vocab_size", "grad_clip", "batch_size", "dtype", "sample", "seed"} <= names


@pytest.mark.parametrize(("text", "expected"), [
    ("a: 1  # doc\n", []),
    ("# doc\na: 1\n", []),
    ("a: 1\n", [(1, "a")]),
    ("# doc\n\na: 1\n", [(3, "a")]),  # a blank line breaks the link to the comment
    ("a:  # doc\n  b: 2\n  # doc\n  c: 3\n", [(2, "b")]),
    ("x: https://example.com/a#frag\n", [(1, "x")]),  # no space before #: part of the value
    ('x: "# not a comment"\n', [(1, "x")]),
    ("# doc\nl:\n  - url: u\n    sha256: s\n# doc\nm: 1\nn: 2\n", [(7, "n")]),
    ("# doc\nt: |\n  inner: text\n\n  more: text\nu: 1\n", [(6, "u")]),
])
def test_undocumented_keys(text, expected):
    assert undocumented_keys(text.splitlines()) == expected


def test_failure_message_names_key_and_line():
    assert _report([(75, "grad_clip")]).endswith("grad_clip (line 75)")
