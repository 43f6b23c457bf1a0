"""Shared fixtures: materialised models and throw-away pipeline repositories."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from drape.telemetry import disable_telemetry

disable_telemetry()

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The stages' code dependencies in dvc.yaml are paths under drape/, so the whole package is copied.
PIPELINE_FILES = ("dvc.yaml", "prefect.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore", "flows", "drape")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """A ``models/`` folder of the tiny preset (random weights, the embedded classes).

    Stages take the number of patch tokens from ``models.patch_grid`` in params.yaml, so
    the manifest's default grid does not constrain the tests' smaller grid.
    """
    from drape.encoders import materialize_models

    folder = tmp_path_factory.mktemp("tiny") / "models"
    materialize_models(folder, "tiny")
    return folder


@pytest.fixture(scope="session")
def embedded_models(tmp_path_factory) -> Path:
    """A ``models/`` folder of the embedded preset: the real pretrained weights."""
    from drape.encoders import materialize_models

    folder = tmp_path_factory.mktemp("embedded") / "models"
    materialize_models(folder, "embedded")
    return folder


def small_task(kind: str, after: str, n_train: int = 8, n_test: int = 4, **train) -> dict:
    settings = {"epochs": 1, "batch_size": 4, "generator_lr": 1e-3, "projector_lr": 1e-3}
    settings.update(train)
    return {"after": after, "data": {"kind": kind, "n_train": n_train, "n_test": n_test}, "train": settings}


def small_params(preset: str = "tiny", stream: dict | None = None, **sections) -> dict:
    """The repository's params.yaml shrunk for tests: two digit tasks, few samples, small generator."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["models"] = {**params["models"], "preset": preset, "patch_grid": 2}
    params["stream"] = stream or {
        "digits": small_task("digits-classify", "init"),
        "parity": small_task("digits-parity", "digits"),
    }
    params["drape"].update(hidden=32, prompt_length=4, heads=2)
    params["evaluate"] = {"batch_size": 8, "max_new_tokens": 3}
    for name, values in sections.items():
        params[name] = {**params.get(name, {}), **values} if isinstance(values, dict) else values
    return params


def write_params(root: Path, params: dict) -> None:
    # deepcopy keeps PyYAML from writing anchors for dicts shared between tasks.
    (root / "params.yaml").write_text(yaml.safe_dump(copy.deepcopy(params), sort_keys=False))


def make_pipeline_repo(root: Path, params: dict, models: Path | None = None) -> Path:
    """Create a git repository at ``root`` with the pipeline files and ``params``.

    With ``models`` the materialised folder is copied in after the commit, so single
    stages (``drape stage ...``) run without the models stage.
    """
    root.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE_FILES:
        source, target = REPO_ROOT / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    write_params(root, params)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "pipeline"], cwd=root, check=True)
    if models is not None:
        shutil.copytree(models, root / "models")
    return root


def run_stages(repo: Path, calls: list[list[str]]) -> None:
    """Run ``drape`` command lines (``["stage", "train", ...]``) in ``repo`` in this process; each must exit 0."""
    from drape.cli import main

    with contextlib.chdir(repo):
        for argv in calls:
            assert main(argv) == 0, argv


def input_stages(tasks) -> list[list[str]]:
    """The ``data`` and ``features`` stages of ``tasks``."""
    return [["stage", stage, "--task", task] for task in tasks for stage in ("data", "features")]


def stream_stages(tasks, report: bool = True) -> list[list[str]]:
    """``init``, every task's ``train``, ``prototypes`` and ``evaluate``, then the report without MLflow."""
    calls = [["stage", "init"]]
    calls += [["stage", stage, "--task", task] for task in tasks for stage in ("train", "prototypes", "evaluate")]
    if report:
        calls.append(["stage", "report", "--no-mlflow"])
    return calls


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A Prefect server on 127.0.0.1 with its own home folder; stopped after the module."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_UI_ENABLED="false",
        PATH=str(BIN) + os.pathsep + os.environ["PATH"],
    )

    log = (home / "server.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"Prefect server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
        time.sleep(1)

    yield env

    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()
