"""The comparison flow: rows as DVC experiments, seeds, the results page, and bad specs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_pipeline_repo, small_params
from drape.comparison import load_spec
from drape.config import ConfigError

SPEC = {
    "budget": {"n_train": 4, "n_test": 2, "epochs": 1, "batch_size": 2},
    "seeds": [0, 1],
    "seeded": ["strongest-baseline"],
    "tracking": {"experiment": "comparison-test"},
    "evaluate": {"forward_transfer": False},
    "rows": [
        {"name": "l2p", "group": "baseline", "set": {"method": "l2p"}},
        {"name": "drape-no-nullspace", "group": "ablation", "set": {"method": "drape", "drape.nullspace": False}},
    ],
}


def small_comparison_params() -> dict:
    params = small_params()
    params["l2p"].update(pool_size=4, prompt_length=2, top_k=2)
    return params


@pytest.fixture(scope="module")
def compared(prefect_server, tmp_path_factory):
    repo = make_pipeline_repo(tmp_path_factory.mktemp("compare") / "repo", small_comparison_params())
    (repo / "comparison.yaml").write_text(yaml.safe_dump(SPEC, sort_keys=False))
    params_before = (repo / "params.yaml").read_text()
    result = subprocess.run(
        [sys.executable, "-m", "flows.compare", "comparison.yaml"],
        cwd=repo,
        env=dict(prefect_server, PYTHONPATH=str(repo)),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, f"comparison failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return repo, params_before, json.loads(result.stdout[result.stdout.index("{") :])


def test_every_row_and_seed_ran(compared):
    repo, _, summary = compared
    raw = json.loads((repo / "docs/results.json").read_text())
    runs = {(run["row"], run["seed"]) for run in raw["runs"]}
    first_seed = {(row["name"], 0) for row in SPEC["rows"]}
    strongest = summary["strongest_baseline"]
    assert strongest == "l2p"
    assert runs == first_seed | {(strongest, 1)}
    assert summary["runs"] == len(runs)


def test_runs_are_dvc_experiments(compared):
    repo, _, _ = compared
    listed = subprocess.run(["dvc", "exp", "list", "--name-only"], cwd=repo, capture_output=True, text=True, env=dict(PATH=str(Path(sys.executable).parent)))
    names = set(listed.stdout.split())
    assert {"l2p-seed0", "l2p-seed1", "drape-no-nullspace-seed0"} <= names


def test_results_page_has_table_plot_and_links(compared):
    repo, _, _ = compared
    page = (repo / "docs/results.md").read_text()
    assert (repo / "docs/results-mfn-bwt.png").stat().st_size > 0
    for row in SPEC["rows"]:
        assert f"`{row['name']}`" in page
    assert "python -m flows.compare comparison.yaml" in page
    assert "Wall time of the whole comparison" in page
    # Every run links to its MLflow parent run.
    raw = json.loads((repo / "docs/results.json").read_text())
    for run in raw["runs"]:
        assert run["mlflow_run_id"], run["row"]
        assert run["mlflow_run_id"] in page
    # A seeded row shows a standard deviation. DRAPE routes by prototypes, L2P does not route.
    l2p_line = next(line for line in page.splitlines() if line.startswith("| `l2p` "))
    assert "±" in l2p_line
    assert l2p_line.split(" | ")[8] == "–"
    drape_line = next(line for line in page.splitlines() if line.startswith("| `drape-no-nullspace` "))
    assert drape_line.split(" | ")[8] != "–"


def test_run_metrics_match_their_settings(compared):
    repo, _, _ = compared
    raw = json.loads((repo / "docs/results.json").read_text())
    by_row = {(run["row"], run["seed"]): run for run in raw["runs"]}
    assert "routing_accuracy" in by_row[("drape-no-nullspace", 0)]["metrics"]
    assert "routing_accuracy" not in by_row[("l2p", 0)]["metrics"]
    # Forward transfer is off: the entry above the diagonal was not evaluated.
    assert by_row[("drape-no-nullspace", 0)]["matrix"][0][1] is None


def test_workspace_restored_after_comparison(compared):
    repo, params_before, _ = compared
    assert (repo / "params.yaml").read_text() == params_before


def test_bad_row_is_named(tmp_path):
    spec = dict(SPEC, rows=SPEC["rows"] + [{"name": "l2p", "group": "baseline", "set": {"method": "l2p"}}])
    (tmp_path / "comparison.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="duplicate names"):
        load_spec(tmp_path / "comparison.yaml")


def test_unknown_override_is_named(tmp_path):
    from drape.comparison import experiment_overrides

    spec_dict = dict(SPEC, rows=[{"name": "typo", "group": "baseline", "set": {"method": "l2q"}}], seeded=[])
    (tmp_path / "comparison.yaml").write_text(yaml.safe_dump(spec_dict))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(small_comparison_params()))
    spec = load_spec(tmp_path / "comparison.yaml")
    with pytest.raises(ConfigError, match=r"(?s)row 'typo'.*method: got 'l2q'"):
        experiment_overrides(spec, tmp_path / "params.yaml", "typo", 0)
