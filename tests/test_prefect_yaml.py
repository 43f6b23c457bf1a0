"""prefect.yaml and the Kubernetes GPU job template, checked with Prefect's own loaders.

No Prefect server or cluster is involved. The deployments are parsed the way
``prefect deploy`` parses them. The Kubernetes job variables are validated against the
work pool's variables schema as the Prefect server validates them, and the job manifest
is rendered as the Kubernetes worker renders it.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
from pathlib import Path

import pytest
import yaml
from prefect.cli.deploy._config import _load_deploy_configs_and_actions
from prefect.cli.deploy._models import PrefectYamlModel
from prefect.exceptions import MissingFlowError
from prefect.flows import load_flow_from_entrypoint
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.schema_tools import ValidationError, validate
from prefect.utilities.templating import apply_values
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration
from rich.console import Console

REPO_ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO_ROOT / "prefect.yaml"
GPU_TEMPLATE = REPO_ROOT / "deploy" / "kubernetes-gpu-job-template.json"
# A loopback port with no server. Rendering the template opens a Prefect client without
# sending a request, and without an API URL that client would start a temporary server.
UNUSED_API_URL = "http://127.0.0.1:9/api"
# Environment of the shell that runs `prefect deploy --name gpu-cluster`.
DEPLOY_ENV = {
    "DRAPE_IMAGE": "registry.example.org/drape:0.1.0",
    "MLFLOW_TRACKING_URI": "http://mlflow.drape.svc:5000",
}


def load_deployments(path: Path) -> dict[str, dict]:
    """Load ``path`` with the loader of ``prefect deploy``, raising on schema errors."""
    raw = yaml.safe_load(path.read_text())
    # The CLI loader prints validation errors and continues with no deployments, so the
    # schema model is validated first to turn those errors into exceptions.
    PrefectYamlModel.model_validate(raw)
    configs, _ = _load_deploy_configs_and_actions(path, console=Console(file=io.StringIO()))
    return {config["name"]: config for config in configs}


def render_gpu_job(job_variables: dict) -> dict:
    """Validate ``job_variables`` against the GPU template and render the Kubernetes Job."""
    template = json.loads(GPU_TEMPLATE.read_text())
    variables = template["variables"]
    undeclared = sorted(set(job_variables) - set(variables["properties"]))
    # The worker ignores undeclared variables, so a misspelt one would do nothing.
    assert not undeclared, f"job variables missing from the template's variables: {undeclared}"
    validate(job_variables, variables, raise_on_error=True, ignore_required=True)
    with temporary_settings({PREFECT_API_URL: UNUSED_API_URL}):
        configuration = asyncio.run(
            KubernetesWorkerJobConfiguration.from_template_and_values(template, job_variables)
        )
    return configuration.job_manifest


def gpu_job_variables(deployments: dict[str, dict], monkeypatch: pytest.MonkeyPatch) -> dict:
    """Fill the ``{{ $VAR }}`` placeholders, which Prefect reads from os.environ."""
    for name, value in DEPLOY_ENV.items():
        monkeypatch.setenv(name, value)
    return apply_values(deployments["gpu-cluster"]["work_pool"]["job_variables"], {})


def test_both_deployments_parse():
    deployments = load_deployments(PREFECT_YAML)
    assert set(deployments) == {"mini-stream", "gpu-cluster"}
    assert deployments["mini-stream"]["work_pool"]["name"] == "local-process"
    assert deployments["gpu-cluster"]["work_pool"]["name"] == "gpu-cluster"
    pull = deployments["gpu-cluster"]["pull"]
    assert pull == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/drape"}}]


@pytest.mark.parametrize("name", ["mini-stream", "gpu-cluster"])
def test_entrypoint_loads_pipeline_flow(name, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    entrypoint = load_deployments(PREFECT_YAML)[name]["entrypoint"]
    flow = load_flow_from_entrypoint(entrypoint)
    assert flow.name == "drape-pipeline"


def test_gpu_template_extends_default():
    template = json.loads(GPU_TEMPLATE.read_text())
    default = KubernetesWorker.get_default_base_job_template()
    added = {"gpu_limit", "node_selector", "env_from"}
    assert set(template["variables"]["properties"]) == set(default["variables"]["properties"]) | added

    # Without the three additions the template is the default of the installed
    # prefect-kubernetes, so a new release's template changes show up here.
    stripped = copy.deepcopy(template)
    for name in added:
        del stripped["variables"]["properties"][name]
    pod = stripped["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    del pod["nodeSelector"]
    del pod["containers"][0]["envFrom"]
    del pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert stripped == default


def test_gpu_job_renders_gpu_limit(monkeypatch):
    manifest = render_gpu_job(gpu_job_variables(load_deployments(PREFECT_YAML), monkeypatch))
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["memory"] == "64Gi"
    assert container["image"] == DEPLOY_ENV["DRAPE_IMAGE"]
    assert container["envFrom"] == [{"secretRef": {"name": "drape-storage"}}]
    # The worker turns this mapping into Kubernetes' name/value list when a flow run starts.
    assert container["env"]["HF_HUB_OFFLINE"] == "1"
    assert container["env"]["MLFLOW_TRACKING_URI"] == DEPLOY_ENV["MLFLOW_TRACKING_URI"]
    assert manifest["metadata"]["namespace"] == "drape"


def test_broken_entrypoint_fails(tmp_path, monkeypatch):
    raw = yaml.safe_load(PREFECT_YAML.read_text())
    raw["deployments"][1]["entrypoint"] = "flows/pipeline.py:drape_pipline"
    broken = tmp_path / "prefect.yaml"
    broken.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(REPO_ROOT)
    entrypoint = load_deployments(broken)["gpu-cluster"]["entrypoint"]
    with pytest.raises(MissingFlowError, match="drape_pipline"):
        load_flow_from_entrypoint(entrypoint)


def test_broken_schema_fails(tmp_path):
    raw = yaml.safe_load(PREFECT_YAML.read_text())
    raw["deployments"][1]["work_pool"]["job_variables"] = ["gpu_limit", 1]
    broken = tmp_path / "prefect.yaml"
    broken.write_text(yaml.safe_dump(raw))
    with pytest.raises(Exception, match="job_variables"):
        load_deployments(broken)


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("gpu_limit", "one", ValidationError),
        ("gpu_limit", -1, ValidationError),
        ("image_pull_policy", "Sometimes", ValidationError),
        ("gpu_limits", 1, AssertionError),
    ],
)
def test_broken_job_variable_fails(name, value, error, monkeypatch):
    job_variables = dict(gpu_job_variables(load_deployments(PREFECT_YAML), monkeypatch), **{name: value})
    with pytest.raises(error):
        render_gpu_job(job_variables)
