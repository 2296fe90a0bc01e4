"""``train.init_from``: fine-tuning from a gptcore checkpoint, the registry or a Hugging Face
directory. Fast tier: load_init and the Trainer in process (the init weights before step 1,
the step-0 validation row, the fingerprint, transformers' own save_pretrained scoring the
same, one-line errors). Slow tier: the real pipeline, `dvc exp run -S
train.init_from=models:/gptcore@champion` on other text, then a local init directory as a
DVC dep."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from project_copy import TINY, add_train_dep, git_project, write_params
from test_checkpoint import payloads
from test_hf import randomize_small_params
from test_train import make_params, synthetic
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from gptcore.checkpoint import load_checkpoint, save_checkpoint
from gptcore.config import CorpusSource, DataConfig, Params
from gptcore.data.corpus import tokenize_corpus
from gptcore.data.dataset import BatchSampler, TokenData
from gptcore.data.tokenizer import CharTokenizer, GPT2Tokenizer
from gptcore.errors import GptcoreError
from gptcore.init_source import check_tracked, init_chars
from gptcore.model import GPT
from gptcore.model.hf_export import export_hf
from gptcore.training.init_from import load_init
from gptcore.training.loop import Trainer


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()  # the Trainer sets train.threads for the whole process
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def text(mirror_dir) -> str:
    return (mirror_dir / "input.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def char_data(text) -> TokenData:
    return synthetic(text[:20_000], text[20_000:24_000])


@pytest.fixture(scope="module")
def gpt2_data(text, mirror_dir) -> TokenData:
    tok = GPT2Tokenizer(mirror_dir)
    return TokenData(torch.tensor(tok.encode(text[:12_000])), torch.tensor(tok.encode(text[12_000:16_000])),
                     {"synthetic": "gpt2 slice"}, tok)


def random_model(params: Params, seed: int) -> GPT:
    """Weights no trainer would start from: a loaded init is told apart from a fresh one."""
    torch.manual_seed(seed)
    model = GPT(params.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def val_estimate(model: GPT, data: TokenData, params: Params) -> float:
    """What Trainer.estimate_val_loss computes, independently: the mean loss on the fixed
    validation batches (train.seed + 10,000), fp32."""
    sampler = BatchSampler(data.val, params.model.block_size, params.train.batch_size, seed=params.train.seed + 10_000)
    n = min(params.train.eval_batches, 1 + len(data.val) // params.model.block_size)
    model.eval()
    with torch.no_grad():
        return sum(model.loss(*sampler.next()).item() for _ in range(n)) / n


def trainer(params: Params, data: TokenData, where: Path, init=None) -> Trainer:
    return Trainer(params, data, best_dir=where / "best", resume_dir=where / "last", progress=False, init=init)


# -- a gptcore checkpoint ----------------------------------------------------------------

def test_checkpoint_init_is_the_start_and_step_0_is_its_loss(char_data, tmp_path):
    params = make_params(train={"max_steps": 2, "eval_interval": 2, "eval_batches": 3})
    model = random_model(params, seed=5)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, char_data.tokenizer)
    init = load_init(str(ckpt), params.model, char_data.tokenizer)
    assert same_weights(init.state, model.state_dict())
    save_id = json.loads((ckpt / "config.json").read_text())["save_id"]
    assert init.digest == save_id
    assert init.tags == {"gptcore.init_from": str(ckpt), "gptcore.init_digest": save_id,
                         "gptcore.init_kind": "checkpoint", "gptcore.init_path": str(ckpt.resolve())}

    t = trainer(params, char_data, tmp_path / "ft", init)
    assert same_weights(t.model.state_dict(), model.state_dict())  # before step 1
    result = t.train()
    expected = val_estimate(load_checkpoint(ckpt)[0], char_data, params)
    assert result.val_log[0] == [0, pytest.approx(expected, rel=1e-6, abs=1e-6)]
    assert [row[0] for row in result.val_log] == [0, 2] and result.steps == 2
    assert not same_weights(t.model.state_dict(), model.state_dict())  # and then it trained

    # The fingerprint: scratch's is what it always was; an init joins it by content.
    scratch = trainer(params, char_data, tmp_path / "scratch").fingerprint
    other = random_model(params, seed=6)
    other_init = load_init(str(save_checkpoint(tmp_path / "other", other, char_data.tokenizer)),
                           params.model, char_data.tokenizer)
    copy = load_init(str(save_checkpoint(tmp_path / "copy", model, char_data.tokenizer)),
                     params.model, char_data.tokenizer)
    fingerprints = {t.fingerprint, scratch, trainer(params, char_data, tmp_path / "o", other_init).fingerprint}
    assert len(fingerprints) == 3
    assert copy.digest == init.digest  # the same weights elsewhere: the same fine-tune (resume continues it)
    assert trainer(params, char_data, tmp_path / "c", copy).fingerprint == t.fingerprint


# -- a Hugging Face directory from transformers' own save_pretrained ---------------------

HF = {
    "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=50257)),
             {"position": "learned", "mlp_activation": "gelu"}),
    "gpt_neox": (lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=50257, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        hidden_act="relu2", max_position_embeddings=32, use_parallel_residual=False, tie_word_embeddings=True,
        attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 1.0})),
        {"position": "rope", "mlp_activation": "relu2"}),
}


def gpt2_params(model: dict | None = None, **train) -> Params:
    return Params.from_dict({
        "tokenizer": {"kind": "gpt2"},
        "model": {"vocab_size": 50257, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0,
                  **(model or {})},
        "train": {"device": "cpu", "dtype": "float32", "batch_size": 4, "max_steps": 1, "warmup_steps": 1,
                  "eval_interval": 1, "eval_batches": 2, "checkpoint_interval": 10, "log_interval": 1,
                  "patience": 0, "threads": 1, **train},
    })


def hf_dir(kind: str, where: Path, seed: int = 3) -> tuple[torch.nn.Module, Path]:
    """A tiny random transformers model saved by save_pretrained: config.json and
    model.safetensors, no tokenizer files."""
    make, _ = HF[kind]
    torch.manual_seed(seed)
    hf = make().eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)  # logits far from uniform: a mapping error shows
    randomize_small_params(hf.named_parameters(), seed)
    hf.save_pretrained(where)
    assert sorted(p.name for p in where.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    return hf, where


def hf_loss(hf: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        logits = hf(x).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1)).item()


@pytest.mark.parametrize("kind", list(HF))
def test_hf_save_pretrained_init_scores_what_transformers_does(kind, gpt2_data, tmp_path):
    hf, directory = hf_dir(kind, tmp_path / "hf")
    params = gpt2_params(HF[kind][1])
    init = load_init(f"hf:{directory}", params.model, gpt2_data.tokenizer)
    assert init.tags["gptcore.init_kind"] == "hf" and init.tags["gptcore.init_from"] == f"hf:{directory}"
    assert init.tags["gptcore.init_path"] == str(directory.resolve()) and len(init.digest) == 64
    t = trainer(params, gpt2_data, tmp_path / "ft", init)

    # Before step 1 the model is transformers', to fp32 rounding: on one batch...
    x, y = BatchSampler(gpt2_data.train, 32, 4, seed=0).next()
    with torch.no_grad():
        ours = t.model.eval().loss(x, y).item()
    theirs = hf_loss(hf, x, y)
    assert abs(ours - theirs) < 1e-5, (ours, theirs)
    assert abs(theirs - math.log(50257)) > 1, theirs  # not the near-uniform score of small weights
    # ...and the step-0 validation row is transformers' mean on the fixed validation batches.
    sampler = BatchSampler(gpt2_data.val, 32, 4, seed=params.train.seed + 10_000)
    expected = sum(hf_loss(hf, *sampler.next()) for _ in range(2)) / 2
    result = t.train()
    assert result.val_log[0][0] == 0 and abs(result.val_log[0][1] - expected) < 1e-5, (result.val_log, expected)


# -- errors: one line, naming the fix ----------------------------------------------------

def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert isinstance(exc.value, GptcoreError) and "\n" not in text, text
    return text


def test_a_model_shape_mismatch_names_each_field_and_the_fix(char_data, tmp_path):
    ckpt = save_checkpoint(tmp_path / "ckpt", random_model(make_params(), 1), char_data.tokenizer)
    params = make_params(model={"n_layer": 1, "n_embd": 64, "dropout": 0.1})  # dropout may differ
    with pytest.raises(GptcoreError) as exc:
        load_init(str(ckpt), params.model, char_data.tokenizer)
    line = one_line(exc)
    assert line.startswith(f"train.init_from={str(ckpt)!r}: model.* differs from the init model: "), line
    assert "n_layer=1 (init: 2), n_embd=64 (init: 32);" in line and "dropout" not in line, line
    assert line.endswith("(dvc exp run -S model.n_layer=2 -S model.n_embd=32)"), line


def test_a_checkpoint_of_another_tokenizer_is_refused(char_data, gpt2_data, tmp_path):
    char_ckpt = save_checkpoint(tmp_path / "char", random_model(make_params(), 1), char_data.tokenizer)
    with pytest.raises(GptcoreError) as exc:
        load_init(str(char_ckpt), gpt2_params().model, gpt2_data.tokenizer)
    line = one_line(exc)
    assert f"its tokenizer (char, {char_data.tokenizer.vocab_size} ids) is not the data's (gpt2, 50257 ids); " \
           "set tokenizer.kind=char" in line, line

    gpt2_ckpt = save_checkpoint(tmp_path / "gpt2", random_model(gpt2_params(), 1), gpt2_data.tokenizer)
    with pytest.raises(GptcoreError) as exc:
        load_init(str(gpt2_ckpt), make_params().model, char_data.tokenizer)
    line = one_line(exc)
    assert f"its tokenizer (gpt2, 50257 ids) is not the data's (char, {char_data.tokenizer.vocab_size} ids); " \
           "set tokenizer.kind=gpt2" in line, line

    # Same kind, same size, other characters: token ids would mean other things.
    reversed_chars = CharTokenizer(char_data.tokenizer.chars[::-1])
    with pytest.raises(GptcoreError, match="is not the data's") as exc:
        load_init(str(char_ckpt), make_params().model, reversed_chars)
    one_line(exc)

    # A Hugging Face directory (GPT-2's vocabulary assumed) under char data.
    _, directory = hf_dir("gpt2", tmp_path / "hf")
    with pytest.raises(GptcoreError) as exc:
        load_init(f"hf:{directory}", make_params().model, char_data.tokenizer)
    assert one_line(exc).endswith("GPT-2's vocabulary is assumed, but tokenizer.kind=char; set tokenizer.kind=gpt2")


def test_a_missing_directory_is_named(char_data, tmp_path):
    params = make_params()
    nowhere = tmp_path / "nowhere"
    with pytest.raises(GptcoreError) as exc:
        load_init(str(nowhere), params.model, char_data.tokenizer)
    assert "no such checkpoint directory" in one_line(exc) and str(nowhere) in one_line(exc)
    with pytest.raises(GptcoreError) as exc:
        load_init(f"hf:{nowhere}", params.model, char_data.tokenizer)
    assert one_line(exc).startswith(f"train.init_from='hf:{nowhere}': no such directory; allowed: scratch, ")
    for spec in ("nowhere", "hf:nowhere"):  # the stage's first check, relative to the project
        with pytest.raises(GptcoreError) as exc:
            check_tracked(spec, [], tmp_path)
        assert one_line(exc).startswith(f"train.init_from={spec!r}: no such directory {str(nowhere)!r}; allowed: ")


def test_a_local_init_must_be_a_dep_of_the_train_stage(tmp_path):
    (tmp_path / "init").mkdir()
    (tmp_path / "hf" / "gpt2").mkdir(parents=True)
    with pytest.raises(GptcoreError) as exc:
        check_tracked("init", [str(tmp_path / "data/processed")], tmp_path)
    assert one_line(exc) == ("train.init_from='init': 'init' is not a dep of the train stage in dvc.yaml, so DVC "
                             "would not re-run the train stage when it changes; add it under stages.train.deps "
                             "(docs/finetune.md)")
    check_tracked("init", [str(tmp_path / "init")], tmp_path)
    check_tracked("hf:hf/gpt2", [str(tmp_path / "hf")], tmp_path)  # a directory above it counts
    check_tracked("init", None, tmp_path)  # no dvc.yaml: nothing to check against
    for spec in ("scratch", "models:/gptcore@champion"):
        check_tracked(spec, [], tmp_path)


def test_a_char_finetune_encodes_its_text_with_the_init_models_characters(char_data, tmp_path, mirror_dir):
    """A char model's ids are its own characters: a fine-tune's text, which has fewer (or
    other) characters, is encoded with the init model's, and a character it never saw is
    one line, before anything is written."""
    chars = char_data.tokenizer.chars
    ckpt = save_checkpoint(tmp_path / "init", random_model(make_params(), 1), char_data.tokenizer)
    export_hf(load_checkpoint(ckpt)[0], tmp_path / "hf", char_data.tokenizer)
    gpt2_ckpt = save_checkpoint(tmp_path / "gpt2", random_model(gpt2_params(), 1), GPT2Tokenizer(mirror_dir))
    assert init_chars(str(ckpt)) == init_chars(f"hf:{tmp_path / 'hf'}") == chars
    assert init_chars("scratch") is None and init_chars(str(gpt2_ckpt)) is None

    small = tmp_path / "small.txt"
    small.write_text("to be, or not to be: that is the question.\n" * 40, encoding="utf-8")
    assert len(set(small.read_text())) < len(chars)
    cfg = DataConfig(raw_dir=str(tmp_path / "raw"), processed_dir=str(tmp_path / "processed"),
                     sources=(CorpusSource(path=str(small)),))
    tokenize_corpus(cfg, "char", threads=1, init_chars=init_chars(str(ckpt)))
    data = TokenData.load(cfg.processed_dir)
    assert data.tokenizer.same_as(char_data.tokenizer)
    assert data.tokenizer.decode(data.train[:10].tolist()) == "to be, or "
    params = make_params()
    init = load_init(str(ckpt), params.model, data.tokenizer)  # the ids mean what they meant
    assert same_weights(init.state, load_checkpoint(ckpt)[0].state_dict())
    # Without the init's characters the text's own vocabulary is built, and train refuses it.
    tokenize_corpus(cfg, "char", threads=1)
    with pytest.raises(GptcoreError, match="re-run tokenize with this train.init_from") as exc:
        load_init(str(ckpt), params.model, TokenData.load(cfg.processed_dir).tokenizer)
    one_line(exc)

    before = {p.name: p.read_bytes() for p in Path(cfg.processed_dir).iterdir()}
    small.write_text("café au lait\n" * 40, encoding="utf-8")
    with pytest.raises(GptcoreError) as exc:
        tokenize_corpus(cfg, "char", threads=1, init_chars=chars)
    line = one_line(exc)
    assert f"character(s) 'é' are not in the init model's {len(chars)}-character vocabulary" in line, line
    assert line.endswith("or train.init_from=scratch"), line
    assert {p.name: p.read_bytes() for p in Path(cfg.processed_dir).iterdir()} == before


def test_a_pickle_in_an_hf_pytorch_model_bin_is_refused_never_run(gpt2_data, tmp_path):
    _, directory = hf_dir("gpt2", tmp_path / "hf")
    (directory / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    for payload in payloads(marker):
        torch.save({"transformer.wte.weight": payload}, directory / "pytorch_model.bin")
        with pytest.raises(GptcoreError) as exc:
            load_init(f"hf:{directory}", gpt2_params(HF["gpt2"][1]).model, gpt2_data.tokenizer)
        line = one_line(exc)
        assert line.startswith(f"train.init_from='hf:{directory}': {directory / 'pytorch_model.bin'}: refused to "
                               "load: "), line
        assert "could run code" in line and line.endswith("allowed: tensors only (model.safetensors is safer still)")
        assert not marker.exists()


# -- the pipeline: dvc exp run from the champion, then a local init directory ------------

def _run(args: list[str], root: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _val_log(root: Path) -> list[list[float]]:
    lines = (root / "metrics/val_log.csv").read_text().splitlines()
    assert lines[0] == "step,val_loss"
    return [[float(v) for v in line.split(",")] for line in lines[1:]]


def _champion_loss_here(checkpoint: Path, root: Path, train: dict) -> float:
    """The loss the Trainer's step-0 validation computes, independently: the checkpoint on
    the processed data's fixed validation batches, under the run's autocast."""
    from gptcore.training.device import autocast, resolve_precision

    model, _, _ = load_checkpoint(checkpoint)
    data = TokenData.load(root / "data/processed")
    block, batch = TINY["model"]["block_size"], train["batch_size"]
    sampler = BatchSampler(data.val, block, batch, seed=train["seed"] + 10_000)
    n = min(train["eval_batches"], 1 + len(data.val) // block)
    cpu = torch.device("cpu")
    dtype, _ = resolve_precision(cpu, train["dtype"])
    total = 0.0
    with torch.no_grad():
        for _ in range(n):
            x, y = sampler.next()
            with autocast(cpu, dtype):
                total += model.loss(x, y).item()
    return total / n


# Long enough that the champion has learnt something (TINY's 6 steps leave it near ln(50257)).
PRETRAIN = {"train": {"max_steps": 150, "eval_interval": 50, "checkpoint_interval": 50}}


@pytest.mark.slow
def test_finetune_the_champion_on_other_text_then_from_a_local_dir(tmp_path, mirror_dir):
    import yaml
    from mlflow.tracking import MlflowClient

    root = tmp_path / "gptcore"
    env = git_project(root, mirror_dir, TINY, PRETRAIN)
    dvc = str(Path(sys.executable).with_name("dvc"))  # the venv's, next to this Python
    _run([dvc, "repro"], root, env)
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("gptcore", "champion")
    assert str(champion.version) == "1"
    first_run = json.loads((root / "metrics/mlflow_run.json").read_text())["run_id"]
    assert champion.run_id == first_run
    aside = shutil.copytree(root / "models/best", tmp_path / "champion")
    save_id = json.loads((aside / "config.json").read_text())["save_id"]

    # Other text: a local corpus folder, a slice of the file that is not the default split's.
    text = (mirror_dir / "input.txt").read_text(encoding="utf-8")
    corpus = root / "data/corpus"
    corpus.mkdir()
    (corpus / "part.txt").write_text(text[200_000:400_000], encoding="utf-8")
    corpus_params = {"data": {"sources": [{"path": "data/corpus"}]}}
    write_params(root, TINY, corpus_params)  # and TINY's 6 steps of fine-tuning
    dvc_yaml = root / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace("# - data/corpus", "- data/corpus"))
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "own corpus"], root, env)

    out = _run([dvc, "exp", "run", "--set-param", "train.init_from=models:/gptcore@champion"], root, env).stdout
    assert "Running stage 'tokenize'" in out and "Running stage 'train'" in out
    meta = json.loads((root / "data/processed/meta.json").read_text())
    assert [f["file"] for f in meta["sources"][0]["files"]] == ["data/corpus/part.txt"]
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["train"]["init_from"] == "models:/gptcore@champion"
    rows = _val_log(root)
    assert rows[0][0] == 0 and [r[0] for r in rows] == [0, 3, 6]
    expected = _champion_loss_here(aside, root, params["train"])
    assert rows[0][1] == pytest.approx(expected, rel=1e-4), (rows, expected)
    assert rows[0][1] < math.log(50257) - 2  # a trained model on English text: far below a random one's 10.8
    assert rows[-1][1] < rows[0][1]  # and six steps on this text improve on it
    train = json.loads((root / "metrics/train.json").read_text())
    assert train["best_val_loss"] <= rows[0][1]  # step 0 is the best until beaten

    run_id = json.loads((root / "metrics/mlflow_run.json").read_text())["run_id"]
    assert run_id != first_run
    lineage = {"gptcore.init_from": "models:/gptcore@champion", "gptcore.init_kind": "registry",
               "gptcore.init_version": "gptcore/1", "gptcore.init_run_id": first_run,
               "gptcore.init_digest": save_id}
    run = client.get_run(run_id)
    assert {k: run.data.tags.get(k) for k in lineage} == lineage
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")][0] == 0
    (version,) = [v for v in client.search_model_versions("name='gptcore'") if v.run_id == run_id]
    assert str(version.version) == "2" and {k: version.tags.get(k) for k in lineage} == lineage
    # Scored on other validation data, the fine-tune never takes the alias.
    assert str(client.get_model_version_by_alias("gptcore", "champion").version) == "1"

    # A local init directory: refused until it is a dep of the train stage, then tracked.
    shutil.copytree(aside, root / "init")
    write_params(root, TINY, corpus_params, {"train": {"init_from": "init"}})
    refused = _run([dvc, "repro"], root, env, check=False)
    assert refused.returncode != 0
    assert "error: train.init_from='init': 'init' is not a dep of the train stage in dvc.yaml" in \
        refused.stdout + refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr
    add_train_dep(root, "init")
    assert "Running stage 'train'" in _run([dvc, "repro"], root, env).stdout
    local = _val_log(root)
    assert local[0] == rows[0]  # the same weights on the same batches
    run = client.get_run(json.loads((root / "metrics/mlflow_run.json").read_text())["run_id"])
    assert run.data.tags["gptcore.init_kind"] == "checkpoint" and run.data.tags["gptcore.init_digest"] == save_id
    assert json.loads(_run([dvc, "status", "--json"], root, env).stdout or "{}") == {}

    model, tok, meta = load_checkpoint(root / "init")
    with torch.no_grad():
        model.transformer.wte.weight[0, 0] += 1.0
    save_checkpoint(root / "init", model, tok, meta=meta)
    status = json.loads(_run([dvc, "status", "--json"], root, env).stdout or "{}")
    assert set(status) == {"train"}, status
    changed = [entry["changed deps"] for entry in status["train"] if "changed deps" in entry]
    assert changed == [{"init": "modified"}], status
