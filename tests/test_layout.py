"""The layout's promises: each DVC stage depends on exactly the code it runs, data flows
one way (no import cycles), params.yaml is the dataclass defaults, and configuration
and help never load torch."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from project_copy import REPO, TINY_CHAR, copy_project, write_params

STAGES = ("download", "tokenize", "train", "evaluate", "sample")
# Runs a stage exactly as `python -m stages.<name>` would and, at exit, lists the files
# of every module it imported that live in the project.
RECORDER = """
import atexit, json, runpy, sys
from pathlib import Path
out, name = sys.argv[1], sys.argv[2]
root = Path.cwd().resolve()

def dump():
    import importlib.util
    paths = [getattr(m, "__file__", None) for m in list(sys.modules.values())]
    paths.append(importlib.util.find_spec(name).origin)  # the entry point runs as __main__
    native = sys.modules.get("gptcore.model.native")
    if native is not None:  # its C sources are code the stage compiles and runs
        paths.extend(map(str, native.SOURCES))
    files = {Path(p).relative_to(root).as_posix() for p in paths
             if p and Path(p).is_absolute() and root in Path(p).parents}
    Path(out).write_text(json.dumps(sorted(files)))

atexit.register(dump)
sys.argv = [name]
runpy.run_module(name, run_name="__main__", alter_sys=True)
"""


def _code_deps(stage: dict) -> set[str]:
    """The stage's declared deps that are project code (not data or DVC outputs)."""
    return {d for d in stage.get("deps", []) if d.startswith(("gptcore", "stages"))}


@pytest.fixture(scope="module")
def imported(tmp_path_factory, mirror_dir) -> dict[str, set[str]]:
    """stage name -> the project files its process imported, from a real tiny run of each."""
    root = copy_project(tmp_path_factory.mktemp("layout") / "gptcore")
    write_params(root, TINY_CHAR)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_", "RANK", "WORLD_SIZE"))}
    env.update(GPTCORE_MIRROR=str(mirror_dir), MLFLOW_DISABLE_TELEMETRY="true",
               MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")
    found = {}
    for name in STAGES:
        out = root / f"imports-{name}.json"
        proc = subprocess.run([sys.executable, "-c", RECORDER, str(out), f"stages.{name}"], cwd=root,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"stage {name} failed:\n{proc.stdout}\n{proc.stderr}"
        found[name] = set(json.loads(out.read_text()))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("name", STAGES)
def test_stage_deps_are_exactly_the_code_it_imports(imported, name):
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][name]
    declared = _code_deps(stage)
    missing, extra = imported[name] - declared, declared - imported[name]
    assert not missing, f"dvc.yaml stage {name!r} lacks deps it imports: {sorted(missing)}"
    assert not extra, f"dvc.yaml stage {name!r} declares deps it never imports: {sorted(extra)}"
    assert f"stages/{name}.py" in declared


def test_stage_commands_and_paths_follow_params():
    """Each stage runs its own module; output paths that are params are templated."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert stage["cmd"] == f"python -m stages.{name}"
    assert stages["download"]["outs"] == [{"${data.raw_dir}": {"persist": True}}]
    assert stages["tokenize"]["outs"] == [{"${data.processed_dir}": {"persist": True}}]
    assert {"${train.out_dir}": {"persist": True}} in stages["train"]["outs"]


def test_the_model_artifact_is_what_train_publishes():
    """dvc.yaml's `artifacts:` entry (DVC's model registry) names the directory the train
    stage publishes: params.yaml's train.out_dir + /best."""
    artifact = yaml.safe_load((REPO / "dvc.yaml").read_text())["artifacts"]["gptcore"]
    out_dir = yaml.safe_load((REPO / "params.yaml").read_text())["train"]["out_dir"]
    assert artifact["type"] == "model" and artifact["desc"] and artifact["labels"]
    assert Path(artifact["path"]) == Path(out_dir) / "best"


def test_every_output_persists_until_its_stage_replaces_it():
    """DVC deletes a stage's outputs before running it unless they persist; each stage
    replaces its outputs atomically itself, so a failing stage must find them kept."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind, []):
                assert isinstance(out, dict), f"{name}: {kind} entry {out!r} does not persist"
                (path, spec), = out.items()
                assert spec.get("persist") is True, f"{name}: {kind} {path} does not persist"
    for name in ("evaluate", "sample"):
        assert "train.device" in stages[name]["params"] and "train.out_dir" in stages[name]["params"]


def _import_graph() -> dict[str, set[str]]:
    """gptcore module -> the gptcore modules it imports (anywhere in the file, lazily too)."""
    graph = {}
    for path in (REPO / "gptcore").rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        name = ".".join(parts)
        package = parts if is_pkg else parts[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                targets = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
                edges.update(t for t in targets if t.startswith("gptcore"))
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("gptcore"))
        graph[name] = edges
    # "from .model import GPT" names a package: an edge to the package module itself.
    return {k: {e if e in graph else e.rsplit(".", 1)[0] for e in v} - {k} for k, v in graph.items()}


def test_no_import_cycles():
    graph = _import_graph()
    # The parser sees relative, package and lazy (in-function) imports.
    assert {"gptcore.training.optim", "gptcore.model", "gptcore.training.resume"} <= graph["gptcore.training.loop"]
    assert "gptcore.checkpoint" in graph["gptcore.cli"]
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_params_yaml_equals_the_dataclass_defaults():
    import dataclasses

    from gptcore.config import Params, load_params
    from gptcore.generation.sampling import SampleConfig, sample_settings

    loaded = load_params(REPO / "params.yaml")
    assert dataclasses.replace(loaded, sample={}) == Params()
    assert sample_settings(loaded) == SampleConfig()


@pytest.mark.parametrize("code", [
    "import gptcore.config; gptcore.config.load_params('params.yaml')",
    "from gptcore.cli import main; main(['generate', '--help'])",
    "from gptcore.cli import main; main(['--help'])",
    "import gptcore; gptcore.ConfigError",
])
def test_config_and_help_do_not_import_torch(code):
    check = (f"import sys\ntry:\n    {code}\nexcept SystemExit:\n    pass\n"
             "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
