"""Bad input to the pipeline stages: one clear error, and no output that ``dvc repro`` would trust.

Each test damages one input of a small pipeline repository (tiny models, two digit
tasks) and runs the stage that reads it in-process through ``drape.cli.main``. The stage
must exit with status 2 and print a single ``drape: error:`` message that names the file
and line or the key. Its output folder must be absent or unchanged afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_pipeline_repo, small_params, write_params
from drape.cli import main

STREAM = Path("data/stream/digits")
FEATURES = Path("data/features")
TRAIN_RECORDS = STREAM / "train.jsonl"
TRAIN_FEATURES = FEATURES / "digits" / "train.parquet"
TRAIN_RESULTS = Path("results/train")


@pytest.fixture(scope="module")
def prepared_repo(tmp_path_factory, tiny_models) -> Path:
    """A pipeline repository after the data and features stages of digits and the init stage."""
    repo = make_pipeline_repo(tmp_path_factory.mktemp("prepared") / "repo", small_params(), models=tiny_models)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(repo)
        for argv in (["data", "--task", "digits"], ["features", "--task", "digits"], ["init"]):
            assert main(["stage", *argv]) == 0
    return repo


@pytest.fixture
def repo(prepared_repo, tmp_path, monkeypatch) -> Path:
    """A private copy of the prepared repository, made the working directory."""
    copy = tmp_path / "repo"
    shutil.copytree(prepared_repo, copy, symlinks=True)
    monkeypatch.chdir(copy)
    return copy


@pytest.fixture
def repo_before_features(repo) -> Path:
    """The repository as it is before the features stage of digits has run."""
    shutil.rmtree(FEATURES / "digits")
    return repo


def run_stage(capsys, *argv: str) -> tuple[int, str]:
    """Run ``drape stage ARGV`` and return its exit status and standard error."""
    capsys.readouterr()
    status = main(["stage", *argv])
    return status, capsys.readouterr().err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("drape: error:")]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def record_line(path: Path, line_number: int) -> dict:
    return json.loads(path.read_text().splitlines()[line_number - 1])


def replace_line(path: Path, line_number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[line_number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def rewrite_parquet(path: Path, columns: dict[str, pa.Array] | None = None, encoder: dict | None = None) -> None:
    """Rewrite a feature file with some columns replaced and optionally other encoder metadata."""
    table = pq.read_table(path)
    metadata = dict(table.schema.metadata)
    for name, column in (columns or {}).items():
        table = table.set_column(table.schema.get_field_index(name), name, column)
    if encoder is not None:
        stored = json.loads(metadata[b"drape.encoder"])
        metadata[b"drape.encoder"] = json.dumps({**stored, **encoder}).encode()
    pq.write_table(table.replace_schema_metadata(metadata), path)


# ---------------------------------------------------------------------------
# Records and images read by the features stage


def test_features_missing_image(repo_before_features, capsys):
    # A test image, so that train.parquet is already written when the stage fails.
    image = STREAM / record_line(STREAM / "test.jsonl", 2)["image"]
    image.unlink()

    status, stderr = run_stage(capsys, "features", "--task", "digits")

    assert status == 2
    assert "Traceback" not in stderr
    assert len(error_lines(stderr)) == 1
    assert f"{STREAM / 'test.jsonl'}:2:" in error_lines(stderr)[0]
    assert str(image) in error_lines(stderr)[0]
    assert "not found" in error_lines(stderr)[0]
    assert os.listdir(FEATURES) == []


def test_features_corrupt_image(repo_before_features, capsys):
    image = STREAM / record_line(TRAIN_RECORDS, 3)["image"]
    image.write_bytes(b"this is not a PNG file\x00\xff" * 8)

    status, stderr = run_stage(capsys, "features", "--task", "digits")

    assert status == 2
    assert "Traceback" not in stderr
    assert len(error_lines(stderr)) == 1
    assert f"{TRAIN_RECORDS}:3:" in error_lines(stderr)[0]
    assert str(image) in error_lines(stderr)[0]
    assert "corrupt or unreadable image" in error_lines(stderr)[0]
    assert os.listdir(FEATURES) == []


def test_features_malformed_json_line(repo_before_features, capsys):
    replace_line(TRAIN_RECORDS, 3, '{"id": "digits-classify-train-00002", "conversations": [')

    status, stderr = run_stage(capsys, "features", "--task", "digits")

    assert status == 2
    assert "Traceback" not in stderr
    assert len(error_lines(stderr)) == 1
    assert f"{TRAIN_RECORDS}:3: invalid JSON" in error_lines(stderr)[0]
    assert os.listdir(FEATURES) == []


def test_features_empty_instruction(repo_before_features, capsys):
    record = record_line(TRAIN_RECORDS, 2)
    record["conversations"][0]["value"] = "<image>\n  "
    replace_line(TRAIN_RECORDS, 2, json.dumps(record))

    status, stderr = run_stage(capsys, "features", "--task", "digits")

    assert status == 2
    assert "Traceback" not in stderr
    assert len(error_lines(stderr)) == 1
    assert f"{TRAIN_RECORDS}:2: empty instruction" in error_lines(stderr)[0]
    assert os.listdir(FEATURES) == []


def test_features_empty_answer(repo_before_features, capsys):
    record = record_line(TRAIN_RECORDS, 4)
    record["conversations"][1]["value"] = ""
    replace_line(TRAIN_RECORDS, 4, json.dumps(record))

    status, stderr = run_stage(capsys, "features", "--task", "digits")

    assert status == 2
    assert "Traceback" not in stderr
    assert len(error_lines(stderr)) == 1
    assert f"{TRAIN_RECORDS}:4: empty answer" in error_lines(stderr)[0]
    assert os.listdir(FEATURES) == []


# ---------------------------------------------------------------------------
# Task names and params.yaml


def test_train_unknown_task(repo, capsys):
    status, stderr = run_stage(capsys, "train", "--task", "nope")

    assert status == 2
    assert "Traceback" not in stderr
    assert len(error_lines(stderr)) == 1
    assert "unknown task 'nope'" in error_lines(stderr)[0]
    assert "digits, parity" in error_lines(stderr)[0]
    assert os.listdir(TRAIN_RESULTS) == ["init"]


def test_train_unknown_after(repo, capsys):
    params = small_params()
    params["stream"]["parity"]["after"] = "digts"
    write_params(repo, params)

    status, stderr = run_stage(capsys, "train", "--task", "parity")

    assert status == 2
    assert "Traceback" not in stderr
    assert len(error_lines(stderr)) == 1
    assert "params.yaml" in error_lines(stderr)[0]
    assert "stream.parity.after is 'digts' but must be 'digits'" in stderr
    assert os.listdir(TRAIN_RESULTS) == ["init"]


def test_data_kind_typo(repo, capsys):
    params = small_params()
    params["stream"]["digits"]["data"]["kind"] = "digits-clasify"
    write_params(repo, params)
    before = snapshot(STREAM)

    status, stderr = run_stage(capsys, "data", "--task", "digits")

    assert status == 2
    assert "Traceback" not in stderr
    assert len(error_lines(stderr)) == 1
    assert "params.yaml: stream.digits.data.kind: got 'digits-clasify'" in error_lines(stderr)[0]
    assert "allowed values: digits-classify, digits-parity" in error_lines(stderr)[0]
    assert snapshot(STREAM) == before


# ---------------------------------------------------------------------------
# Feature files and checkpoints read by the train stage


def test_train_patches_width_mismatch(repo, capsys):
    table = pq.read_table(TRAIN_FEATURES)
    width = table.schema.field("patches").type.list_size
    narrow = pa.FixedSizeListArray.from_arrays(pa.array([0.0] * (table.num_rows * (width // 2)), pa.float16()), width // 2)
    rewrite_parquet(TRAIN_FEATURES, columns={"patches": narrow})

    status, stderr = run_stage(capsys, "train", "--task", "digits")

    assert status == 2
    assert "Traceback" not in stderr
    assert len(error_lines(stderr)) == 1
    assert f"{TRAIN_FEATURES}: column 'patches' has {width // 2} values" in error_lines(stderr)[0]
    assert "re-run its features stage" in error_lines(stderr)[0]
    assert os.listdir(TRAIN_RESULTS) == ["init"]


def test_train_other_encoder_metadata(repo, capsys):
    rewrite_parquet(TRAIN_FEATURES, encoder={"name": "another-encoder"})

    status, stderr = run_stage(capsys, "train", "--task", "digits")

    assert status == 2
    assert "Traceback" not in stderr
    assert len(error_lines(stderr)) == 1
    assert f"{TRAIN_FEATURES}: features come from encoder name='another-encoder'" in error_lines(stderr)[0]
    assert "re-run the features stage" in error_lines(stderr)[0]
    assert os.listdir(TRAIN_RESULTS) == ["init"]


def test_train_checkpoint_other_hidden(repo, capsys):
    write_params(repo, small_params(drape={"hidden": 64, "heads": 4}))
    before = snapshot(TRAIN_RESULTS)

    status, stderr = run_stage(capsys, "train", "--task", "digits")

    assert status == 2
    assert "Traceback" not in stderr
    assert len(error_lines(stderr)) == 1
    assert f"{TRAIN_RESULTS / 'init' / 'state.json'}:" in error_lines(stderr)[0]
    assert "hidden=32" in error_lines(stderr)[0]
    assert "hidden=64" in error_lines(stderr)[0]
    assert snapshot(TRAIN_RESULTS) == before


def test_init_unknown_lora_target(repo, capsys):
    write_params(repo, small_params(method="seq_lora", seq_lora={"target_modules": ["q_proj", "qq_proj"]}))
    before = snapshot(TRAIN_RESULTS)

    status, stderr = run_stage(capsys, "init")

    assert status == 2
    assert "Traceback" not in stderr
    assert len(error_lines(stderr)) == 1
    message = error_lines(stderr)[0]
    assert "seq_lora.target_modules: 'qq_proj' not found among the LLM's Linear layers" in message
    assert "q_proj" in message.split("use some of:")[1]
    assert snapshot(TRAIN_RESULTS) == before


def test_init_accepts_dotted_lora_target(repo, capsys):
    write_params(repo, small_params(method="seq_lora", seq_lora={"target_modules": ["self_attn.q_proj"]}))

    status, stderr = run_stage(capsys, "init")

    assert status == 0, stderr


# ---------------------------------------------------------------------------
# Report files read by drape show


def show(capsys, report: Path) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(["show", "--report", str(report)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def write_report(folder: Path, metrics_text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "matrix.csv").write_text("trained,digits\ndigits,50.0000\n")
    (folder / "metrics.json").write_text(metrics_text)
    return folder


def test_show_corrupt_metrics(tmp_path, capsys):
    report = write_report(tmp_path / "report", '{"MFN": 50.0,')

    status, _, stderr = show(capsys, report)

    assert status == 2
    assert "Traceback" not in stderr
    assert f"drape: error: {report / 'metrics.json'}: not valid JSON" in stderr
    assert "dvc repro report" in stderr


def test_show_aligns_names_and_marks_missing_values(tmp_path, capsys):
    metrics = {"MFN": 50.0, "BWT": None, "projector_drift": 0.0086, "trainable_parameters_per_task": 2338752.0}
    report = write_report(tmp_path / "report", json.dumps(metrics))

    status, out, _ = show(capsys, report)

    assert status == 0
    lines = out.splitlines()[-4:]
    assert [line.split()[0] for line in lines] == list(metrics)
    # Every value starts in the same column, after the longest name.
    assert len({len(line) - len(line[len(line.split()[0]):].lstrip()) for line in lines}) == 1
    assert lines[1].split(maxsplit=1)[1] == "n/a (needs entries of 2+ tasks)"
    assert lines[2].split()[1] == "0.0086"
    assert lines[3].split()[1] == "2,338,752"


def test_train_batch_larger_than_task_warns(repo, capsys, caplog):
    params = small_params()
    params["stream"]["digits"]["train"]["batch_size"] = 64
    write_params(repo, params)

    with caplog.at_level(logging.WARNING, logger="drape.stages"):
        status, stderr = run_stage(capsys, "train", "--task", "digits")

    assert status == 0, stderr
    assert "stream.digits.train.batch_size is 64 but the task has 8 training samples" in caplog.text
