"""Tokenizers: GPT-2 BPE from the verified mirror files (offline), and character-level."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import char_tokenizer

from gptcore.data.tokenizer import (
    EOT_TEXT,
    TOKENIZER_FILE,
    CharTokenizer,
    GPT2Tokenizer,
    TokenizerError,
    load_tokenizer,
)

HAMLET = "HAMLET: To be, or not to be"
HAMLET_IDS = [33363, 28882, 25, 1675, 307, 11, 393, 407, 284, 307]  # tiktoken's gpt2 encoding


@pytest.fixture(scope="module")
def gpt2(mirror_dir) -> GPT2Tokenizer:
    return GPT2Tokenizer(mirror_dir)


@pytest.fixture(scope="module")
def shakespeare(mirror_dir) -> str:
    return (mirror_dir / "input.txt").read_text(encoding="utf-8")


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode(HAMLET) == HAMLET_IDS
    assert gpt2.decode(HAMLET_IDS) == HAMLET
    assert gpt2.encode("") == []
    assert (gpt2.eot_id, gpt2.vocab_size) == (50256, 50257)
    assert gpt2.decode([gpt2.eot_id]) == EOT_TEXT
    # The bulk path (a uint32 buffer) is encode_ordinary too: the end-of-text string in
    # user text stays text, never the control id.
    text = f"{HAMLET} {EOT_TEXT} more"
    assert gpt2.encode_array(text).tolist() == gpt2.encode(text) and gpt2.eot_id not in gpt2.encode(text)


def test_gpt2_encodes_tiny_shakespeare_like_tiktoken(gpt2, shakespeare):
    ids = gpt2.encode(shakespeare)
    # Figures measured with tiktoken.get_encoding("gpt2") (see shared/README.md).
    assert len(ids) == 338_025
    assert len(set(ids)) == 11_706
    assert gpt2.decode(ids) == shakespeare


def test_gpt2_round_trips_arbitrary_unicode(gpt2):
    text = "naïve café — 日本語 🎭\n\ttabs  and   spaces\r\n\x00"
    assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_treats_end_of_text_in_user_text_as_plain_text(gpt2):
    ids = gpt2.encode(f"a{EOT_TEXT}b")
    assert gpt2.eot_id not in ids
    assert gpt2.decode(ids) == f"a{EOT_TEXT}b"


def test_gpt2_rejects_ids_outside_the_vocabulary(gpt2):
    with pytest.raises(TokenizerError, match=r"\[50257\]"):
        gpt2.decode([1, 50257])
    with pytest.raises(TokenizerError, match=r"\[-1\]"):
        gpt2.decode([-1])


def test_building_gpt2_never_touches_tiktokens_cache(mirror_dir, tmp_path, monkeypatch):
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(cache))
    tok = GPT2Tokenizer(mirror_dir)
    assert tok.encode(HAMLET) == HAMLET_IDS
    assert list(cache.iterdir()) == []


def copy_gpt2_files(mirror_dir, dest):
    dest.mkdir()
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copyfile(mirror_dir / name, dest / name)
    return dest


@pytest.mark.parametrize("name", ["vocab.bpe", "encoder.json"])
def test_gpt2_refuses_a_tampered_file(mirror_dir, tmp_path, name):
    d = copy_gpt2_files(mirror_dir, tmp_path / "tok")
    data = bytearray((d / name).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, somewhere in the middle
    (d / name).write_bytes(bytes(data))
    with pytest.raises(TokenizerError, match=rf"{name}: sha256 [0-9a-f]{{64}} does not match"):
        GPT2Tokenizer(d)


@pytest.mark.parametrize("name", ["vocab.bpe", "encoder.json"])
def test_gpt2_names_a_missing_file(mirror_dir, tmp_path, name):
    d = copy_gpt2_files(mirror_dir, tmp_path / "tok")
    (d / name).unlink()
    with pytest.raises(TokenizerError, match=rf"{name}: missing"):
        GPT2Tokenizer(d)


def test_char_tokenizer_round_trip_and_end_of_text(shakespeare):
    tok = char_tokenizer(shakespeare)
    assert tok.vocab_size == 66  # 65 distinct characters + end-of-text
    assert tok.eot_id == 65 == tok.vocab_size - 1
    ids = tok.encode(shakespeare)
    assert len(ids) == len(shakespeare)
    assert max(ids) < tok.eot_id
    assert tok.decode(ids) == shakespeare
    assert tok.decode(tok.encode("ab") + [tok.eot_id]) == "ab" + EOT_TEXT


def test_char_tokenizer_names_characters_it_cannot_encode():
    tok = char_tokenizer("hello world")
    with pytest.raises(TokenizerError, match=r"'é'.*position 4"):
        tok.encode("hellé")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


@pytest.mark.parametrize("chars", [["a", "a"], ["ab"], ["a", 1]])
def test_char_tokenizer_rejects_a_bad_vocabulary(chars):
    with pytest.raises(TokenizerError, match="distinct single characters"):
        CharTokenizer(chars)


def test_save_and_load_both_kinds(gpt2, mirror_dir, tmp_path):
    char = char_tokenizer("To be, or not to be")
    for tok, d in ((gpt2, tmp_path / "gpt2"), (char, tmp_path / "char")):
        d.mkdir()
        tok.save(d)
        loaded = load_tokenizer(d)
        assert (type(loaded), loaded.vocab_size, loaded.eot_id) == (type(tok), tok.vocab_size, tok.eot_id)
        assert loaded.encode("to be or not") == tok.encode("to be or not")
    assert load_tokenizer(tmp_path / "char").chars == char.chars
    assert sorted(p.name for p in (tmp_path / "gpt2").iterdir()) == ["encoder.json", TOKENIZER_FILE,
                                                                       "vocab.bpe"]


@pytest.mark.parametrize("content, match", [
    (None, "tokenizer.json: missing"),
    ("{not json", "not valid JSON"),
    ('{"kind": "wordpiece"}', "unknown tokenizer kind 'wordpiece'; allowed: gpt2 | char"),
    ('["gpt2"]', "tokenizer.json: expected a JSON object, got list"),
    ('{"kind": "gpt2"}'.encode("utf-16"), r"tokenizer.json: not UTF-8 text \(byte 0: invalid start byte\)"),
    ('{"kind": "char"}', "'chars' must be a non-empty list"),
])
def test_load_tokenizer_errors_are_clear(tmp_path, content, match):
    if content is not None:
        (tmp_path / TOKENIZER_FILE).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TokenizerError, match=match):
        load_tokenizer(tmp_path)


def test_loading_a_saved_gpt2_tokenizer_reverifies_its_files(gpt2, tmp_path):
    gpt2.save(tmp_path)
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n")
    with pytest.raises(TokenizerError, match="vocab.bpe: sha256"):
        load_tokenizer(tmp_path)
    assert json.loads((tmp_path / TOKENIZER_FILE).read_text())["kind"] == "gpt2"
