"""tokenizer.kind: bpe: a byte-level BPE trained on the train split by the tokenize stage,
encoded by tiktoken, carried by checkpoints, exported for AutoTokenizer, and the whole
pipeline on it (`dvc exp run --set-param tokenizer.kind=bpe ...`) through the CLI, the
server and the MLflow model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gptcore.config import CorpusSource, DataConfig, Params
from gptcore.data.bpe import train_bpe
from gptcore.data.corpus import tokenize_corpus
from gptcore.data.tokenizer import BPE_FILE, EOT_TEXT, BPETokenizer, load_tokenizer
from gptcore.errors import ConfigError, DataError, TokenizerError

REPO = Path(__file__).resolve().parents[1]
ODD = "naïve café — 日本語 🎭\n\ttabs  and   spaces\r\n\x00 def f(x):\n    return x**2  # ok\n\n\n"


@pytest.fixture(scope="module")
def shakespeare(mirror_dir) -> str:
    return (mirror_dir / "input.txt").read_text(encoding="utf-8")


def _tokenize(tmp: Path, text: str, vocab_size: int, val_fraction: float = 0.1, name: str = "out") -> Path:
    corpus = tmp / f"{name}.txt"
    corpus.write_text(text, encoding="utf-8")
    cfg = DataConfig(raw_dir=str(tmp / "raw"), processed_dir=str(tmp / name), val_fraction=val_fraction,
                     sources=[CorpusSource(path=str(corpus))])
    tokenize_corpus(cfg, "bpe", threads=1, vocab_size=vocab_size)
    return tmp / name


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, shakespeare) -> BPETokenizer:
    return load_tokenizer(_tokenize(tmp_path_factory.mktemp("bpe"), shakespeare, 1024))


def test_trained_bpe_has_the_asked_size_and_round_trips_any_text(bpe, shakespeare):
    assert (bpe.kind, bpe.vocab_size, bpe.eot_id) == ("bpe", 1024, 1023)
    assert set(bpe.tokens[:256]) == {bytes([b]) for b in range(256)}  # every byte: nothing is unknown
    assert b" the" in bpe.tokens  # a merge learned from the text
    for text in (ODD, shakespeare[:5000], f"a{EOT_TEXT}b", ""):
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text and bpe.encode_array(text).tolist() == ids
        assert bpe.eot_id not in ids  # end-of-text in user text is text
    assert bpe.decode([bpe.eot_id]) == EOT_TEXT
    # Fewer tokens than bytes: what a vocabulary learned from the text is for.
    assert len(bpe.encode(shakespeare[-100_000:])) < 0.5 * len(shakespeare[-100_000:].encode())
    with pytest.raises(TokenizerError, match=r"outside the vocabulary \[0, 1024\)"):
        bpe.decode([1024])


def test_validation_text_never_becomes_a_merge(tmp_path, shakespeare):
    """Words only the validation split holds stay out of the vocabulary; the same words in
    the train split become tokens (so the first assertion can fail)."""
    train = shakespeare[:300_000]
    secret = "Zyzzogeth quaxlivorn " * 400  # 8,400 characters, only ever in validation
    text = train + "\n" + secret
    fraction = (len(secret) + 1000) / len(text)  # validation: the secret and a little Shakespeare
    held_out = load_tokenizer(_tokenize(tmp_path, text, 1024, fraction, "held_out"))
    assert not [t for t in held_out.tokens if b"zzog" in t or b"quax" in t or b"livorn" in t]
    assert len(held_out.encode(" Zyzzogeth")) >= 4
    in_train = load_tokenizer(_tokenize(tmp_path, secret + "\n" + train, 1024, 0.1, "in_train"))
    assert b" Zyzzogeth" in in_train.tokens and b" quaxlivorn" in in_train.tokens


def test_the_same_corpus_gives_a_byte_identical_tokenizer_in_two_processes(tmp_path, mirror_dir):
    code = ("import sys; from gptcore.config import CorpusSource, DataConfig; "
            "from gptcore.data.corpus import tokenize_corpus; "
            f"tokenize_corpus(DataConfig(raw_dir=sys.argv[1] + '/raw', processed_dir=sys.argv[1] + '/out', "
            f"sources=[CorpusSource(path={str(mirror_dir / 'input.txt')!r})]), 'bpe', vocab_size=2048)")
    outs = []
    for n, seed in ((1, "1"), (2, "2")):  # other hash seeds: no dependence on dict/set order
        subprocess.run([sys.executable, "-c", code, str(tmp_path / str(n))], check=True, cwd=REPO,
                       env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, timeout=300)
        outs.append({p.name: p.read_bytes() for p in sorted((tmp_path / str(n) / "out").iterdir())})
    assert set(outs[0]) >= {BPE_FILE, "tokenizer.json", "train.bin", "val.bin", "meta.json"}
    assert outs[0] == outs[1]
    assert len(outs[0][BPE_FILE].splitlines()) == 2047


def test_a_vocabulary_the_text_cannot_fill_is_refused_naming_the_largest(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer.vocab_size=5000: the train split has only \d+ byte pairs .* "
                                        r"allowed: tokenizer.vocab_size <= \d+"):
        _tokenize(tmp_path, "to be or not to be, that is the question\n" * 50, 5000)
    with pytest.raises(DataError, match="at least 258 ids"):
        train_bpe(["abc"], 100)


def test_checkpoint_keeps_the_bpe_and_refuses_an_edited_one(tmp_path, bpe):
    from gptcore.checkpoint import load_checkpoint, save_checkpoint
    from gptcore.config import GPTConfig
    from gptcore.model.gpt import GPT

    model = GPT(GPTConfig(vocab_size=bpe.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(tmp_path / "ckpt", model, bpe)
    _, loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.same_as(bpe) and loaded.tokens == bpe.tokens and loaded.encode(ODD) == bpe.encode(ODD)
    other = BPETokenizer(bpe.tokens[:-1])
    assert not other.same_as(bpe) and not loaded.same_as(load_tokenizer_of_kind_gpt2_like(bpe))
    ranks = tmp_path / "ckpt" / BPE_FILE
    ranks.write_text(ranks.read_text().replace(" 300\n", " 301\n", 1))
    with pytest.raises(Exception, match="sha256 is not the one tokenizer.json records"):
        load_checkpoint(tmp_path / "ckpt")


def load_tokenizer_of_kind_gpt2_like(bpe: BPETokenizer) -> BPETokenizer:
    """The same merges in another order: other ids, so not the same tokenizer."""
    return BPETokenizer(bpe.tokens[:256] + bpe.tokens[257:] + bpe.tokens[256:257])


def test_export_writes_a_tokenizer_autotokenizer_loads_with_the_same_ids(tmp_path, bpe, shakespeare):
    from transformers import AutoTokenizer

    from gptcore.model.hf_export import tokenizer_files

    for name, content in tokenizer_files(bpe, 256).items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in (shakespeare[-111_540:], ODD, "  leading spaces and 12345 numbers'll've"):
        ids = bpe.encode(text)
        assert hf(text)["input_ids"] == ids
        assert hf.decode(ids) == text
    assert hf.eos_token_id == bpe.eot_id and len(hf) == bpe.vocab_size


def test_model_vocab_size_auto_follows_the_tokenizer():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert raw["model"]["vocab_size"] == "auto" and Params.from_dict(raw).model.vocab_size == 50257
    bpe = {**raw, "tokenizer": {"kind": "bpe", "vocab_size": 3000}}
    assert Params.from_dict(bpe).model.vocab_size == 3000
    assert Params.from_dict({**bpe, "model": {"vocab_size": 4000}}).model.vocab_size == 4000
    with pytest.raises(ConfigError, match=r"model.vocab_size=auto: a char vocabulary's size .* \(66 for Tiny"):
        Params.from_dict({**raw, "tokenizer": {"kind": "char"}})
    with pytest.raises(ConfigError, match="vocab_size"):
        Params.from_dict({**raw, "tokenizer": {"kind": "bpe", "vocab_size": 100}})


# -- the whole pipeline on a trained vocabulary ----------------------------------------

@pytest.mark.slow
def test_dvc_exp_run_with_a_trained_bpe_generates_everywhere(tmp_path, mirror_dir):
    """The issue's command on a fresh project (tiny model): tokenize trains the BPE, train,
    evaluate and sample run on it, and the model answers the same greedy text through
    `gptcore generate`, `gptcore serve` (the openai client), the registered MLflow model and
    the Hugging Face export."""
    from openai import OpenAI
    from project_copy import TINY, git_project
    from test_pipeline import VENV_BIN, _run
    from test_serve import _free_port

    root = tmp_path / "gptcore"
    env = git_project(root, mirror_dir, TINY)
    _run([str(VENV_BIN / "dvc"), "exp", "run", "--set-param", "tokenizer.kind=bpe",
          "--set-param", "tokenizer.vocab_size=512"], root, env, timeout=900)
    meta = json.loads((root / "data/processed/meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("bpe", 512, "uint16")
    model_cfg = json.loads((root / "models/best/config.json").read_text())
    assert model_cfg["model"]["vocab_size"] == 512  # model.vocab_size: auto = the trained vocabulary
    ev = json.loads((root / "metrics/eval.json").read_text())
    assert ev["val_bytes"] == 111_540 and ev["val_tokens"] == meta["val_tokens"] and 0 < ev["bits_per_byte"] < 20
    assert "## ROMEO:" in (root / "metrics/samples.md").read_text()
    # Training speed in bytes of text, the unit that compares across tokenizers.
    train = json.loads((root / "metrics/train.json").read_text())
    assert meta["train_bytes"] == 1_003_854  # Tiny Shakespeare is ASCII: its train characters
    assert train["bytes_per_s"] == pytest.approx(train["tokens_per_s"] * 1_003_854 / meta["train_tokens"])

    prompt, greedy = "ROMEO:", ["--temperature", "0", "--max-new-tokens", "12"]
    cli = _run([str(VENV_BIN / "gptcore"), "generate", "--checkpoint", "models/best", "--prompt", prompt, *greedy],
               root, env).stdout
    assert cli.startswith(prompt)
    expected = cli[len(prompt):-1]
    assert expected

    fresh = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    code = ("import json, mlflow.pyfunc; m = mlflow.pyfunc.load_model('models:/gptcore@champion'); "
            f"print(json.dumps(list(m.predict([{prompt!r}], params={{'temperature': 0.0, 'max_new_tokens': 12}}))))")
    out = _run([sys.executable, "-c", code], root.parent, fresh).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [expected]

    port = _free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([str(VENV_BIN / "gptcore"), "serve", "--checkpoint", "models/best",
                                 "--port", str(port)], cwd=root, env=env, stdout=log, stderr=log,
                                start_new_session=True)
        try:
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
            answer = _when_up(lambda: client.completions.create(model="gptcore", prompt=prompt, temperature=0,
                                                                max_tokens=12), proc, tmp_path / "serve.log")
            assert answer.choices[0].text == expected
        finally:
            import signal

            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)

    # The Hugging Face export: AutoTokenizer gives gptcore's ids, the model gptcore's logits.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptcore.checkpoint import load_checkpoint

    _run([str(VENV_BIN / "gptcore"), "export", "models/best", str(tmp_path / "hf")], root, env)
    model, tokenizer, _ = load_checkpoint(root / "models/best")
    text = (mirror_dir / "input.txt").read_text()[-400:]
    ids = tokenizer.encode(text)[:32]
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")(text)["input_ids"][:32] == ids
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        x = torch.tensor([ids])
        torch.testing.assert_close(hf(x).logits, model(x)[0], atol=1e-4, rtol=1e-4)


def _when_up(call, proc, log: Path, timeout: float = 180):
    import time

    from openai import APIConnectionError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except APIConnectionError:  # not listening yet
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(1)
