"""The model as MLflow sees it: a pyfunc model (from code, no pickle), a version of the
registered model ``gptcore`` per train run, and the ``champion`` alias.

* The train stage logs ``models/best`` as a pyfunc model (``mlflow_pyfunc.py`` plus the
  checkpoint as its artifact and this package as its code) and registers it as a new
  version (:func:`register`); the run carries the version in its ``gptcore.model_version``
  tag.
* The evaluate stage tags that version with its scores, the validation data digest, the
  git commit and the DVC experiment, and moves aliases (:func:`score`):
  ``champion-<val digest>`` always names the best version *on that validation data*
  (so the first version on a new corpus becomes that corpus's champion), and
  ``champion`` names the best version on the data of the current champion: a run on
  another corpus never replaces it. The very first scored version becomes ``champion``.
* ``gptcore promote`` sets ``champion`` by hand (:func:`promote`); ``--model URI`` on
  ``gptcore generate``/``serve`` loads any model URI (:func:`download_checkpoint`).

Every function here takes an ``MlflowClient``; the stages call them through
``tracking.Tracker``, which turns any store failure into one warning line.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from . import store
from .errors import CheckpointError
from .io import current_dir

REGISTERED_MODEL = "gptcore"
CHAMPION = "champion"
VERSION_TAG = "gptcore.model_version"
MODEL_ID_TAG = "gptcore.model_id"  # a run's tag: its logged model
# The registered model's tag `gptcore promote` sets: the newest version number when the
# champion was picked by hand; only versions after it compete with that pick.
PROMOTE_FLOOR_TAG = "gptcore.promote_floor"
PYFUNC_CODE = Path(__file__).with_name("mlflow_pyfunc.py")


def requirements() -> list[str]:
    """What loading the model needs, pinned to what trained it (a CPU build's "+cpu"
    suffix dropped: pip indexes name the version alone)."""
    from importlib.metadata import version

    names = ["torch", "tiktoken", "safetensors", "numpy", "pyyaml", "mlflow"]
    return [f"{n}=={version(n).split('+')[0]}" for n in names]


def save_pyfunc(checkpoint: str | Path, dst: str | Path) -> Path:
    """Write the pyfunc model directory for ``checkpoint`` to ``dst``, in a child process.

    MLflow executes the model's code file while saving it, and that file imports
    generation's modules. In the train stage's own process those imports would make
    generation code a dependency of training (``tests/test_layout.py`` records what a
    stage imports), and editing a sampling default would retrain; the logged model is an
    MLflow artifact, not one of the stage's DVC outputs, so it is built beside it.
    """
    done = subprocess.run([sys.executable, "-m", "gptcore.registry", "save", str(checkpoint), str(dst)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise RuntimeError(f"saving the pyfunc model failed: {lines[-1] if lines else done.returncode}")
    return Path(dst)


def _save_pyfunc_here(checkpoint: str | Path, dst: str | Path) -> None:
    import mlflow.pyfunc

    from .mlflow_pyfunc import SIGNATURE

    mlflow.pyfunc.save_model(
        path=str(dst), python_model=str(PYFUNC_CODE), artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(Path(__file__).parent)], signature=SIGNATURE, pip_requirements=requirements(),
        input_example=(["ROMEO:"], {"max_new_tokens": 4, "temperature": 0.0}))


def register(client, run_id: str, model_id: str, tags: dict[str, str] | None = None) -> str:
    """A new version of ``gptcore`` for the logged model ``model_id``, with ``tags``; its number."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(REGISTERED_MODEL)
    except MlflowException:
        client.create_registered_model(REGISTERED_MODEL, description=(
            "GPT checkpoints trained by the gptcore pipeline; alias 'champion' = the best eval "
            "val loss on the champion's validation data, 'champion-DIGEST8' = the best per validation data"))
    version = client.create_model_version(REGISTERED_MODEL, source=f"models:/{model_id}", run_id=run_id,
                                          model_id=model_id, tags=tags or None)
    client.set_tag(run_id, VERSION_TAG, version.version)
    return version.version


def _loss(version) -> float:
    try:
        return float(version.tags.get("eval_val_loss", "nan"))
    except ValueError:
        return math.nan


def score(client, run_id: str, metrics: dict, data_digest: str, tags: dict[str, str]) -> str | None:
    """Tag the run's version with its scores and move the aliases it has earned; a line
    saying what happened (None when the run registered no version)."""
    number = client.get_run(run_id).data.tags.get(VERSION_TAG)
    if number is None:
        return None
    loss = float(metrics["val_loss"])
    for key, value in {"eval_val_loss": loss, "eval_bits_per_byte": metrics.get("bits_per_byte"),
                       "data_digest": data_digest, **tags}.items():
        if value not in (None, ""):
            client.set_model_version_tag(REGISTERED_MODEL, number, key, str(value))
    per_data = f"{CHAMPION}-{data_digest[:8]}"
    # Read, compare, set, then read again until nothing moves. MLflow has no compare-and-set,
    # and two clones' evaluate stages can score against one server at once; each alias is
    # set to the best of what the store holds (not to "this version if better than what I
    # read"), so the last stage to check leaves it on the best version whatever the order.
    for _ in range(8):
        changed = False
        versions = _scored_versions(client)
        for alias in (per_data, CHAMPION):
            current = _by_alias(client, alias)
            want = _earned(client, alias, current, versions, number, data_digest)
            if want is not None and (current is None or str(current.version) != want):
                client.set_registered_model_alias(REGISTERED_MODEL, alias, want)
                changed = True
        if not changed:
            break
    holds = [a for a in (per_data, CHAMPION)
             if (v := _by_alias(client, a)) is not None and str(v.version) == str(number)]
    held = f"; aliases now on it: {', '.join(holds)}" if holds else "; it holds no alias"
    return f"model {REGISTERED_MODEL} version {number}: eval val loss {loss:.4f}{held}"


def _scored_versions(client) -> dict[str, tuple[float, str]]:
    """Every version's ``(eval val loss, data digest)``, by number, from its tags."""
    out, token = {}, None
    while True:
        page = client.search_model_versions(f"name='{REGISTERED_MODEL}'", page_token=token)
        for v in page:
            out[str(v.version)] = (_loss(v), v.tags.get("data_digest", ""))
        token = page.token
        if not token:
            return out


def _earned(client, alias: str, current, versions: dict[str, tuple[float, str]], number: str,
            data_digest: str) -> str | None:
    """The version ``alias`` should name now (None: leave it). ``champion-<digest>``: the
    best version on that data. ``champion``: the best on the champion's data among the
    holder and the versions registered after the last ``promote`` (a hand-picked champion
    is not overruled by versions it was picked over); a run on other data never takes it."""
    if alias == CHAMPION:
        if current is not None and current.tags.get("data_digest") != data_digest:
            return None  # the champion was scored on other validation data: not comparable
        floor = _promote_floor(client)
        pool = {n: lv for n, lv in versions.items()
                if lv[1] == data_digest and (int(n) > floor or (current is not None and n == str(current.version)))}
    else:
        pool = {n: lv for n, lv in versions.items() if lv[1] == data_digest}
    finite = {n: lv[0] for n, lv in pool.items() if math.isfinite(lv[0])}  # a NaN loss never holds
    if not finite:
        return str(current.version) if current is not None else str(number)
    return min(finite, key=lambda n: (finite[n], int(n)))  # ties: the earlier version keeps it


def _promote_floor(client) -> int:
    try:
        return int(client.get_registered_model(REGISTERED_MODEL).tags.get(PROMOTE_FLOOR_TAG, 0))
    except (ValueError, TypeError):
        return 0


def _by_alias(client, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(REGISTERED_MODEL, alias)
    except MlflowException:
        return None


def promote(client, version: str | None = None, run_id: str | None = None) -> str:
    """Point ``champion`` at ``version`` (or at the version ``run_id`` registered)."""
    if run_id is not None:
        version = client.get_run(run_id).data.tags.get(VERSION_TAG)
        if version is None:
            raise CheckpointError(f"run {run_id!r} registered no model version (its train stage did not "
                                  "finish with tracking on)")
    client.get_model_version(REGISTERED_MODEL, str(version))  # a clear error if there is none
    newest = max((int(n) for n in _scored_versions(client)), default=0)
    client.set_registered_model_tag(REGISTERED_MODEL, PROMOTE_FLOOR_TAG, str(newest))
    client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, str(version))
    return str(version)


def checkpoint_in(model_dir: str | Path) -> Path:
    """The checkpoint directory inside a downloaded model: the pyfunc's ``checkpoint``
    artifact, or the directory itself (models logged before the pyfunc existed)."""
    model_dir = Path(model_dir)
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        return model_dir
    conf = yaml.safe_load(mlmodel.read_text()) or {}
    artifacts = (conf.get("flavors", {}).get("python_function", {}).get("artifacts") or {})
    path = (artifacts.get("checkpoint") or {}).get("path")
    if not path:
        raise CheckpointError(f"{model_dir}: an MLflow model without a gptcore checkpoint artifact")
    return model_dir / path


_RUN_ID = re.compile(r"[0-9a-f]{32}")  # MLflow's run ids: a uuid4's hex digits


def fetch_checkpoint(source: str, dst: str | Path, what: str = "SOURCE") -> Path:
    """The checkpoint directory ``source`` names: a checkpoint directory (as it is), an
    MLflow run id or a ``models:/`` URI (copied into ``dst``). ``what`` names the setting
    in errors."""
    if source.startswith("models:/"):
        return download_model(source, dst, what)
    if not current_dir(source).exists() and _RUN_ID.fullmatch(source):
        return download_run_model(source, dst)
    if not current_dir(source).is_dir():
        raise CheckpointError(f"{what} {source!r}: no such checkpoint directory; allowed: a checkpoint directory, "
                              "an MLflow run id (32 hex digits) or a models:/ URI (models:/gptcore@champion)")
    return Path(source)


def resolve_version(model_uri: str) -> dict[str, str]:
    """Lineage tags for a ``models:/gptcore@ALIAS`` or ``models:/gptcore/N`` URI: the
    version it names now and the run that made it (empty for a logged-model id URI)."""
    name, _, ref = model_uri[len("models:/"):].partition("@")
    client, _ = store.open_store()
    try:
        if ref:
            version = client.get_model_version_by_alias(name, ref)
        elif "/" in name:
            name, number = name.split("/", 1)
            version = client.get_model_version(name, number)
        else:
            return {}
    except Exception as exc:  # noqa: BLE001 - MLflow, SQLAlchemy and requests errors alike
        raise CheckpointError(f"{model_uri!r}: {' '.join(str(exc).split())[:160]}") from None
    return {"gptcore.init_version": f"{version.name}/{version.version}", "gptcore.init_run_id": version.run_id or ""}


def download_checkpoint(uri: str, dst: str | Path | None = None) -> Path:
    """The checkpoint of the model at ``uri`` (``models:/gptcore@champion``,
    ``models:/gptcore/3``, ``runs:/<id>/...``, a local path), copied into ``dst``."""
    import mlflow.artifacts

    dst = dst or tempfile.mkdtemp(prefix="gptcore-model-")
    return checkpoint_in(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))


def download_run_model(run_id: str, dst: str | Path) -> Path:
    """The checkpoint directory logged with ``run_id``, copied into ``dst``, from the
    store ``MLFLOW_TRACKING_URI`` names (default: ./mlflow.db). Raises CheckpointError
    that tells a run that is not there from a store that can't be reached or read."""
    if not run_id.strip():
        raise CheckpointError("--run: empty run id; allowed: a run id as `mlflow ui` or "
                              "metrics/mlflow_run.json shows it (32 hex digits)")
    client, uri = store.open_store()
    import mlflow

    try:
        run = client.get_run(run_id)
        model_id = run.data.tags.get(MODEL_ID_TAG)
        location = client.get_logged_model(model_id).artifact_location if model_id else None
    except Exception as exc:  # noqa: BLE001 - MLflow, SQLAlchemy and requests errors alike
        raise CheckpointError(store.store_problem(exc, run_id, uri)) from None
    if not location:
        raise CheckpointError(f"run {run_id!r} ({run.info.run_name}) has no logged model; "
                              "only runs whose train stage finished carry one")
    return checkpoint_in(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(dst),
                                                                      tracking_uri=uri))


def download_model(model_uri: str, dst: str | Path, what: str = "--model") -> Path:
    """The checkpoint of the MLflow model at ``model_uri`` (``models:/gptcore@champion``,
    ``models:/gptcore/3``, ``models:/<logged model id>``), copied into ``dst``."""
    if not model_uri.startswith("models:/"):
        raise CheckpointError(f"{what} {model_uri!r}: allowed: models:/gptcore@ALIAS, models:/gptcore/VERSION "
                              "or models:/<logged model id> (a directory: use --checkpoint)")
    _, uri = store.open_store()
    try:
        return download_checkpoint(model_uri, dst)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow, SQLAlchemy and requests errors alike
        text = " ".join(str(exc).split())
        if "not found" in text.lower() or "RESOURCE_DOES_NOT_EXIST" in text or "does not exist" in text:
            raise CheckpointError(f"{what} {model_uri!r}: not found in {uri} ({text[:160]}); "
                                  "`mlflow ui` lists the registered models, versions and aliases") from None
        raise CheckpointError(f"{what} {model_uri!r}: MLflow store {uri} could not be read "
                              f"({type(exc).__name__}: {text[:160]})") from None


def promote_model(version: str | None = None, run_id: str | None = None) -> str:
    """Point the ``champion`` alias at a version (or at the one ``run_id`` registered)."""
    client, uri = store.open_store()
    try:
        return promote(client, version, run_id)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001
        what = f"run {run_id!r}" if run_id else f"version {version!r}"
        raise CheckpointError(f"promote {what}: {' '.join(str(exc).split())[:200]} (store {uri})") from None


if __name__ == "__main__":  # python -m gptcore.registry save CHECKPOINT DST (see save_pyfunc)
    from .stage import offline_env

    offline_env()
    if len(sys.argv) != 4 or sys.argv[1] != "save":
        sys.exit("usage: python -m gptcore.registry save CHECKPOINT DST")
    _save_pyfunc_here(sys.argv[2], sys.argv[3])
