"""Training: schedule, optimizer groups, accumulation, clipping, early stopping, best
checkpoint, and bit-exact resume after SIGINT and SIGKILL of a real training process."""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer

from gptcore.checkpoint import load_checkpoint, load_trainer_state
from gptcore.config import CorpusSource, DataConfig, Params
from gptcore.data.corpus import tokenize_corpus
from gptcore.data.dataset import TokenData
from gptcore.errors import ConfigError, DataError
from gptcore.training.averaging import WARMUPS, WeightAverage, warmed_decay
from gptcore.training.loop import Trainer
from gptcore.training.metrics import write_train_outputs
from gptcore.training.optim import lr_at, make_optimizer, momentum_at
from gptcore.training.resume import fingerprint

TINY_MODEL = {"block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0}
TINY_TRAIN = {"device": "cpu", "dtype": "float32", "batch_size": 4, "max_steps": 20,
              "learning_rate": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "eval_interval": 10,
              "eval_batches": 2, "checkpoint_interval": 10, "log_interval": 1, "patience": 0,
              "threads": 1}  # one thread: tiny models gain nothing from more, and cores are shared


def make_params(model=None, train=None, vocab_size=128) -> Params:
    return Params.from_dict({
        "tokenizer": {"kind": "char"},
        "model": {**TINY_MODEL, "vocab_size": vocab_size, **(model or {})},
        "train": {**TINY_TRAIN, **(train or {})},
    })


def synthetic(train_text: str, val_text: str) -> TokenData:
    tok = char_tokenizer(train_text + val_text)
    return TokenData(torch.tensor(tok.encode(train_text)), torch.tensor(tok.encode(val_text)),
                     {"synthetic": [train_text[:16], len(train_text), val_text[:16], len(val_text)]}, tok)


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shakespeare_dir(tmp_path_factory, mirror_dir) -> Path:
    """The first 40,000 characters of Tiny Shakespeare, char-tokenized by tokenize_corpus."""
    root = tmp_path_factory.mktemp("shakespeare")
    (root / "raw").mkdir()
    text = (mirror_dir / "input.txt").read_text(encoding="utf-8")[:40_000]
    (root / "shakespeare.txt").write_text(text, encoding="utf-8")
    # A local source: the training runs below read these token files memory-mapped.
    tokenize_corpus(DataConfig(raw_dir=str(root / "raw"), processed_dir=str(root / "processed"),
                               sources=(CorpusSource(path=str(root / "shakespeare.txt")),)), "char")
    return root / "processed"


# -- schedule and optimizer --------------------------------------------------------------

def test_lr_warmup_then_cosine_to_min_lr():
    p = make_params(train={"learning_rate": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "max_steps": 110})
    lrs = [lr_at(s, p.train) for s in range(0, 131)]
    assert lrs[0] == pytest.approx(1e-4)  # 1/warmup of the peak: tiny, not zero
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # linear warmup
    assert lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)  # the peak
    assert max(lrs) == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))  # cosine decay
    assert lrs[60] == pytest.approx((1e-3 + 1e-4) / 2)  # half way down
    assert lrs[110] == pytest.approx(1e-4)  # min_lr at max_steps ...
    assert all(x == pytest.approx(1e-4) for x in lrs[110:])  # ... and beyond
    no_warmup = make_params(train={"warmup_steps": 0, "learning_rate": 1e-3, "min_lr": 1e-3})
    assert lr_at(0, no_warmup.train) == pytest.approx(1e-3) == lr_at(19, no_warmup.train)


def test_optimizer_decays_only_matrices():
    from gptcore.model import GPT

    # Learned positions: their table is an embedding too (the pipeline's rotary has none).
    p = make_params(model={"position": "learned"}, train={"weight_decay": 0.25, "optimizer": "adamw"})
    model = GPT(p.model)
    opt = make_optimizer(model, p.train)
    matrices, embed, no_decay = opt.param_groups
    assert matrices["weight_decay"] == embed["weight_decay"] == 0.25 and no_decay["weight_decay"] == 0.0
    assert matrices["params"] and all(t.dim() == 2 for t in matrices["params"])
    assert no_decay["params"] and all(t.dim() == 1 for t in no_decay["params"])
    ids = lambda ts: {id(t) for t in ts}  # noqa: E731
    every = [id(t) for g in opt.param_groups for t in g["params"]]
    assert sorted(every) == sorted(id(t) for t in model.parameters())  # each exactly once
    names = {id(t): n for n, t in model.named_parameters()}
    assert {names[i] for i in ids(embed["params"])} == {"transformer.wte.weight", "transformer.wpe.weight"}
    decayed = {names[id(t)] for t in matrices["params"] + embed["params"]}
    assert not any(n.endswith(".bias") or ".ln_" in n for n in decayed)
    # The tied LM head is the embedding: one tensor, decayed once.
    assert model.lm_head.weight is model.transformer.wte.weight


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    from gptcore.model import GPT

    p = make_params(model={"position": "learned"},
                    train={"optimizer": "muon", "weight_decay": 0.25, "muon_lr_scale": 2.0,
                           "embed_lr_scale": 5.0, "scalar_lr_scale": 0.5})
    model = GPT(p.model)
    opt = make_optimizer(model, p.train)
    names = {id(t): n for n, t in model.named_parameters()}
    adam_decay, adam_no_decay, muon = opt.param_groups  # no AdamW matrices group: Muon has them all
    muon_names = {names[id(t)] for t in muon["params"]}
    assert muon_names == {n for n, t in model.named_parameters() if t.dim() == 2 and ".h." in n}
    assert any("attn.c_attn" in n for n in muon_names) and any("mlp.c_proj" in n for n in muon_names)
    # Embeddings (and the tied head) stay with AdamW, decayed; norms and biases undecayed.
    assert {names[id(t)] for t in adam_decay["params"]} == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert all(t.dim() == 1 for t in adam_no_decay["params"])
    every = [id(t) for g in opt.param_groups for t in g["params"]]
    assert sorted(every) == sorted(id(t) for t in model.parameters())  # each exactly once
    from gptcore.training.optim import set_lr
    set_lr(opt, 1e-3, momentum=0.9)
    assert muon["lr"] == pytest.approx(2e-3) and muon["momentum"] == 0.9
    assert adam_decay["lr"] == pytest.approx(5e-3) and adam_no_decay["lr"] == pytest.approx(5e-4)
    assert "momentum" not in adam_decay and adam_decay["betas"] == (p.train.beta1, p.train.beta2)
    with pytest.raises(ConfigError, match=r"train.embed_lr_scale=0.0 is invalid; allowed: > 0"):
        make_params(train={"embed_lr_scale": 0})


def test_muon_trains(tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 200
    data = synthetic(text, text[:400])
    p = make_params(train={"optimizer": "muon", "max_steps": 40, "eval_interval": 40, "learning_rate": 1e-2,
                           "min_lr": 1e-3}, vocab_size=data.tokenizer.vocab_size)
    result = Trainer(p, data, tmp_path / "best", tmp_path / "last", progress=False).train()
    first, last = result.train_log[0][1], result.train_log[-1][1]
    assert last < first / 2, (first, last)


# -- the loop ----------------------------------------------------------------------------

def test_loss_decreases_on_a_repeated_corpus(tmp_path):
    data = synthetic("the cat sat on the mat. " * 200, "the cat sat on the mat. " * 20)
    p = make_params(train={"max_steps": 60, "eval_interval": 20, "checkpoint_interval": 100,
                           "learning_rate": 1e-2, "min_lr": 1e-3})
    result = Trainer(p, data, tmp_path / "best", tmp_path / "last", progress=False).train()
    losses = [row[1] for row in result.train_log]
    assert [row[0] for row in result.train_log] == list(range(1, 61))
    assert losses[0] > 0.8 * math.log(p.model.vocab_size)  # starts near uniform
    assert sum(losses[-5:]) / 5 < 0.3 * losses[0]
    vals = [v for _, v in result.val_log]
    assert [s for s, _ in result.val_log] == [20, 40, 60]
    assert vals[-1] < vals[0] and result.best_val_loss == min(vals)
    assert result.steps == 60 and not result.stopped_early and result.resumed_from_step == 0
    assert result.tokens_seen == 60 * 4 * 16
    assert all(math.isfinite(row[3]) and row[3] > 0 for row in result.train_log)  # tokens/s
    write_train_outputs(result, tmp_path / "metrics")
    summary = json.loads((tmp_path / "metrics/train.json").read_text())
    assert summary["steps"] == 60 and "train_log" not in summary
    csv = (tmp_path / "metrics/train_log.csv").read_text().splitlines()
    assert csv[0] == "step,train_loss,lr,tokens_per_s" and len(csv) == 61 and csv[1].startswith("1,")
    assert (tmp_path / "metrics/val_log.csv").read_text().splitlines()[1:] == [
        f"{s},{v:.6g}" for s, v in result.val_log]


def _record_grads(trainer: Trainer) -> list:
    """Grads as the optimizer sees them (after accumulation and clipping), per step."""
    seen = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append([p.grad.detach().clone() for p in trainer.model.parameters()]))
    return seen


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    data = synthetic("to be or not to be, that is the question. " * 50, "whether tis nobler " * 10)
    # AdamW: Muon orthogonalises in bf16, which turns float-rounding differences between the
    # two gradients into ~1e-3 weight differences and would blur the weight comparison below.
    common = {"max_steps": 3, "grad_clip": 0.0, "eval_interval": 100, "checkpoint_interval": 100,
              "optimizer": "adamw"}
    big = Trainer(make_params(train={**common, "batch_size": 8, "grad_accum_steps": 1}), data,
                  tmp_path / "a/best", tmp_path / "a/last", progress=False)
    acc = Trainer(make_params(train={**common, "batch_size": 4, "grad_accum_steps": 2}), data,
                  tmp_path / "b/best", tmp_path / "b/last", progress=False)
    for a, b in zip(big.model.parameters(), acc.model.parameters()):
        assert torch.equal(a, b)  # same seed, same init
    g_big, g_acc = _record_grads(big), _record_grads(acc)
    r_big, r_acc = big.train(), acc.train()
    # Two micro-batches of 4 draw the very windows one batch of 8 draws, so the
    # accumulated gradient is the big batch's gradient (up to float rounding).
    for a, b in zip(g_big[0], g_acc[0]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert r_big.train_log[0][1] == pytest.approx(r_acc.train_log[0][1], rel=1e-5)
    assert len(g_acc) == 3 and r_acc.steps == 3
    assert r_acc.tokens_seen == r_big.tokens_seen == 3 * 8 * 16
    for a, b in zip(big.model.parameters(), acc.model.parameters()):
        assert torch.allclose(a, b, atol=1e-4)


def test_grad_clipping_bounds_the_norm(tmp_path):
    data = synthetic("abcdefghij" * 100, "jihgfedcba" * 10)

    def norms(clip: float) -> list[float]:
        t = Trainer(make_params(train={"max_steps": 4, "grad_clip": clip, "eval_interval": 100,
                                       "checkpoint_interval": 100}),
                    data, tmp_path / f"{clip}/best", tmp_path / f"{clip}/last", progress=False)
        seen = _record_grads(t)
        t.train()
        return [float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs])))
                for gs in seen]

    unclipped = norms(0.0)
    assert min(unclipped) > 0.2
    clipped = norms(0.05)
    assert len(clipped) == 4
    assert all(0.05 * 0.999 < n <= 0.05 * (1 + 1e-5) for n in clipped)


def test_early_stopping_and_best_checkpoint(tmp_path):
    # Validation text reverses every transition of the training text: the better the
    # model learns train, the worse val gets, so val peaks early and patience runs out.
    data = synthetic("abcdefgh" * 300, "hgfedcba" * 40)
    p = make_params(train={"max_steps": 200, "eval_interval": 5, "patience": 3,
                           "learning_rate": 1e-2, "min_lr": 1e-2, "warmup_steps": 0})
    trainer = Trainer(p, data, tmp_path / "best", tmp_path / "last", progress=False)
    result = trainer.train()
    assert result.stopped_early
    assert result.steps < p.train.max_steps
    assert result.steps == result.best_step + 3 * 5  # three evaluations without improvement
    vals = dict((int(s), v) for s, v in result.val_log)
    assert sorted(vals) == list(range(5, result.steps + 1, 5))
    assert result.best_val_loss == min(vals.values()) == vals[result.best_step]
    assert all(v >= result.best_val_loss for s, v in vals.items() if s > result.best_step)
    assert result.final_val_loss == vals[result.steps]
    assert result.tokens_seen == result.steps * 4 * 16
    # The best checkpoint holds the weights of best_step: loadable and scoring exactly best_val.
    model, tok, meta = load_checkpoint(tmp_path / "best")
    assert meta["step"] == result.best_step and meta["val_loss"] == result.best_val_loss
    assert meta["fingerprint"] == trainer.fingerprint
    assert tok.chars == data.tokenizer.chars
    trainer.model.load_state_dict(model.state_dict())
    assert trainer.estimate_val_loss() == result.best_val_loss


def test_model_vocab_smaller_than_tokenizer_is_a_config_error(tmp_path):
    from gptcore.config import ConfigError

    data = synthetic("abcdefgh" * 10, "hgfedcba" * 5)  # 8 characters + end-of-text
    with pytest.raises(ConfigError, match=r"model.vocab_size=8 is smaller than the tokenizer's 9 ids"):
        Trainer(make_params(vocab_size=8), data, tmp_path / "best", tmp_path / "last", progress=False)


def test_fingerprint_covers_params_and_data():
    a = synthetic("abcdefgh" * 10, "hgfedcba" * 5)
    p = make_params()
    fp = fingerprint(p, a.meta)
    assert fp == fingerprint(make_params(), dict(a.meta))
    assert fp != fingerprint(make_params(train={"learning_rate": 1e-3}), a.meta)
    assert fp != fingerprint(make_params(model={"dropout": 0.1}), a.meta)
    assert fp != fingerprint(p, {**a.meta, "extra": 1})
    assert fp != fingerprint(p, a.meta, world_size=2)  # each rank draws its own batches


# -- bit-exact resume in real processes --------------------------------------------------

SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from gptcore.checkpoint import save_checkpoint
    from gptcore.config import Params
    from gptcore.data.dataset import TokenData
    from gptcore.stage import run_stage
    from gptcore.training.loop import Trainer

    def main():
        data_dir, work, params_json, block_at = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
        params = Params.from_dict(json.loads(params_json))
        data = TokenData.load(data_dir)
        trainer = Trainer(params, data, work / "best", work / "last", progress=True)
        step = trainer._train_step

        def hold(lr):
            # After step `block_at`'s update, announce it and wait for the test to
            # signal (SIGINT) or kill (SIGKILL) this process, then continue.
            loss = step(lr)
            if trainer.state.step + 1 == block_at:
                print(f"AT {block_at}", flush=True)
                deadline = time.monotonic() + 60
                while not (work / "release").exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
            return loss

        trainer._train_step = hold
        result = trainer.train()
        save_checkpoint(work / "final", trainer.model, data.tokenizer)
        (work / "result.json").write_text(json.dumps(
            {**result.metrics(), "train_log": result.train_log, "val_log": result.val_log}))

    run_stage(main)
""")

RESUME_PARAMS = make_params(
    model={"dropout": 0.2},  # dropout draws from the global RNG: resume must restore it
    train={"dtype": "bfloat16", "max_steps": 40, "eval_interval": 10, "checkpoint_interval": 10,
           "warmup_steps": 5, "seed": 4321},
    vocab_size=66)


class Run:
    def __init__(self, script: Path, data_dir: Path, work: Path, params: Params = RESUME_PARAMS,
                 block_at: int = 0) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        (work / "release").unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RANK", "WORLD_SIZE"))}
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(data_dir), str(work), json.dumps(params.to_dict()),
             str(block_at)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def wait_until(self, line: str, timeout: float = 120) -> None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"no {line!r} from the training process within {timeout} s"
        got = self.proc.stdout.readline()
        assert got.strip() == line, f"expected {line!r}, got {got!r}; stderr:\n{self.proc.stderr.read()}"

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        (self.work / "release").touch()
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err

    def result(self) -> dict:
        return json.loads((self.work / "result.json").read_text())


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(directory / "model.safetensors"))


def _assert_same_run(a: Path, b: Path, resumed_from: int) -> None:
    ra, rb = json.loads((a / "result.json").read_text()), json.loads((b / "result.json").read_text())
    # [step, train_loss, lr] bit for bit; tokens/s is a timing and may differ.
    assert [r[:3] for r in ra["train_log"]] == [r[:3] for r in rb["train_log"]]
    assert ra["val_log"] == rb["val_log"]
    for key in ("best_val_loss", "final_val_loss", "best_step", "steps", "tokens_seen"):
        assert ra[key] == rb[key], key
    assert ra["resumed_from_step"] == 0 and rb["resumed_from_step"] == resumed_from
    for name in ("final", "best"):
        ta, tb = _tensors(a / name), _tensors(b / name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}/{k} differs"
    # The same model, step and metadata: byte-identical directories, save_id included.
    for f in sorted((a / "best").iterdir()):
        assert f.read_bytes() == (b / "best" / f.name).read_bytes(), f"best/{f.name} differs"
    assert sorted(p.name for p in (a / "best").iterdir()) == sorted(p.name for p in (b / "best").iterdir())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shakespeare_dir):
    """An uninterrupted run, started in the background while the interrupted runs go."""
    root = tmp_path_factory.mktemp("resume")
    script = root / "train_script.py"
    script.write_text(SCRIPT)
    run = Run(script, shakespeare_dir, root / "reference")
    yield root, script, run
    if run.proc.poll() is None:
        run.proc.kill()
        run.proc.wait()


def _reference_done(run: Run) -> Path:
    if run.proc.returncode is None:
        rc, err = run.finish()
        assert rc == 0, err
    return run.work


@pytest.mark.slow
def test_resume_after_sigint_is_bit_exact(reference, shakespeare_dir):
    root, script, ref = reference
    work = root / "sigint"
    run = Run(script, shakespeare_dir, work, block_at=17)
    run.wait_until("AT 17")
    run.proc.send_signal(signal.SIGINT)
    rc, err = run.finish()
    assert rc == 130, err
    assert "interrupted: SIGINT at step 17" in err and "run again to resume" in err
    assert "Traceback" not in err
    state = load_trainer_state(work / "last")
    assert state["step"] == 17 and len(state["train_log"]) == 17
    assert not (work / "result.json").exists()

    # A changed param is a different run: its trainer does not pick this state up.
    data = TokenData.load(shakespeare_dir)
    changed = make_params(model={"dropout": 0.2},
                          train={**asdict(RESUME_PARAMS.train), "learning_rate": 1e-3}, vocab_size=66)
    other = Trainer(changed, data, root / "x/best", work / "last", progress=False)
    assert not other.try_resume() and other.state.step == 0
    same = Trainer(RESUME_PARAMS, data, root / "y/best", work / "last", progress=False)
    assert same.try_resume() and same.state.step == 17
    assert (work / "last").exists()  # only read, never consumed

    rerun = Run(script, shakespeare_dir, work)
    rc, err = rerun.finish()
    assert rc == 0, err
    assert "resuming from step 17" in err
    _assert_same_run(_reference_done(ref), work, resumed_from=17)


@pytest.mark.slow
def test_resume_after_sigkill_uses_last_periodic_checkpoint(reference, shakespeare_dir):
    root, script, ref = reference
    work = root / "sigkill"
    run = Run(script, shakespeare_dir, work, block_at=27)
    run.wait_until("AT 27")
    run.proc.send_signal(signal.SIGKILL)  # no chance to save anything
    rc, _ = run.finish()
    assert rc == -signal.SIGKILL
    assert load_trainer_state(work / "last")["step"] == 20  # checkpoint_interval 10

    rerun = Run(script, shakespeare_dir, work)
    rc, err = rerun.finish()
    assert rc == 0, err
    assert "resuming from step 20" in err
    _assert_same_run(_reference_done(ref), work, resumed_from=20)



MUON_PARAMS = make_params(model={"dropout": 0.2},
                          train={**asdict(RESUME_PARAMS.train), "optimizer": "muon"}, vocab_size=66)


def _sigint_at_13_then_resume(tmp_path: Path, data_dir: Path, params: Params) -> dict:
    """SIGINT a real training process at step 13, check the saved state is taken up by a
    rerun that ends bit-identical to an uninterrupted reference; returns the state saved
    at the interrupt."""
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    ref = Run(script, data_dir, tmp_path / "reference", params=params)
    run = Run(script, data_dir, tmp_path / "sigint", params=params, block_at=13)
    run.wait_until("AT 13")
    run.proc.send_signal(signal.SIGINT)
    rc, err = run.finish()
    assert rc == 130, err
    state = load_trainer_state(tmp_path / "sigint/last")
    rerun = Run(script, data_dir, tmp_path / "sigint", params=params)
    rc, err = rerun.finish()
    assert rc == 0, err
    assert "resuming from step 13" in err
    _assert_same_run(_reference_done(ref), tmp_path / "sigint", resumed_from=13)
    return state


@pytest.mark.slow
def test_muon_resume_after_sigint_is_bit_exact(tmp_path, shakespeare_dir):
    """Muon's momentum buffers travel in the resume checkpoint beside AdamW's moments."""
    state = _sigint_at_13_then_resume(tmp_path, shakespeare_dir, MUON_PARAMS)
    assert set(state["optimizer"]) == {"adamw", "muon"}


VARIANT_PARAMS = make_params(model={"dropout": 0.2, "position": "rope", "qk_norm": True, "mlp_activation": "relu2",
                                    "norm": "rmsnorm", "zero_init_proj": True, "logit_softcap": 15.0},
                             train={**asdict(RESUME_PARAMS.train), "optimizer": "muon", "schedule": "wsd",
                                    "cooldown_fraction": 0.5, "muon_momentum_warmup": 20, "ema_decay": 0.9,
                                    "label_smoothing": 0.05},
                             vocab_size=66)


@pytest.mark.slow
def test_architecture_variants_resume_after_sigint_is_bit_exact(tmp_path, shakespeare_dir):
    """Every model.* variant on at once (rotary positions, QK-norm, ReLU², RMSNorm, zero
    output projections, logit soft-capping), with Muon, its momentum warm-up, the WSD schedule (interrupted
    in the warm-up, resumed into the cooldown), a weight average and label smoothing: the resumed run still ends
    bit-identical, the published (averaged) best checkpoint included."""
    state = _sigint_at_13_then_resume(tmp_path, shakespeare_dir, VARIANT_PARAMS)
    assert state["average"]["updates"] == 13


def test_weight_average_is_an_ema_swapped_in_exactly():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.2, warmup="tf")
    start = [p.detach().clone() for p in model.parameters()]
    expected = [t.clone() for t in start]
    for n in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update()
        decay = 2 / 11 if n == 1 else 0.2  # the warm-up (1 + n) / (10 + n), then the cap (3/12 > 0.2)
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, model.parameters())]
    assert all(torch.allclose(a, e) for a, e in zip(average.average, expected))
    trained = [p.detach().clone() for p in model.parameters()]
    with average.applied():
        assert all(torch.equal(p, a) for p, a in zip(model.parameters(), average.average))
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))  # restored bit for bit
    again = WeightAverage(model, decay=0.2, warmup="tf")
    again.load_state_dict(average.state_dict())
    assert again.updates == 4 and all(torch.equal(a, b) for a, b in zip(again.average, average.average))
    with pytest.raises(ValueError, match="holds 1 tensors of other shapes than the model's 2"):
        again.load_state_dict({"updates": 1, "average": [start[0]]})


def test_mean_warm_up_is_the_running_mean_of_the_weights_until_the_cap_binds():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.8)  # the default warm-up: mean; binds at n = 4
    seen = [[p.detach().clone()] for p in model.parameters()]  # the initial weights count once
    for _ in range(4):
        with torch.no_grad():
            for p, s in zip(model.parameters(), seen):
                p.add_(torch.randn_like(p))
                s.append(p.detach().clone())
        average.update()
    for a, s in zip(average.average, seen):
        torch.testing.assert_close(a, torch.stack(s).mean(0))
    # then the cap: each later update moves the average by 1 - 0.8 of the gap
    assert [warmed_decay(0.8, "mean", n) for n in (1, 3, 4, 5, 100)] == [0.5, 0.75, 0.8, 0.8, 0.8]
    assert [warmed_decay(0.995, w, n) for w, n in (("mean", 199), ("tf", 1000), ("tf", 1790))] == pytest.approx(
        [0.995, 1001 / 1010, 0.995])
    with pytest.raises(ValueError, match="ema warm-up 'linear': allowed: mean, tf"):
        WeightAverage(model, decay=0.8, warmup="linear")
    for warmup in WARMUPS:  # the config allows exactly the warm-ups the average knows
        assert make_params(train={"ema_warmup": warmup}).train.ema_warmup == warmup
    with pytest.raises(ConfigError, match=r"ema_warmup.*mean \| tf"):
        make_params(train={"ema_warmup": "linear"})
    assert fingerprint(make_params(train={"ema_warmup": "tf"}), {}) != fingerprint(make_params(), {})


def test_ema_is_what_validation_measures_and_the_best_checkpoint_publishes(tmp_path):
    data = synthetic(REPEATED, REPEATED[:400])
    p = make_params(train={"ema_decay": 0.8, "max_steps": 20, "eval_interval": 10})
    trainer = Trainer(p, data, tmp_path / "best", tmp_path / "last", progress=False)
    result = trainer.train()
    raw = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    best, _, meta = load_checkpoint(tmp_path / "best")
    assert meta["step"] == result.best_step == 20
    with trainer.average.applied():
        averaged = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert all(torch.equal(best.state_dict()[k], averaged[k]) for k in averaged)
    assert not all(torch.equal(averaged[k], raw[k]) for k in raw)  # the average, not the last step
    trainer.model.load_state_dict(best.state_dict())
    assert trainer.estimate_val_loss() == result.best_val_loss == result.val_log[-1][1]
    trainer.model.load_state_dict(raw)
    assert trainer.estimate_val_loss() != result.best_val_loss
    off = make_params(train={"max_steps": 20, "eval_interval": 10})
    assert fingerprint(off, {}) != fingerprint(p, {})  # a different run: never resumed into
    with pytest.raises(ConfigError, match=r"ema_decay.*0 <= ema_decay < 1"):
        make_params(train={"ema_decay": 1.0})


def _unused_mass(model: torch.nn.Module, data: TokenData, used: int) -> float:
    """Mean probability the model puts on the vocabulary rows no text contains (ids >= used)."""
    with torch.no_grad():
        logits, _ = model(torch.as_tensor(data.val[:16], dtype=torch.long)[None])
    return float(torch.softmax(logits.float(), dim=-1)[..., used:].sum(-1).mean())


def test_label_smoothing_trains_smoothed_targets_and_validates_plain_cross_entropy(tmp_path):
    """``train.label_smoothing`` changes the training loss only: the first step's loss is
    the smoothed one, validation still measures the plain cross-entropy (the best checkpoint
    scores exactly the logged val loss), and rows of tokens no training text contains keep
    probability instead of being driven towards zero."""
    data = synthetic(REPEATED, REPEATED[:400])
    used = data.tokenizer.vocab_size
    runs = {}
    for e in (0.0, 0.1):
        # no weight average: a 100-step running mean would still carry the initial weights' mass
        p = make_params(train={"label_smoothing": e, "max_steps": 100, "eval_interval": 50,
                               "learning_rate": 1e-2, "min_lr": 1e-3, "ema_decay": 0.0})
        trainer = Trainer(p, data, tmp_path / f"best{e}", tmp_path / f"last{e}", progress=False)
        runs[e] = (trainer, trainer.train())
    plain, smoothed = runs[0.0][1], runs[0.1][1]
    # Same seed, same initial weights and batch: only the loss differs at the first step.
    assert smoothed.train_log[0][1] != plain.train_log[0][1]
    best, _, _ = load_checkpoint(tmp_path / "best0.1")
    runs[0.1][0].model.load_state_dict(best.state_dict())
    assert runs[0.1][0].estimate_val_loss() == smoothed.best_val_loss  # plain CE, not smoothed
    assert used < 128
    # At equilibrium the unused rows hold e * (128 - used) / 128 = 0.077 of each prediction.
    assert _unused_mass(best, data, used) > 0.05 > 10 * _unused_mass(load_checkpoint(tmp_path / "best0.0")[0],
                                                                       data, used)
    tokens = torch.as_tensor(data.train[:17], dtype=torch.long)
    x, y, model = tokens[None, :16], tokens[None, 1:], runs[0.0][0].model
    with torch.no_grad():  # the model's own unfused path agrees with the fused one
        _, fused = model(x, y, return_logits=False, label_smoothing=0.1)
        _, reference = model(x, y, label_smoothing=0.1)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    assert fingerprint(make_params(train={"label_smoothing": 0.1}), {}) != fingerprint(make_params(), {})
    with pytest.raises(ConfigError, match=r"label_smoothing.*0 <= label_smoothing < 1"):
        make_params(train={"label_smoothing": 1.0})


def test_val_split_shorter_than_block_size_fails_before_training(tmp_path):
    data = synthetic("abcdefgh" * 50, "hgfedcba")  # 8 val tokens, block_size 16
    with pytest.raises(DataError, match=r"val split has 8 tokens, fewer than block_size \+ 1 = 17"):
        Trainer(make_params(), data, tmp_path / "best", tmp_path / "last", progress=False)
    assert not (tmp_path / "best").exists()


# -- precision, compile, deferred loss reads ---------------------------------------------

REPEATED = "the quick brown fox jumps over the lazy dog. " * 40


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_float16_trains_with_a_gradient_scaler(tmp_path):
    data = synthetic(REPEATED, REPEATED[:400])
    p = make_params(train={"dtype": "float16", "max_steps": 20}, vocab_size=64)
    trainer = Trainer(p, data, tmp_path / "best", tmp_path / "last", progress=False)
    assert trainer.dtype == "float16" and trainer.scaler.is_enabled()
    result = trainer.train()
    losses = [row[1] for row in result.train_log]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.8 * losses[0]
    # The scaler's state travels in the resume checkpoint (saved at step 10).
    saved = load_trainer_state(tmp_path / "last")["scaler"]
    assert saved["scale"] == 2.0 ** 16 and saved["_growth_tracker"] == 10  # no overflow in 10 steps
    # bfloat16 and float32 need no scaler: theirs is disabled and saves nothing.
    bf16 = Trainer(make_params(train={"dtype": "bfloat16"}, vocab_size=64), data, tmp_path / "b/best",
                   tmp_path / "b/last", progress=False)
    assert not bf16.scaler.is_enabled() and bf16.state_dict()["scaler"] == {}


def test_float16_overflow_skips_the_update_and_lowers_the_scale(tmp_path):
    data = synthetic(REPEATED, REPEATED[:400])
    p = make_params(train={"dtype": "float16", "optimizer": "adamw"}, vocab_size=64)
    trainer = Trainer(p, data, tmp_path / "best", tmp_path / "last", progress=False)
    # A loss scale far too large: the float16 backward overflows, as a real run's can.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    before = _weights(trainer.model)
    loss = trainer._train_step(1e-3)
    assert math.isfinite(loss)  # the loss itself is fine; its scaled gradients are not
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())  # skipped
    assert trainer.scaler.get_scale() == 2.0 ** 39
    for _ in range(40):  # halves until the gradients fit, then updates
        trainer._train_step(1e-3)
        if not all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items()):
            break
    else:
        pytest.fail("the scale never came down far enough for an update")
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())


FP16_PARAMS = make_params(model={"dropout": 0.2},
                          train={**asdict(RESUME_PARAMS.train), "dtype": "float16", "optimizer": "adamw"},
                          vocab_size=66)


@pytest.mark.slow
def test_float16_resume_after_sigint_is_bit_exact(tmp_path, shakespeare_dir):
    """The loss scale and its growth count travel in the resume checkpoint."""
    scaler = _sigint_at_13_then_resume(tmp_path, shakespeare_dir, FP16_PARAMS)["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] > 0  # 13 steps since any overflow
    # Both runs saved step 30 last: the growth count restored at 13 counted on to the same.
    a, b = (load_trainer_state(tmp_path / d / "last") for d in ("reference", "sigint"))
    assert a["step"] == b["step"] == 30 and a["scaler"] == b["scaler"]


@pytest.fixture
def fresh_dynamo():
    """Compiled code is cached per process: each test compiles from scratch."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_compile_trains_saves_plain_weights_and_resumes_bit_exact(tmp_path, capsys, fresh_dynamo):
    data = synthetic(REPEATED, REPEATED[:400])
    # dropout: compiled dropout draws its seeds from the global RNG the resume state restores.
    # No weight average: the published weights are then the live ones, compared below.
    compiled = make_params(train={"compile": True, "ema_decay": 0.0}, model={"dropout": 0.1}, vocab_size=64)
    run = Trainer(compiled, data, tmp_path / "c/best", tmp_path / "c/last")
    assert run._compiled is not None
    result = run.train()
    err = capsys.readouterr().err
    assert sum(line.startswith("compiled in ") for line in err.splitlines()) == 1, err
    assert "train.compile:" not in err  # no fallback
    losses = [row[1] for row in result.train_log]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.8 * losses[0]

    eager = Trainer(make_params(train={"compile": False, "ema_decay": 0.0}, model={"dropout": 0.1}, vocab_size=64),
                    data, tmp_path / "e/best", tmp_path / "e/last", progress=False)
    assert eager._compiled is None
    eager_result = eager.train()
    assert losses[0] == pytest.approx(eager_result.train_log[0][1], rel=0.02)  # same weights, own masks
    # Checkpoints hold the plain module's weights: the same names as an eager run's, loadable.
    assert _tensors(tmp_path / "c/best").keys() == _tensors(tmp_path / "e/best").keys()
    model, _, _ = load_checkpoint(tmp_path / "c/best")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), run.model.state_dict().values()))

    # Resumed from its step-10 checkpoint, the compiled run repeats steps 11-20 bit for bit...
    again = Trainer(compiled, data, tmp_path / "r/best", tmp_path / "c/last", progress=False)
    resumed = again.train()
    assert resumed.resumed_from_step == 10
    assert [r[:3] for r in resumed.train_log] == [r[:3] for r in result.train_log]
    assert resumed.val_log == result.val_log
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(),
                                                  run.model.state_dict().values()))
    # ...and compile is not part of the run's identity: an eager trainer picks the state up too.
    plain = Trainer(make_params(train={"compile": False, "ema_decay": 0.0}, model={"dropout": 0.1}, vocab_size=64),
                    data, tmp_path / "p/best", tmp_path / "c/last", progress=False)
    assert plain.try_resume() and plain.state.step == 10


def test_compile_failure_falls_back_to_eager_in_one_line(tmp_path, capsys, monkeypatch, fresh_dynamo):
    import torch._functorch.config
    import torch._inductor.config

    # A machine without a working C++ compiler, as inductor's CPU backend sees it; no
    # cached kernels may hide it.
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "/nonexistent/c++"))
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    data = synthetic(REPEATED, REPEATED[:400])
    common = {"max_steps": 5, "eval_interval": 5}
    fell_back = Trainer(make_params(train={**common, "compile": True}, model={"dropout": 0.1}, vocab_size=64),
                        data, tmp_path / "a/best", tmp_path / "a/last").train()
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.compile:")]
    assert len(notes) == 1 and notes[0].startswith("train.compile: torch.compile failed at the first step (")
    assert notes[0].endswith("; training eagerly") and "C++ compiler" in notes[0]
    eager = Trainer(make_params(train={**common, "compile": False}, model={"dropout": 0.1}, vocab_size=64),
                    data, tmp_path / "b/best", tmp_path / "b/last", progress=False).train()
    # The failed attempt left no trace: same batches, dropout masks and weights as eager.
    assert [r[:3] for r in fell_back.train_log] == [r[:3] for r in eager.train_log]
    assert fell_back.val_log == eager.val_log


def test_compile_auto_is_eager_on_cpu(tmp_path):
    trainer = Trainer(make_params(), synthetic(REPEATED, REPEATED[:400]), tmp_path / "best", tmp_path / "last",
                      progress=False)
    assert trainer.cfg.compile == "auto" and trainer._compiled is None


def _deferred_run(tmp_path, name: str, defer: bool) -> Trainer:
    p = make_params(train={"max_steps": 12, "log_interval": 4, "eval_interval": 6, "checkpoint_interval": 6},
                    vocab_size=64)
    trainer = Trainer(p, synthetic(REPEATED, REPEATED[:400]), tmp_path / f"{name}/best",
                      tmp_path / f"{name}/last", progress=False)
    trainer.defer_sync = defer  # what CUDA does; the bookkeeping is the same on any device
    return trainer


def test_deferred_loss_reads_log_every_step_as_the_eager_loop_does(tmp_path):
    got = _deferred_run(tmp_path, "d", True).train()
    want = _deferred_run(tmp_path, "n", False).train()
    assert [r[:3] for r in got.train_log] == [r[:3] for r in want.train_log]  # one row per step
    assert [r[0] for r in got.train_log] == list(range(1, 13))
    assert got.val_log == want.val_log
    assert all(row[3] > 0 for row in got.train_log) and got.train_time_s > 0
    # Steps 5 and 6 are read together before the step-6 evaluation: one window, one rate.
    assert got.train_log[4][3] == got.train_log[5][3]
    assert load_trainer_state(tmp_path / "d/last")["train_log"] == got.train_log[:6]  # flushed before saving


def test_deferred_loss_reads_still_stop_a_diverging_run_at_its_step(tmp_path, monkeypatch):
    from gptcore.model.gpt import GPT

    real, calls = GPT.forward, []

    def forward(self, *args, **kwargs):
        logits, loss = real(self, *args, **kwargs)
        calls.append(1)
        return logits, loss * float("inf") if len(calls) == 2 else loss  # step 2 overflows

    monkeypatch.setattr(GPT, "forward", forward)
    trainer = _deferred_run(tmp_path, "d", True)
    with pytest.raises(FloatingPointError, match=r"^training loss is inf at step 2: the run diverged; "
                                                 r"no model was published; lower train.learning_rate"):
        trainer.train()
    assert trainer.state.step == 4 and [r[0] for r in trainer.state.train_log] == [1]  # read at the step-4 flush


def test_wsd_schedule_holds_the_rate_then_cools_down_linearly():
    cfg = make_params(train={"schedule": "wsd", "cooldown_fraction": 0.25, "max_steps": 100, "warmup_steps": 10,
                             "learning_rate": 1e-3, "min_lr": 1e-4}).train
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)  # warmup
    assert all(lr_at(s, cfg) == 1e-3 for s in range(10, 76))  # stable until the last 25 steps
    assert lr_at(85, cfg) == pytest.approx(1e-3 - 0.4 * 9e-4)  # 10 of 25 cooldown steps done
    assert lr_at(100, cfg) == pytest.approx(1e-4) and lr_at(150, cfg) == pytest.approx(1e-4)
    cosine = make_params(train={"max_steps": 100, "warmup_steps": 10}).train
    assert lr_at(50, cosine) < lr_at(10, cosine)  # the default still decays from the start


def test_muon_momentum_warms_up_and_reaches_the_optimizer(tmp_path):
    p = make_params(train={"optimizer": "muon", "muon_momentum": 0.95, "muon_momentum_warmup": 4,
                           "max_steps": 6, "eval_interval": 6})
    assert [momentum_at(s, p.train) for s in range(6)] == pytest.approx([0.85, 0.875, 0.9, 0.925, 0.95, 0.95])
    assert momentum_at(0, make_params(train={"muon_momentum": 0.5, "muon_momentum_warmup": 4}).train) == 0.5
    data = synthetic(REPEATED, REPEATED[:400])
    trainer = Trainer(p, data, tmp_path / "best", tmp_path / "last", progress=False)
    muon = trainer.optimizer.optimizers["muon"]
    seen = []
    muon.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["momentum"]))
    trainer.train()
    assert seen == pytest.approx([0.85, 0.875, 0.9, 0.925, 0.95, 0.95])
    assert trainer.optimizer.optimizers["adamw"].param_groups[0]["betas"] == (p.train.beta1, p.train.beta2)
