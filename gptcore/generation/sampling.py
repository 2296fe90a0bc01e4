"""Sampling settings: how generation picks each next token, and the sample stage's
``sample:`` section of params.yaml (:class:`SampleConfig`, validated by
:func:`sample_settings`).

Generation's own module, imported by nothing that trains: editing it re-runs only the
sample stage. Kept free of torch so ``gptcore --help`` and validation are instant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from ..config import Params
from ..errors import ConfigError, invalid
from ..schema import from_dict

__all__ = ["MAX_NEW_TOKENS", "MIN_TEMPERATURE", "SampleConfig", "SamplingConfig", "sample_settings"]

# Below this a temperature is greedy (0): dividing logits by it leaves only exact ties to
# chance, and far below it float32 overflows (1e-40 made every score infinite and drew
# end-of-text: empty text, reported as a normal stop).
MIN_TEMPERATURE = 1e-5
# The most tokens one completion may ask a server for (gptcore serve's default --max-tokens,
# and the MLflow model's cap): greedy text can loop forever without reaching end-of-text.
MAX_NEW_TOKENS = 1024


def _fail(name: str, value, allowed: str) -> None:
    raise ConfigError(invalid(name, value, allowed))


def _is_int(v) -> bool:
    """An int but not a bool: True == 1, yet a stray true where a count belongs is a typo."""
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick each new token.

    ``max_new_tokens`` may be 0 (nothing is generated). ``temperature`` 0 means greedy
    (argmax; ties go to the lowest token id), and so does any below ``MIN_TEMPERATURE``.
    ``top_k`` 0 and ``top_p`` 1 switch those filters off; ``repetition_penalty`` 1 does.
    ``stop`` is a sequence of non-empty strings (a single string counts as one stop string;
    stored as a tuple). ``seed`` None draws a fresh random seed per call.
    """

    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stop_at_eot: bool = True

    def __post_init__(self) -> None:
        if not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 0):
            _fail("max_new_tokens", self.max_new_tokens, "an integer >= 0")
        if not (_is_number(self.temperature) and self.temperature >= 0):
            _fail("temperature", self.temperature, "a number >= 0 (0 = greedy)")
        if not (_is_int(self.top_k) and self.top_k >= 0):
            _fail("top_k", self.top_k, "an integer >= 0 (0 = off)")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            _fail("top_p", self.top_p, "a number with 0 < top_p <= 1 (1 = off)")
        if not (_is_number(self.repetition_penalty) and self.repetition_penalty > 0):
            _fail("repetition_penalty", self.repetition_penalty, "a number > 0 (1 = off)")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not (isinstance(stop, (list, tuple)) and all(isinstance(s, str) and s for s in stop)):
            _fail("stop", self.stop, "a list of non-empty strings")
        if not (self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63)):
            _fail("seed", self.seed, "None or an integer 0 <= seed < 2**63")
        if not isinstance(self.stop_at_eot, bool):
            _fail("stop_at_eot", self.stop_at_eot, "true | false")
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "temperature", float(self.temperature) if self.temperature >= MIN_TEMPERATURE else 0.0)
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def for_sample(self, i: int) -> SamplingConfig:
        """The settings of sample ``i`` of several: seed + i (so it is what a lone decode
        with that seed gives), or a fresh random seed when ``seed`` is None."""
        return self if self.seed is None else replace(self, seed=self.seed + i)

    def describe(self) -> str:
        return " ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))


@dataclass(frozen=True)
class SampleConfig(SamplingConfig):
    """The sample stage: every :class:`SamplingConfig` setting, the prompts, and a fixed
    seed so the committed samples are reproducible."""

    top_k: int = 200
    top_p: float = 0.95
    seed: int | None = 1337
    prompts: list[str] = field(default_factory=lambda: ["HAMLET:", "First Citizen:", "ROMEO:"])

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.prompts:
            _fail("prompts", self.prompts, "a non-empty list of strings")


def sample_settings(params: Params, source: str = "params.yaml") -> SampleConfig:
    """params.yaml's ``sample:`` section, validated; errors name the file and the field."""
    try:
        return from_dict(SampleConfig, params.sample, "sample")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None

