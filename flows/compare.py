"""Prefect flow that runs the method comparison as DVC experiments and writes docs/results.md.

Each row of ``comparison.yaml`` is one ``dvc exp run -S ...`` in the repository: the
same stream, the same budget (applied to every task), one method or ablation. The rows
run one after another in the workspace, so DVC reuses the cached data, models and
features and re-runs only what the method changes. Rows named in ``seeded`` run with every
seed; ``strongest-baseline`` stands for the baseline row with the best MFN at the first
seed. Each run is logged to MLflow (one parent run per row and seed, named
``<row>-seed<seed>``), and the flow writes the table, the MFN-BWT plot and the raw
numbers. At the end params.yaml and dvc.lock are restored and the workspace outputs are
checked out again, so the pipeline of record is left as it was.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from drape.telemetry import disable_telemetry

disable_telemetry()

from prefect import flow, get_run_logger, task  # noqa: E402  (after the telemetry opt-outs)
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from drape.comparison import (  # noqa: E402
    STRONGEST,
    ComparisonSpec,
    RunResult,
    experiment_overrides,
    load_spec,
    read_run_result,
    strongest_baseline,
    write_results,
)

FLOW_NAME = "drape-compare"


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["DRAPE_LAUNCHER"] = "prefect"
    # `dvc` and the stages' `drape` entry point live next to this interpreter.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["dvc", *args], cwd=root, env=_environment(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@task(retries=1, retry_delay_seconds=5, task_run_name="{row}-seed{seed}")
def run_experiment(root: str, spec: ComparisonSpec, params_text: str, row: str, seed: int) -> RunResult:
    """Run one row with one seed as a DVC experiment and read its report."""
    logger = get_run_logger()
    root_path = Path(root)
    # Every experiment starts from the original params.yaml, not from the previous row's.
    (root_path / "params.yaml").write_text(params_text)
    name = f"{row}-seed{seed}"
    _dvc(root_path, "exp", "remove", name, check=False)
    overrides = experiment_overrides(spec, root_path / "params.yaml", row, seed)
    command = ["exp", "run", "--name", name, *[arg for key, value in overrides.items() for arg in ("-S", f"{key}={value}")]]
    logger.info("running dvc %s", " ".join(command))
    started = time.perf_counter()
    _dvc(root_path, *command)
    seconds = time.perf_counter() - started
    result = read_run_result(root_path, spec, row, seed, seconds)
    logger.info("%s: MFN %.2f BWT %.2f in %.0f s", name, result.metrics["MFN"], result.metrics["BWT"], seconds)
    return result


@flow(name=FLOW_NAME, log_prints=True)
def compare_methods(root: str = ".", spec_path: str = "comparison.yaml", out: str = "docs") -> dict:
    """Run every row of the comparison and write ``<out>/results.md``, its plot and raw numbers."""
    logger = get_run_logger()
    root_path = Path(root).resolve()
    spec = load_spec(root_path / spec_path)
    params_path, lock_path = root_path / "params.yaml", root_path / "dvc.lock"
    params_text = params_path.read_text()
    lock_text = lock_path.read_text() if lock_path.exists() else None
    started = time.perf_counter()

    results: list[RunResult] = []
    try:
        first = spec.seeds[0]
        for row in spec.rows:
            results.append(run_experiment(str(root_path), spec, params_text, row.name, first))
        strongest = strongest_baseline(spec, results)
        logger.info("strongest baseline at seed %d: %s", first, strongest)
        seeded = [strongest if name == STRONGEST else name for name in spec.seeded]
        for seed in spec.seeds[1:]:
            for row in dict.fromkeys(seeded):
                results.append(run_experiment(str(root_path), spec, params_text, row, seed))
    finally:
        params_path.write_text(params_text)
        if lock_text is not None:
            lock_path.write_text(lock_text)
        checkout = _dvc(root_path, "checkout", check=False)
        if checkout.returncode != 0:
            logger.warning("dvc checkout after the comparison failed; run `dvc repro` to restore the outputs:\n%s", checkout.stderr[-2000:])

    wall = time.perf_counter() - started
    summary = write_results(root_path / out, spec, results, strongest, wall, command=f"python -m flows.compare {spec_path}")
    create_markdown_artifact(key="method-comparison", markdown=summary["table"], description="Methods compared on the embedded stream")
    return {"strongest_baseline": strongest, "wall_seconds": round(wall, 1), "runs": len(results)}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    spec_arg = sys.argv[1] if len(sys.argv) > 1 else "comparison.yaml"
    print(json.dumps(compare_methods(".", spec_arg), indent=2))
