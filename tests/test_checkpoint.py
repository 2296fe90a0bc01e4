"""Checkpoints: exact round trips, refusal of unsafe or corrupt files, crash-safe saves."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer

from gptcore.checkpoint import CheckpointError, load_checkpoint, load_trainer_state, read_config, save_checkpoint
from gptcore.config import GPTConfig
from gptcore.data.tokenizer import CharTokenizer, GPT2Tokenizer
from gptcore.io import sha256_file
from gptcore.model import GPT

REPO = Path(__file__).resolve().parents[1]
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"


def char_setup(seed: int = 0) -> tuple[GPT, CharTokenizer]:
    tok = char_tokenizer(TEXT)
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=16)
    return GPT(config).eval(), tok


def snapshot(directory: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir())}


class Payload:
    """Unpickling this calls ``func(*args)``: a stand-in for a malicious pickle."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path) -> list[Payload]:
    return [Payload(builtins.open, str(marker), "w"), Payload(os.system, f"touch '{marker}'")]


def test_round_trip_char(tmp_path):
    model, tok = char_setup()
    meta = {"step": 7, "val_loss": 1.25, "note": "héllo"}
    trainer_state = {"step": 7, "optimizer": {"m": torch.randn(3, 4)}, "rng": torch.randint(0, 9, (5,))}
    save_checkpoint(tmp_path / "ckpt", model, tok, meta=meta, trainer_state=trainer_state)
    loaded, ltok, lmeta = load_checkpoint(tmp_path / "ckpt")
    assert lmeta == meta
    assert loaded.config == model.config and not loaded.training
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ours = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, ours[name]), name
    idx = torch.tensor([tok.encode(TEXT[:32])])
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert isinstance(ltok, CharTokenizer) and ltok.chars == tok.chars
    assert ltok.encode(TEXT) == tok.encode(TEXT)
    state = load_trainer_state(tmp_path / "ckpt")
    assert state["step"] == 7
    assert torch.equal(state["optimizer"]["m"], trainer_state["optimizer"]["m"])
    assert torch.equal(state["rng"], trainer_state["rng"])


def test_round_trip_gpt2(tmp_path, mirror_dir):
    tok = GPT2Tokenizer(mirror_dir)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)).eval()
    save_checkpoint(tmp_path / "ckpt", model, tok)
    loaded, ltok, meta = load_checkpoint(tmp_path / "ckpt", attn_impl="math")
    assert meta == {} and loaded.config.attn_impl == "math"
    assert load_trainer_state(tmp_path / "ckpt") is None
    idx = torch.tensor([tok.encode("HAMLET: To be, or not to be")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], atol=1e-6, rtol=0)
    assert isinstance(ltok, GPT2Tokenizer) and ltok.encode(TEXT) == tok.encode(TEXT)
    # The checkpoint carries its own BPE files: it loads with the mirror gone.
    assert ltok.directory == tmp_path / "ckpt"


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_same_model_saves_byte_identical_directories(tmp_path, mirror_dir, kind):
    # DVC hashes models/ by content: a retrain that yields the same weights must not change it.
    if kind == "char":
        model, tok = char_setup(seed=3)
    else:
        tok, model = GPT2Tokenizer(mirror_dir), GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16))
    state = {"step": 5, "optimizer": {"m": torch.arange(6.0)}, "rng": torch.get_rng_state()}
    save_checkpoint(tmp_path / "a", model, tok, meta={"step": 5}, trainer_state=state)
    save_checkpoint(tmp_path / "b", model, tok, meta={"step": 5}, trainer_state=state)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys() and "config.json" in a
    for name in a:
        assert a[name] == b[name], f"{name} differs between two saves of the same model"
    # ...and any change to what is saved changes save_id, the identity load_checkpoint checks.
    ids = {json.loads(a["config.json"])["save_id"]}
    with torch.no_grad():
        model.transformer.wte.weight[0, 0] += 1
    save_checkpoint(tmp_path / "c", model, tok, meta={"step": 5}, trainer_state=state)
    ids.add(json.loads((tmp_path / "c/config.json").read_text())["save_id"])
    save_checkpoint(tmp_path / "d", model, tok, meta={"step": 6}, trainer_state=state)
    ids.add(json.loads((tmp_path / "d/config.json").read_text())["save_id"])
    save_checkpoint(tmp_path / "e", model, tok, meta={"step": 6})
    ids.add(json.loads((tmp_path / "e/config.json").read_text())["save_id"])
    assert len(ids) == 4


def test_saving_over_a_checkpoint_replaces_it(tmp_path):
    first, tok = char_setup(seed=0)
    second, _ = char_setup(seed=1)
    save_checkpoint(tmp_path / "ckpt", first, tok, meta={"n": 1}, trainer_state={"step": 1})
    save_checkpoint(tmp_path / "ckpt", second, tok, meta={"n": 2})
    loaded, _, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta == {"n": 2}
    assert torch.equal(loaded.transformer.wte.weight, second.transformer.wte.weight)
    assert load_trainer_state(tmp_path / "ckpt") is None  # nothing left over from the first
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no .old, no temp dirs


def test_malicious_trainer_state_is_refused_and_never_runs(tmp_path):
    model, tok = char_setup()
    for i, payload in enumerate(payloads(tmp_path / "pwned")):
        ckpt = tmp_path / f"ckpt{i}"
        save_checkpoint(ckpt, model, tok)
        torch.save({"step": 1, "optimizer": payload}, ckpt / "trainer_state.pt")
        # Refused, and the payload never ran; the reason's wording is torch's, not ours to pin.
        with pytest.raises(CheckpointError, match=r"trainer_state.pt: refused to load.*could run code"):
            load_trainer_state(ckpt)
        (ckpt / "trainer_state.pt").write_bytes(pickle.dumps(payload, protocol=2))  # bare pickle
        with pytest.raises(CheckpointError, match="refused to load"):
            load_trainer_state(ckpt)
        assert not (tmp_path / "pwned").exists()
    # The payload is live: unpickled without protection it does create the marker.
    pickle.loads(pickle.dumps(payloads(tmp_path / "pwned")[0])).close()  # noqa: S301 - proves the payload live
    assert (tmp_path / "pwned").exists()


def test_pickle_in_place_of_model_safetensors_is_refused_and_never_runs(tmp_path):
    model, tok = char_setup()
    save_checkpoint(tmp_path / "ckpt", model, tok)
    marker = tmp_path / "pwned"
    for payload in payloads(marker):
        (tmp_path / "ckpt" / "model.safetensors").write_bytes(pickle.dumps({"w": payload}))
        with pytest.raises(CheckpointError, match="model.safetensors: not a valid safetensors file"):
            load_checkpoint(tmp_path / "ckpt")
        assert not marker.exists()


def test_truncated_weights_are_refused_naming_the_file(tmp_path):
    model, tok = char_setup()
    save_checkpoint(tmp_path / "ckpt", model, tok)
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    for size in (len(data) - 100, 20, 0):
        weights.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match=r"model.safetensors: .*truncated or corrupt"):
            load_checkpoint(tmp_path / "ckpt")


def test_truncated_trainer_state_is_refused(tmp_path):
    model, tok = char_setup()
    save_checkpoint(tmp_path / "ckpt", model, tok, trainer_state={"m": torch.randn(100)})
    path = tmp_path / "ckpt" / "trainer_state.pt"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="trainer_state.pt"):
        load_trainer_state(tmp_path / "ckpt")


def test_config_that_does_not_match_the_weights_names_tensor_and_shapes(tmp_path):
    model, tok = char_setup()  # n_embd=16
    save_checkpoint(tmp_path / "ckpt", model, tok)
    path = tmp_path / "ckpt" / "config.json"
    raw = json.loads(path.read_text())
    raw["model"]["n_embd"] = 32
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"config.json: n_embd=32 \(the weights hold 16\); config.json "
                       "and model.safetensors disagree"):
        load_checkpoint(tmp_path / "ckpt")
    raw["model"]["n_embd"], raw["model"]["bias"] = 16, False  # same sizes, other tensors
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"tensors do not match config.json: missing \[\], unexpected "
                       r"\['transformer.h.0.attn.c_attn.bias'"):
        load_checkpoint(tmp_path / "ckpt")
    raw["model"]["bias"] = True
    raw["model"]["n_embd"] = 17  # not a multiple of n_head
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="invalid model config: n_embd=17"):
        load_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("field, value", [("block_size", 10**12), ("vocab_size", 10**12), ("n_layer", 10**6)])
def test_huge_sizes_in_config_are_refused_before_anything_is_allocated(tmp_path, field, value):
    """A corrupt or hand-edited config.json: one error, from the weights file's header,
    before a 10**12-row embedding is allocated (that was an allocator traceback)."""
    model, tok = char_setup()
    save_checkpoint(tmp_path / "ckpt", model, tok)
    path = tmp_path / "ckpt" / "config.json"
    raw = json.loads(path.read_text())
    held = raw["model"][field]
    raw["model"][field] = value
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=rf"config.json: {field}={value} \(the weights hold {held}\)"):
        load_checkpoint(tmp_path / "ckpt")


@pytest.mark.parametrize("content, match", [
    (None, "config.json: missing"),
    ('{"format": "gptcore"}'.encode("utf-16"), "config.json: not UTF-8 text"),  # an editor's UTF-16
    ("{", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"format": "hf"}', "format 'hf' is not 'gptcore'"),
    ('{"format": "gptcore", "format_version": 99}', "format_version 99 unsupported"),
])
def test_bad_config_json_is_refused(tmp_path, content, match):
    model, tok = char_setup()
    save_checkpoint(tmp_path / "ckpt", model, tok)
    path = tmp_path / "ckpt" / "config.json"
    path.unlink()
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path / "ckpt")


def test_tokenizer_json_saved_as_utf16_is_one_error(tmp_path):
    model, tok = char_setup()
    save_checkpoint(tmp_path / "ckpt", model, tok)
    path = tmp_path / "ckpt" / "tokenizer.json"
    path.write_bytes(path.read_text(encoding="utf-8").encode("utf-16"))
    with pytest.raises(CheckpointError, match=r"tokenizer: .*tokenizer.json: not UTF-8 text \(byte 0: "
                       r"invalid start byte\); save it as UTF-8"):
        load_checkpoint(tmp_path / "ckpt")


def test_missing_directory_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")
    model, tok = char_setup()
    save_checkpoint(tmp_path / "ckpt", model, tok)
    (tmp_path / "ckpt" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.*tokenizer.json: missing"):
        load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        load_checkpoint(tmp_path / "ckpt")


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    model, _ = char_setup()
    big = char_tokenizer(TEXT + "XYZ")
    save_checkpoint(tmp_path / "ckpt", model, big)
    with pytest.raises(CheckpointError, match="tokenizer has 31 ids but the model only 28"):
        load_checkpoint(tmp_path / "ckpt")


class DiskFullTokenizer(CharTokenizer):
    def save(self, directory) -> None:
        super().save(directory)
        raise OSError("No space left on device")


def test_error_during_save_leaves_the_previous_checkpoint(tmp_path):
    model, tok = char_setup()
    save_checkpoint(tmp_path / "ckpt", model, tok, meta={"n": 1})
    before = snapshot(tmp_path / "ckpt")
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path / "ckpt", model, DiskFullTokenizer(tok.chars), meta={"n": 2})
    assert snapshot(tmp_path / "ckpt") == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the temporary dir is gone


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from gptcore.io import atomic_dir

    target = Path(sys.argv[1])
    with atomic_dir(target) as tmp:
        # A large-ish partial checkpoint: files the parent would recognise if they leaked.
        (tmp / "model.safetensors").write_bytes(b"partial" * 2_000_000)
        (tmp / "config.json").write_text("{}")
        print(tmp, flush=True)
        sys.stdin.readline()  # blocks: the parent kills us here, mid-save
""")


def test_sigkill_mid_save_leaves_the_previous_checkpoint_whole(tmp_path):
    model, tok = char_setup()
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, model, tok, meta={"n": 1})
    before = snapshot(ckpt)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ckpt)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        line = child.stdout.readline().strip()
        assert line, "the child exited before reaching the middle of its save"
        partial = Path(line)
        assert partial.is_dir() and (partial / "model.safetensors").stat().st_size == 14_000_000
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert snapshot(ckpt) == before
    assert not ckpt.with_name("ckpt.old").exists()
    loaded, _, meta = load_checkpoint(ckpt)
    assert meta == {"n": 1}
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)
    # What the killed save leaves is only its hidden temporary sibling, never the target.
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "ckpt")
    assert leftovers == [partial.name] and partial.name.startswith(".ckpt.")
    # ...and the next save goes through.
    save_checkpoint(ckpt, model, tok, meta={"n": 2})
    assert load_checkpoint(ckpt)[2] == {"n": 2}


def test_crash_between_the_two_renames_is_recovered_on_load(tmp_path):
    model, tok = char_setup()
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, model, tok, meta={"n": 1}, trainer_state={"step": 3})
    # The state atomic_dir leaves if killed after moving the old directory aside and before
    # renaming the new one into place: only <dir>.old exists.
    os.replace(ckpt, tmp_path / "ckpt.old")
    assert load_trainer_state(ckpt) == {"step": 3}
    loaded, _, meta = load_checkpoint(ckpt)
    assert meta == {"n": 1}
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)
    assert read_config(ckpt)[0] == model.config
    # Readers never move anything (a save may be in progress); the next save recovers.
    assert not ckpt.exists() and (tmp_path / "ckpt.old").is_dir()
    save_checkpoint(ckpt, model, tok, meta={"n": 2})
    assert load_checkpoint(ckpt)[2] == {"n": 2} and not (tmp_path / "ckpt.old").exists()


READER = """
import sys, time
from gptcore.checkpoint import load_checkpoint
deadline, loads = time.monotonic() + float(sys.argv[2]), 0
while time.monotonic() < deadline:
    model, tok, meta = load_checkpoint(sys.argv[1])
    assert model.transformer.wte.weight[0, 0].item() == meta["n"], "files of two saves mixed"
    loads += 1
print(loads)
"""


def test_readers_never_see_a_half_written_or_mixed_checkpoint(tmp_path):
    """Two processes load a checkpoint in a loop while this one keeps replacing it (as
    training does with a new best model): every load is one complete save."""
    import subprocess
    import sys
    import time

    model, tok = char_setup()
    ckpt = tmp_path / "ckpt"

    def save(n: int) -> None:
        with torch.no_grad():
            model.transformer.wte.weight[0, 0] = float(n)  # each save is recognisable
        save_checkpoint(ckpt, model, tok, meta={"n": n})

    save(0)
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(ckpt), "8"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    n = 0
    while any(r.poll() is None for r in readers):
        n += 1
        save(n)
        # Saves far more often than training's, yet spaced so that a load slowed by a busy
        # 2-core machine still fits between two of them within the loader's retries
        # (every 5 ms failed there: "replaced 10 times while being read").
        time.sleep(0.05)
    for r in readers:
        out, err = r.communicate()
        assert r.returncode == 0, err
        assert int(out) > 0
    assert n > 10  # the saves really raced the loads
