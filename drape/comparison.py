"""The method comparison: its specification, the results of its runs, and docs/results.md.

``comparison.yaml`` lists the rows (a method or ablation as ``params.yaml`` overrides), the
budget applied to every task, the seeds and the rows that run with every seed. The
Prefect flow ``flows.compare`` runs each row as a DVC experiment. This module builds the
overrides, reads each run's report and writes the table, the MFN-BWT plot and the raw
numbers.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ruamel.yaml import YAML, YAMLError

from drape.config import ConfigError, load_config

logger = logging.getLogger(__name__)

STRONGEST = "strongest-baseline"
"""Placeholder in ``seeded`` for the baseline row with the best MFN at the first seed."""

METRIC_COLUMNS = (
    ("MFN", "MFN"),
    ("MFT", "MFT"),
    ("MAA", "MAA"),
    ("BWT", "BWT"),
    ("forgetting", "Forgetting"),
    ("routing_accuracy", "Routing acc."),
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Budget(_Strict):
    """Data and training budget applied to every task of the stream."""

    n_train: int | None = Field(None, ge=1)
    n_test: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)


class Row(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    """Row label; also the DVC experiment and MLflow run name prefix."""
    group: Literal["reference", "baseline", "drape", "ablation"]
    set: dict[str, str | int | float | bool]
    """``params.yaml`` overrides as dotted keys (``drape.nullspace: false``)."""


class ComparisonSpec(_Strict):
    budget: Budget = Budget()
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    seeded: list[str] = []
    tracking: dict[str, str] = {}
    """``tracking`` overrides of params.yaml (the MLflow experiment of the comparison)."""
    evaluate: dict[str, int | bool] = {}
    """``evaluate`` overrides of params.yaml."""
    rows: list[Row] = Field(min_length=1)

    @model_validator(mode="after")
    def _names(self) -> ComparisonSpec:
        names = [row.name for row in self.rows]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"rows: duplicate names {duplicates}; every row needs its own name")
        unknown = [name for name in self.seeded if name != STRONGEST and name not in names]
        if unknown:
            raise ValueError(f"seeded: {unknown} are not row names; use row names or '{STRONGEST}'")
        if STRONGEST in self.seeded and not any(row.group == "baseline" for row in self.rows):
            raise ValueError(f"seeded: '{STRONGEST}' needs at least one row of group 'baseline'")
        return self

    def row(self, name: str) -> Row:
        return next(row for row in self.rows if row.name == name)


def load_spec(path: Path) -> ComparisonSpec:
    """Read and validate a comparison file; raise ConfigError naming the file and the bad key."""
    try:
        raw = YAML(typ="safe", pure=True).load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; pass the comparison file (default: comparison.yaml)") from None
    except YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    try:
        return ComparisonSpec.model_validate(raw)
    except ValidationError as error:
        lines = [f"{path}: invalid comparison"]
        for item in error.errors():
            key = ".".join(str(part) for part in item["loc"]) or "(top level)"
            lines.append(f"  {key}: {item['msg']}")
        raise ConfigError("\n".join(lines)) from None


def _yaml_value(value) -> str:
    """Format ``value`` as YAML, the way ``dvc exp run -S`` parses it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def experiment_overrides(spec: ComparisonSpec, params_path: Path, row: str, seed: int) -> dict[str, str]:
    """Build the ``dvc exp run -S key=value`` overrides of one row and seed, checked against params.yaml's schema.

    A key that params.yaml does not contain yet comes back as ``+key``, the form DVC needs to add it.
    """
    config = load_config(params_path)
    overrides: dict[str, str] = {"seed": str(seed)}
    for task in config.task_names:
        for key in ("n_train", "n_test"):
            value = getattr(spec.budget, key)
            if value is not None:
                overrides[f"stream.{task}.data.{key}"] = str(value)
        for key in ("epochs", "batch_size"):
            value = getattr(spec.budget, key)
            if value is not None:
                overrides[f"stream.{task}.train.{key}"] = str(value)
    for key, value in spec.tracking.items():
        overrides[f"tracking.{key}"] = _yaml_value(value)
    for key, value in spec.evaluate.items():
        overrides[f"evaluate.{key}"] = _yaml_value(value)
    overrides["tracking.run_name"] = f"{row}-seed{seed}"
    for key, value in spec.row(row).set.items():
        overrides[key] = _yaml_value(value)

    # Apply the overrides to a copy of params.yaml and validate it, so a typo in a row stops
    # here with the row's name instead of inside a DVC stage.
    raw = YAML(typ="safe", pure=True).load(params_path.read_text())
    arguments = {}
    for key, value in overrides.items():
        section = raw
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(section.get(part), dict):
                raise ConfigError(f"row '{row}': '{key}' is not a key of {params_path}")
            section = section[part]
        # DVC (Hydra's override syntax) needs a leading '+' to add a key params.yaml lacks.
        arguments[key if leaf in section else f"+{key}"] = value
        section[leaf] = YAML(typ="safe", pure=True).load(value)
    from drape.config import parse_config

    try:
        parse_config(raw, params_path)
    except ConfigError as error:
        raise ConfigError(f"row '{row}' (seed {seed}) gives an invalid params.yaml:\n{error}") from None
    return arguments


@dataclass
class RunResult:
    row: str
    group: str
    seed: int
    metrics: dict[str, float]
    seconds: float
    mlflow_run_id: str | None = None
    mlflow_experiment_id: str | None = None
    matrix: list[list[float | None]] = field(default_factory=list)


def read_run_result(root: Path, spec: ComparisonSpec, row: str, seed: int, seconds: float) -> RunResult:
    """Read the report of the experiment just run in ``root`` and find its MLflow run."""
    from drape.metrics import read_matrix_csv

    metrics = json.loads((root / "results/report/metrics.json").read_text())
    matrix = read_matrix_csv(root / "results/report/matrix.csv")
    values = [[None if math.isnan(v) else round(float(v), 2) for v in line] for line in matrix.values]
    run_id, experiment_id = find_mlflow_run(root, f"{row}-seed{seed}")
    return RunResult(row, spec.row(row).group, seed, metrics, round(seconds, 1), run_id, experiment_id, values)


def find_mlflow_run(root: Path, run_name: str) -> tuple[str | None, str | None]:
    """Find the newest MLflow parent run named ``run_name`` in the tracking store of ``root``'s params."""
    import mlflow

    config = load_config(root / "params.yaml")
    uri = config.tracking.mlflow_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{(root / uri[len('sqlite:///'):]).resolve()}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    if experiment is None:
        return None, None
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'", order_by=["attributes.start_time DESC"], max_results=1
    )
    return (runs[0].info.run_id, experiment.experiment_id) if runs else (None, experiment.experiment_id)


def strongest_baseline(spec: ComparisonSpec, results: list[RunResult]) -> str | None:
    """Pick the baseline row with the best MFN at the first seed; a tie goes to the earlier row."""
    first = spec.seeds[0]
    candidates = [result for result in results if result.group == "baseline" and result.seed == first]
    if not candidates:
        return None
    return max(candidates, key=lambda result: (result.metrics["MFN"], -spec.rows.index(spec.row(result.row)))).row


# ----- docs/results.md ---------------------------------------------------------------------


def _aggregate(values: list[float]) -> tuple[float, float | None]:
    values = [value for value in values if value is not None and not math.isnan(value)]
    if not values:
        return math.nan, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _format(mean: float, std: float | None, digits: int = 2) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _count(value: float) -> str:
    if math.isnan(value):
        return "–"
    return f"{value / 1e6:.2f} M" if value >= 1e5 else f"{value / 1e3:.1f} k"


def summarise(spec: ComparisonSpec, results: list[RunResult]) -> list[dict]:
    """Aggregate each row's runs into the mean and standard deviation over seeds of every metric."""
    rows = []
    for row in spec.rows:
        runs = [result for result in results if result.row == row.name]
        if not runs:
            continue
        entry = {"row": row.name, "group": row.group, "seeds": [run.seed for run in runs], "runs": runs}
        keys = sorted({key for run in runs for key in run.metrics})
        for key in keys:
            entry[key] = _aggregate([run.metrics.get(key, math.nan) for run in runs])
        rows.append(entry)
    return rows


def mlflow_link(run: RunResult) -> str:
    if not run.mlflow_run_id:
        return "not logged"
    url = f"http://127.0.0.1:5000/#/experiments/{run.mlflow_experiment_id}/runs/{run.mlflow_run_id}"
    return f"[seed {run.seed}]({url})"


def results_table(rows: list[dict]) -> str:
    header = ["Method", "Group", "Seeds"] + [title for _, title in METRIC_COLUMNS] + [
        "Trainable / task",
        "Stored",
        "Latency (ms/sample)",
        "MLflow run",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in rows:
        cells = [f"`{entry['row']}`", entry["group"], str(len(entry["seeds"]))]
        cells += [_format(*entry.get(key, (math.nan, None))) for key, _ in METRIC_COLUMNS]
        cells.append(_count(entry.get("trainable_parameters_per_task", (math.nan, None))[0]))
        cells.append(_count(entry.get("stored_parameters", (math.nan, None))[0]))
        cells.append(_format(*entry.get("latency_ms_per_sample", (math.nan, None)), digits=0))
        cells.append(", ".join(mlflow_link(run) for run in entry["runs"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_mfn_bwt(rows: list[dict], path: Path) -> None:
    """Scatter of MFN against BWT, one point per row, error bars over seeds where there are several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"reference": "tab:gray", "baseline": "tab:blue", "drape": "tab:red", "ablation": "tab:orange"}
    figure, axes = plt.subplots(figsize=(8, 6))
    for entry in rows:
        (bwt, bwt_std), (mfn, mfn_std) = entry["BWT"], entry["MFN"]
        if math.isnan(bwt) or math.isnan(mfn):
            continue
        axes.errorbar(bwt, mfn, xerr=bwt_std, yerr=mfn_std, fmt="o", color=colors[entry["group"]], capsize=3)
        axes.annotate(entry["row"], (bwt, mfn), textcoords="offset points", xytext=(5, 4), fontsize=8)
    for group, color in colors.items():
        axes.scatter([], [], color=color, label=group)
    axes.axvline(0, color="black", linewidth=0.5)
    axes.set_xlabel("BWT (points; higher is less forgetting)")
    axes.set_ylabel("MFN (%; final average accuracy)")
    axes.set_title("Methods on the embedded stream")
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_results(out: Path, spec: ComparisonSpec, results: list[RunResult], strongest: str | None, wall_seconds: float, command: str) -> dict:
    """Write ``results.md``, ``results-mfn-bwt.png`` and ``results.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = summarise(spec, results)
    table = results_table(rows)
    plot_mfn_bwt(rows, out / "results-mfn-bwt.png")
    raw = {
        "command": command,
        "wall_seconds": round(wall_seconds, 1),
        "strongest_baseline": strongest,
        "spec": spec.model_dump(mode="json"),
        "runs": [asdict(result) for result in results],
    }
    (out / "results.json").write_text(json.dumps(raw, indent=2) + "\n")
    (out / "results.md").write_text(render_markdown(spec, rows, table, strongest, wall_seconds, command, results))
    return {"table": table, "rows": rows}


def render_markdown(spec, rows, table, strongest, wall_seconds, command, results) -> str:
    budget = ", ".join(f"{key} {value}" for key, value in spec.budget.model_dump().items() if value is not None)
    minutes, seconds = divmod(int(round(wall_seconds)), 60)
    run_time = sum(result.seconds for result in results)
    lines = [
        "# Methods compared on the embedded stream",
        "",
        "Generated by the comparison flow; do not edit by hand. Re-run with:",
        "",
        "```bash",
        ". .venv/bin/activate",
        command,
        "mlflow ui --backend-store-uri sqlite:///mlflow.db   # for the run links below",
        "```",
        "",
        f"Wall time of the whole comparison: {minutes} min {seconds} s ({len(results)} DVC experiments, "
        f"{run_time / 60:.1f} min inside `dvc exp run`).",
        f"Budget of every task for every row: {budget}. Seeds {spec.seeds}; rows run with every seed: "
        f"{', '.join(name if name != STRONGEST else f'{STRONGEST} ({strongest})' for name in spec.seeded)}; "
        "the other rows ran with the first seed only.",
        "",
        "Scores are in percent; a ± value is the standard deviation over seeds. Routing accuracy applies "
        "to methods that choose task-specific parts without the task label (prototypes or keys). "
        "Trainable / task is the mean number of parameters the optimizer updates per task (projector "
        "included); Stored is what the method keeps for inference after the stream (projector, "
        "generators, prompts, keys, adapters). Latency is routing plus greedy decoding of one test "
        "sample at the evaluation batch size, on the machine that ran the comparison.",
        "",
        table,
        "",
        *_slow_runs(results),
        "![MFN against BWT](results-mfn-bwt.png)",
        "",
        "## Setup and where the methods differ",
        "",
        "- Same for every row: the frozen SmolLM2-135M-Instruct and the EfficientNet-Lite0/MiniLM "
        "encoders, the features, the stream of params.yaml with the budget above (the same samples, "
        "batches and number of optimizer steps per task), the shared projector trained at the "
        "stream's projector learning rate, greedy decoding and the scorers.",
        "- `zero_shot` trains nothing and feeds no visual tokens: the untrained projector's output "
        "means nothing to the LLM.",
        "- `joint` trains on the union of the tasks seen so far (full replay) for the same number "
        "of steps per stage, so it is an upper bound, not a continual method.",
        "- Learning rates are part of each method's recipe, not of the budget: the generators and "
        "LoRA adapters use the stream's `generator_lr`; the prompt pools and task prompts (`l2p`, "
        "`dualprompt`, `coda_prompt`, `modalprompt`) use `lr: 1e-2` from their sections, because "
        "prompt tuning needs larger steps.",
        "- L2P, DualPrompt and CODA-Prompt insert prompts into a frozen ViT in their original form; "
        "here their prompts are soft tokens at the LLM's input, keyed by the frozen pooled image "
        "feature. DualPrompt uses the task identity while training (as in the original) but not "
        "at inference. HiDe-LLaVA's merging of lower-layer adapters is not implemented; every "
        "layer keeps per-task experts.",
        "- Only DRAPE and its ablations protect the projector with null-space updates; every other "
        "method trains it without protection, as LLaVA-based continual baselines fine-tune the "
        "projector with the adapters.",
        "",
    ]
    return "\n".join(lines)


def _slow_runs(results: list[RunResult]) -> list[str]:
    """Name the runs that took over twice the median wall time, as a paragraph (empty if none)."""
    median = statistics.median(result.seconds for result in results)
    slow = [result for result in results if result.seconds > 2 * median]
    if not slow:
        return []
    names = ", ".join(f"`{result.row}` seed {result.seed} ({result.seconds:.0f} s)" for result in slow)
    return [
        f"Runs that took over twice the median run time ({median:.0f} s): {names}. Their wall time "
        "and latency are not comparable with the other rows; on a 2-core machine this happens when "
        "other jobs share the cores.",
        "",
    ]


def rerender(out: Path) -> None:
    """Rewrite ``results.md`` and the plot from the ``results.json`` a comparison wrote into ``out``."""
    raw = json.loads((out / "results.json").read_text())
    spec = ComparisonSpec.model_validate(raw["spec"])
    results = [RunResult(**run) for run in raw["runs"]]
    write_results(out, spec, results, raw["strongest_baseline"], raw["wall_seconds"], raw["command"])


if __name__ == "__main__":
    import sys

    rerender(Path(sys.argv[1] if len(sys.argv) > 1 else "docs"))
