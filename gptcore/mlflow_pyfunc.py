"""The MLflow pyfunc model, logged *from code*: MLflow copies this file into the logged
model and runs it at load time, so loading unpickles nothing (no cloudpickle, no .pkl).

    mlflow.pyfunc.load_model("models:/gptcore@champion").predict(
        ["ROMEO:", "HAMLET:"], params={"temperature": 0, "max_new_tokens": 20})

Input: prompts (a list of strings, or a DataFrame with a string column ``prompt``).
Output: their completions, one string each (the prompt not included). Params: the
sampling settings of ``gptcore generate``, each with its default (``SIGNATURE`` below);
``seed`` -1 means a fresh random seed. Each prompt is generated as ``gptcore generate``
generates it, so the same settings give the same completions. ``max_new_tokens`` is capped
at ``MAX_NEW_TOKENS`` (1,024, gptcore serve's default cap). A bad param is a ValueError naming
it; ``mlflow models serve`` answers it with 400 and that line after its own "Failed to predict
data" line, with no traceback.

The checkpoint is the model's artifact ``checkpoint`` (the directory ``models/best``),
read by the same safe loader as any checkpoint (safetensors, no pickle).
"""

from __future__ import annotations

import mlflow
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from gptcore.generation.sampling import MAX_NEW_TOKENS, SamplingConfig  # torch-free

_D = SamplingConfig()  # the defaults of `gptcore generate`
# name -> (MLflow type, default, SamplingConfig field)
PARAMS = {
    "max_new_tokens": ("long", _D.max_new_tokens, "max_new_tokens"),
    "temperature": ("double", _D.temperature, "temperature"),
    "top_k": ("long", _D.top_k, "top_k"),
    "top_p": ("double", _D.top_p, "top_p"),
    "repetition_penalty": ("double", _D.repetition_penalty, "repetition_penalty"),
    "seed": ("long", -1, "seed"),  # -1: a fresh random seed (a param cannot default to None)
}

# One string column. Unnamed: MLflow's schema check refuses a plain list of prompts for a
# named column, and `predict(["ROMEO:", "HAMLET:"])` is how people call it; a DataFrame's
# column `prompt` (or its only column) is read as well.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string")]),
    outputs=Schema([ColSpec("string", "completion")]),
    params=ParamSchema([ParamSpec(name, dtype, default) for name, (dtype, default, _) in PARAMS.items()]
                       + [ParamSpec("stop", "string", [], shape=(-1,))]),
)


def _prompts(model_input) -> list[str]:
    if hasattr(model_input, "columns"):  # a DataFrame (what serving hands over)
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        values = model_input[column].tolist()
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        values = list(model_input)
    if not all(isinstance(v, str) for v in values):
        raise ValueError("inputs must be prompts: strings, or a DataFrame column 'prompt' of strings")
    return values


class GptcoreModel(PythonModel):
    def load_context(self, context) -> None:
        from gptcore.checkpoint import load_checkpoint

        self.model, self.tokenizer, self.meta = load_checkpoint(context.artifacts["checkpoint"])

    def predict(self, context, model_input, params=None) -> list[str]:
        from gptcore.generation.generate import generate

        try:
            cfg = settings(params or {})
            prompts = _prompts(model_input)
        except (ValueError, TypeError) as exc:
            # MLflow's scoring server answers an MlflowException with its message alone (400);
            # anything else became "Encountered an unexpected error" and a 25-line traceback
            # holding the server's paths, the reason on its last line.
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        return [generate(self.model, self.tokenizer, prompt, cfg) for prompt in prompts]


def settings(params: dict) -> SamplingConfig:
    """The request's params as sampling settings; ValueError (a ConfigError) names a bad one."""
    values = {field: params.get(name, default) for name, (_, default, field) in PARAMS.items()}
    if values["max_new_tokens"] > MAX_NEW_TOKENS:  # greedy text may never reach end-of-text
        raise ValueError(f"max_new_tokens={values['max_new_tokens']} is over this model's cap; "
                         f"allowed: 0 <= max_new_tokens <= {MAX_NEW_TOKENS}")
    if values["seed"] is not None and values["seed"] < 0:
        values["seed"] = None
    return SamplingConfig(**values, stop=tuple(params.get("stop") or ()))


mlflow.models.set_model(GptcoreModel())
