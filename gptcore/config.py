"""Typed, validated configuration: the one description of every run.

``params.yaml`` is parsed into :class:`Params` (one dataclass per section). Every
field is type-checked and range-checked at construction, and unknown keys are
rejected, so a typo in params.yaml fails loudly before any output is touched.

The dataclass defaults *are* the default recipe: ``Params()`` equals the committed
params.yaml (a test holds them together). This module never imports torch, so
validation errors come instantly.
"""

from __future__ import annotations

import dataclasses
import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.sources import TINY_SHAKESPEARE
from .errors import ConfigError, invalid
from .schema import flatten, from_dict, read_yaml  # noqa: F401 - flatten: part of the config API


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(invalid(name, value, allowed))


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    _check(value in choices, name, value, " | ".join(map(str, choices)))


DROPOUT_SITES = ("embed", "attn", "resid")


@dataclass(frozen=True)
class GPTConfig:
    """Architecture of the GPT. Defaults are GPT-2's reference model (7,259,008 parameters):
    what a checkpoint or ``GPTConfig()`` without a key means, and what HF export expresses.
    The pipeline's model (``Params().model``, params.yaml) adds rotary positions and ReLU²."""

    vocab_size: int = 50257
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    # Where ``dropout`` applies: sites joined by "+" among embed (token + position
    # embeddings), attn (attention probabilities), resid (each block's two outputs). Not
    # commas: `dvc exp run -S model.dropout_at=a,b` would read them as a sweep of two runs.
    dropout_at: str = "embed+attn+resid"
    bias: bool = True
    attn_impl: str = "sdpa"  # "sdpa" (fast, default) or "math" (the explicit equations)
    layer_norm_eps: float = 1e-5
    # Architecture variants (GPT-2's choice first; each stays off until a sweep shows it wins).
    position: str = "learned"     # learned (GPT-2's wpe table) | rope (rotary, no position weights)
    qk_norm: bool = False         # RMS-normalise each head's queries and keys (no weights)
    mlp_activation: str = "gelu"  # gelu (tanh approximation) | relu2 (relu(x)^2)
    norm: str = "layernorm"       # layernorm | rmsnorm (weight only)
    zero_init_proj: bool = False  # start each block's output projections at zero
    logit_softcap: float = 0.0    # > 0: logits pass through cap * tanh(logits / cap); 0 = off

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                   name, value, "a positive integer")
        _check(self.n_embd % self.n_head == 0, "n_embd", self.n_embd,
               f"a multiple of n_head={self.n_head}")
        _check(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
               "dropout", self.dropout, "0 <= dropout < 1")
        sites = self.dropout_at.split("+") if isinstance(self.dropout_at, str) else [None]
        _check(len(set(sites)) == len(sites) and set(sites) <= set(DROPOUT_SITES), "dropout_at",
               self.dropout_at, "sites joined by '+', each at most once, among " + ", ".join(DROPOUT_SITES))
        # Type checks here too: GPTConfig(...) is also built directly, without from_dict.
        _check(isinstance(self.layer_norm_eps, (int, float)) and self.layer_norm_eps > 0,
               "layer_norm_eps", self.layer_norm_eps, "a number > 0")
        _check(isinstance(self.bias, bool), "bias", self.bias, "true | false")
        _check_choice("attn_impl", self.attn_impl, ("sdpa", "math"))
        _check_choice("position", self.position, ("learned", "rope"))
        _check_choice("mlp_activation", self.mlp_activation, ("gelu", "relu2"))
        _check_choice("norm", self.norm, ("layernorm", "rmsnorm"))
        for name in ("qk_norm", "zero_init_proj"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "true | false")
        _check(isinstance(self.logit_softcap, (int, float)) and not isinstance(self.logit_softcap, bool)
               and self.logit_softcap >= 0, "logit_softcap", self.logit_softcap, "a number >= 0 (0 = off)")
        if self.position == "rope":  # rotary pairs up each head's dimensions
            _check((self.n_embd // self.n_head) % 2 == 0, "n_embd", self.n_embd,
                   f"n_embd / n_head even with position: rope (head size {self.n_embd // self.n_head})")

    @classmethod
    def from_dict(cls, data: dict) -> GPTConfig:
        return from_dict(cls, data)

    def dropout_p(self, site: str) -> float:
        """The dropout rate at ``site`` (one of DROPOUT_SITES): ``dropout`` there, else 0."""
        return float(self.dropout) if site in self.dropout_at.split("+") else 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class CorpusSource:
    """One entry of ``data.sources``: exactly one of ``url`` (https, downloaded into
    ``data.raw_dir`` by the download stage) or ``path`` (a local file, a directory whose
    ``*.txt`` files are read recursively, or a glob), and an optional ``sha256`` that pins
    the file's bytes (URLs and single files only: a directory's contents change by design)."""

    url: str = ""
    path: str = ""
    sha256: str = ""

    def __post_init__(self) -> None:
        _check(bool(self.url) != bool(self.path), "sources entry", {k: v for k, v in
               (("url", self.url), ("path", self.path)) if v} or "{}",
               "exactly one of url: (https://...) or path: (a file, a directory of *.txt, or a glob)")
        if self.url:
            _check(self.url.startswith("https://") and len(self.url.split("/", 3)) == 4,
                   "url", self.url, "an https:// URL of a file")
            name = self.file_name
            _check(bool(name) and all(c.isalnum() or c in "._-" for c in name) and name[0] != ".",
                   "url", self.url, "a URL whose last path segment is a file name ([A-Za-z0-9._-])")
        _check(self.sha256 == "" or (len(self.sha256) == 64 and set(self.sha256) <= _HEX),
               "sha256", self.sha256, "64 lowercase hex digits, or empty")
        _check(not (self.sha256 and self.path and _is_pattern_or_dir(self.path)), "sha256",
               self.sha256, "only on a URL or a single file (a directory or glob can't be pinned: "
               "list its files one by one to pin them)")

    @property
    def file_name(self) -> str:
        """Where a URL source lands in ``data.raw_dir``: the URL path's last segment."""
        return self.url.split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]

    @property
    def where(self) -> str:
        return self.url or self.path


def is_glob(path: str) -> bool:
    return glob.has_magic(path)


def glob_base(path: str) -> Path:
    """The directory a path source can read from: the path itself, or for a glob the
    components before the first one with a wildcard (``data/r*/x.txt`` -> ``data``)."""
    parts = Path(path).expanduser().parts
    fixed = []
    for part in parts:
        if is_glob(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _is_pattern_or_dir(path: str) -> bool:
    return is_glob(path) or Path(path).expanduser().is_dir()


@dataclass(frozen=True)
class DataConfig:
    """What to train on, where the data lives and how it is split."""

    raw_dir: str = "data/raw"
    processed_dir: str = "data/processed"
    sources: tuple[CorpusSource, ...] = (CorpusSource(url=TINY_SHAKESPEARE.url,
                                                      sha256=TINY_SHAKESPEARE.sha256),)
    require_sha256: str = "urls"  # which sources must carry a sha256: urls | all | none
    split: str = "chars"  # chars: the last val_fraction of the characters | documents: whole files
    val_fraction: float = 0.1  # the last 10% of the characters
    retries: int = 4  # download retries, exponential backoff from 1 s
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        _check(len(self.sources) > 0, "sources", list(self.sources), "a non-empty list of url:/path: entries")
        _check_choice("require_sha256", self.require_sha256, ("urls", "all", "none"))
        _check_choice("split", self.split, ("chars", "documents"))
        for i, src in enumerate(self.sources):
            if self.require_sha256 == "all" and src.path and _is_pattern_or_dir(src.path):
                raise ConfigError(f"sources[{i}]={src.where!r} is invalid: data.require_sha256=all pins every "
                                  "file, and a directory or glob can't be pinned; allowed: list its files one "
                                  "by one with their sha256, or require_sha256: urls | none")
            needs = self.require_sha256 == "all" or (self.require_sha256 == "urls" and src.url)
            _check(not needs or bool(src.sha256), f"sources[{i}]", src.where,
                   f"an entry with sha256: (data.require_sha256={self.require_sha256} requires one; "
                   "'none' accepts unpinned sources and records their sha256 in meta.json)")
        names = [s.file_name for s in self.sources if s.url]
        dup = sorted({n for n in names if names.count(n) > 1} | ({"vocab.bpe", "encoder.json"} & set(names)))
        _check(not dup, "sources", dup, "URLs whose file names differ from each other and from "
               "vocab.bpe/encoder.json (each lands in data.raw_dir under its name)")
        _check(0.0 < self.val_fraction < 1.0, "val_fraction", self.val_fraction, "0 < val_fraction < 1")
        _check(self.retries >= 0, "retries", self.retries, ">= 0")
        _check(self.timeout_s > 0, "timeout_s", self.timeout_s, "> 0")


GPT2_VOCAB = 50257
MAX_BPE_VOCAB = 1 << 18


@dataclass(frozen=True)
class TokenizerConfig:
    kind: str = "gpt2"  # gpt2 (GPT-2's BPE, tiktoken) | bpe (a BPE trained on the train split) | char
    # kind: bpe: ids of the trained vocabulary, end-of-text included (gpt2 and char ignore it).
    vocab_size: int = 4096

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, ("gpt2", "bpe", "char"))
        _check(isinstance(self.vocab_size, int) and not isinstance(self.vocab_size, bool)
               and 258 <= self.vocab_size <= MAX_BPE_VOCAB, "vocab_size", self.vocab_size,
               f"an integer from 258 (256 bytes, one merge, end-of-text) to {MAX_BPE_VOCAB:,}")


def auto_vocab_size(tokenizer: TokenizerConfig) -> int:
    """``model.vocab_size: auto``: the tokenizer's id count, where params.yaml decides it."""
    if tokenizer.kind == "gpt2":
        return GPT2_VOCAB
    if tokenizer.kind == "bpe":
        return tokenizer.vocab_size
    raise ConfigError("model.vocab_size=auto: a char vocabulary's size depends on the text; allowed: the "
                      "vocab_size the tokenize stage prints (66 for Tiny Shakespeare: 65 characters + end-of-text)")


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "models"
    # Where training starts (gptcore/training/init_from.py): scratch | a checkpoint directory |
    # models:/gptcore@ALIAS or models:/gptcore/N | hf:<Hugging Face directory>.
    init_from: str = "scratch"
    seed: int = 1337
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | mps
    # Matmul dtype under autocast (weights and optimizer state stay fp32): float32 | bfloat16 |
    # float16 (with a gradient scaler). A device that lacks it falls back, saying so.
    dtype: str = "bfloat16"
    # torch.compile the training step: auto (on CUDA only: on CPU compiling bought memory,
    # not speed; docs/devices.md) | true | false. YAML booleans, or "auto".
    compile: bool | str = "auto"
    batch_size: int = 8
    grad_accum_steps: int = 1
    max_steps: int = 1000
    optimizer: str = "muon"  # adamw | muon (Muon for the blocks' matrices, AdamW for the rest)
    learning_rate: float = 1.5e-3
    min_lr: float = 1.5e-4
    warmup_steps: int = 50
    weight_decay: float = 0.3
    beta1: float = 0.9
    beta2: float = 0.99
    muon_lr_scale: float = 3.0  # Muon's rate = this x the scheduled learning_rate (optimizer: muon)
    embed_lr_scale: float = 1.0  # the embedding tables' (and tied head's) AdamW rate = this x learning_rate
    scalar_lr_scale: float = 1.0  # norm gains' and biases' AdamW rate = this x learning_rate
    muon_momentum: float = 0.95
    # Muon's momentum rises linearly from min(0.85, muon_momentum) to muon_momentum over
    # this many steps (modded-nanogpt's warm-up); 0 = constant.
    muon_momentum_warmup: int = 0
    # cosine: warmup, then cosine decay to min_lr | wsd: warmup, constant, then a linear
    # cooldown to min_lr over the last cooldown_fraction of max_steps.
    schedule: str = "cosine"
    cooldown_fraction: float = 0.2
    # > 0: keep an exponential moving average of the weights (at most this decay per
    # step); validation measures it and the best checkpoint is it. 0 = off.
    ema_decay: float = 0.995
    # How the average's decay warms up after n updates (gptcore/training/averaging.py):
    # mean = n / (1 + n), the running mean until the cap binds | tf = (1 + n) / (10 + n).
    ema_warmup: str = "mean"
    # > 0: train against (1 - e) one-hot + e uniform targets (additive smoothing: tokens
    # the training text never contains keep about e / vocab of probability). Validation
    # and evaluation always measure the plain cross-entropy. 0 = off.
    label_smoothing: float = 0.02
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 100
    eval_batches: int = 10
    patience: int = 4  # evaluations without improvement before stopping; 0 = never
    checkpoint_interval: int = 100  # steps between resume checkpoints
    log_interval: int = 10
    threads: int = 0  # 0 = torch's default (all cores)

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum_steps", "max_steps", "eval_interval",
                     "eval_batches", "checkpoint_interval", "log_interval"):
            _check(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        for name in ("warmup_steps", "threads", "seed", "muon_momentum_warmup"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), ">= 0")
        _check(self.patience >= 0, "patience", self.patience, ">= 0 (0 disables patience)")
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "> 0")
        _check(0 <= self.min_lr <= self.learning_rate, "min_lr", self.min_lr,
               f"0 <= min_lr <= learning_rate ({self.learning_rate})")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.beta1 < 1, "beta1", self.beta1, "0 <= beta1 < 1")
        _check(0 <= self.beta2 < 1, "beta2", self.beta2, "0 <= beta2 < 1")
        _check(self.grad_clip >= 0, "grad_clip", self.grad_clip, ">= 0 (0 disables clipping)")
        _check(isinstance(self.init_from, str) and self.init_from.strip() == self.init_from != ""
               and self.init_from not in ("hf:", "models:/"), "init_from", self.init_from,
               "scratch | a checkpoint directory | models:/gptcore@ALIAS | models:/gptcore/N | hf:<directory>")
        _check_choice("device", self.device, ("auto", "cpu", "cuda", "mps"))
        _check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        # isinstance, not ==: 1 == True, and a stray integer is a typo, not a choice.
        _check(self.compile == "auto" or isinstance(self.compile, bool), "compile", self.compile,
               "auto | true | false")
        _check_choice("optimizer", self.optimizer, ("adamw", "muon"))
        for name in ("muon_lr_scale", "embed_lr_scale", "scalar_lr_scale"):
            _check(getattr(self, name) > 0, name, getattr(self, name), "> 0")
        _check(0 <= self.muon_momentum < 1, "muon_momentum", self.muon_momentum, "0 <= muon_momentum < 1")
        _check_choice("schedule", self.schedule, ("cosine", "wsd"))
        _check(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "0 <= ema_decay < 1 (0 = off)")
        _check_choice("ema_warmup", self.ema_warmup, ("mean", "tf"))
        _check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing,
               "0 <= label_smoothing < 1 (0 = off)")
        _check(0 < self.cooldown_fraction <= 1, "cooldown_fraction", self.cooldown_fraction,
               "0 < cooldown_fraction <= 1")


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 8
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "batch_size", self.batch_size, "a positive integer")
        _check_choice("dtype", self.dtype, ("float32", "bfloat16"))


# Where the pipeline's model differs from GPTConfig's defaults (GPT-2's architecture, which
# saved checkpoints and HF export rely on): rotary positions and ReLU² MLPs, the winners of
# the architecture sweep (docs/results.md). The training recipe's choices are TrainConfig's own defaults.
PIPELINE_MODEL = {"position": "rope", "mlp_activation": "relu2"}


@dataclass(frozen=True)
class Params:
    """Everything in params.yaml."""

    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: GPTConfig = field(default_factory=lambda: GPTConfig(**PIPELINE_MODEL))
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    # The sample stage's settings stay a mapping here: they are generation's, validated by
    # gptcore.generation.sampling.sample_settings() in the sample stage. Validating them here would make
    # the sampling module a dependency of every stage, and editing it would retrain.
    sample: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_paths(self)

    @classmethod
    def from_dict(cls, data: dict) -> Params:
        # A model section that omits a key means the pipeline's choice, as omitting the
        # whole section does, not GPTConfig's (GPT-2's) default.
        if isinstance(data, dict) and (data.get("model") is None or isinstance(data["model"], dict)):
            model = {**PIPELINE_MODEL, **(data.get("model") or {})}
            if model.get("vocab_size", "auto") == "auto":  # the tokenizer's size, once that is validated
                tokenizer = data.get("tokenizer")
                tokenizer = from_dict(TokenizerConfig, {} if tokenizer is None else tokenizer, "tokenizer")
                model["vocab_size"] = auto_vocab_size(tokenizer)
            data = {**data, "model": model}
        return from_dict(cls, data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_paths(p: Params) -> None:
    """Each stage's outputs in their own directory: a collision would overwrite another stage's."""
    dirs = {"data.raw_dir": p.data.raw_dir, "data.processed_dir": p.data.processed_dir,
            "train.out_dir": p.train.out_dir}
    norm = {k: Path(v).expanduser().resolve() for k, v in dirs.items()}
    names = list(dirs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if norm[a] == norm[b] or norm[a] in norm[b].parents or norm[b] in norm[a].parents:
                raise ConfigError(f"{a}={dirs[a]!r} and {b}={dirs[b]!r} overlap; allowed: separate "
                                  "directories, neither inside the other")
    # DVC deletes a stage's outputs before it runs the stage: a corpus kept inside one
    # would be lost. Refuse that before anything runs.
    for i, src in enumerate(p.data.sources):
        if not src.path:
            continue
        try:
            root = glob_base(src.path).resolve()
        except (RuntimeError, OSError) as exc:  # Python < 3.13 raises RuntimeError for a loop
            raise ConfigError(f"data.sources[{i}].path={src.path!r} is a symlink loop or unreadable ({exc}); "
                              "allowed: a file, a directory of *.txt files, or a glob") from None
        for key, d in norm.items():
            # Inside an output, or a folder above one (read recursively): either reads pipeline
            # outputs. A glob's matches are checked file by file when the corpus is read.
            above = not is_glob(src.path) and Path(src.path).expanduser().is_dir() and root in d.parents
            if root == d or d in root.parents or above:
                raise ConfigError(f"data.sources[{i}].path={src.path!r} overlaps {key}={dirs[key]!r}, a "
                                  "pipeline output that DVC deletes and rebuilds; allowed: a path that neither "
                                  "lies in nor contains data.raw_dir, data.processed_dir or train.out_dir "
                                  "(e.g. data/corpus/)")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; errors name the file and the field."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        return Params.from_dict(raw or {})
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
