import math
import subprocess
import sys

import numpy as np
import pytest

from drape.metrics import AccuracyMatrix, MatrixError, compute_metrics, read_matrix_csv, write_matrix_csv

FULL = "trained,a,b,c\na,80,10,5\nb,60,90,20\nc,50,70,100\n"
LOWER = "trained,a,b,c\na,80,,\nb,60,90,\nc,50,70,100\n"


def write(tmp_path, text, name="m.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_metrics_hand_computed(tmp_path):
    metrics = compute_metrics(read_matrix_csv(write(tmp_path, FULL)))
    assert metrics.mfn == pytest.approx((50 + 70 + 100) / 3)
    assert metrics.mft == pytest.approx((80 + 90 + 100) / 3)
    assert metrics.maa == pytest.approx((80 + (60 + 90) / 2 + (50 + 70 + 100) / 3) / 3)
    assert metrics.bwt == pytest.approx(((50 - 80) + (70 - 90)) / 2)
    assert metrics.forgetting == pytest.approx(((80 - 50) + (90 - 70)) / 2)


def test_lower_triangle_gives_same_metrics(tmp_path):
    full = compute_metrics(read_matrix_csv(write(tmp_path, FULL, "full.csv")))
    lower = compute_metrics(read_matrix_csv(write(tmp_path, LOWER, "lower.csv")))
    assert lower == full


def test_forgetting_uses_best_earlier_score(tmp_path):
    # Task a peaks after b (forward gain), then drops: forgetting is measured from the peak.
    text = "trained,a,b,c\na,40,,\nb,70,90,\nc,50,90,60\n"
    metrics = compute_metrics(read_matrix_csv(write(tmp_path, text)))
    assert metrics.forgetting == pytest.approx(((70 - 50) + (90 - 90)) / 2)
    assert metrics.bwt == pytest.approx(((50 - 40) + (90 - 90)) / 2)


def test_rows_follow_training_order_not_columns(tmp_path):
    # Columns listed in another order than training; the diagonal follows the row labels.
    text = "trained,c,a,b\na,,80,\nb,,60,90\nc,100,50,70\n"
    metrics = compute_metrics(read_matrix_csv(write(tmp_path, text)))
    assert metrics.mft == pytest.approx(90.0)
    assert metrics.bwt == pytest.approx(-25.0)


def test_header_without_corner_label(tmp_path):
    text = "a,b\na,90,\nb,70,80\n"
    matrix = read_matrix_csv(write(tmp_path, text))
    assert matrix.tasks == ["a", "b"]
    assert compute_metrics(matrix).mfn == pytest.approx(75.0)


def test_single_stage_has_no_backward_transfer(tmp_path):
    metrics = compute_metrics(read_matrix_csv(write(tmp_path, "trained,a\na,64\n")))
    assert metrics.mfn == 64.0
    assert math.isnan(metrics.bwt)
    assert math.isnan(metrics.forgetting)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("trained,a,b\na,90,x\nb,1,2\n", "m.csv:2: score 'x' for task 'b' is not a number"),
        ("trained,a,b\nz,90,1\n", "m.csv:2: the first cell 'z' must be the task just trained"),
        ("trained,a,b\na,90,1\na,80,2\n", "m.csv:3: task 'a' is trained twice"),
        ("trained,a,b\n", "needs a header row of task names and at least one stage row"),
        ("trained,a,b\na,1,2,3\n", "m.csv:2: 3 scores for 2 tasks"),
    ],
)
def test_bad_matrix_names_line(tmp_path, text, fragment):
    with pytest.raises(MatrixError, match=None) as info:
        read_matrix_csv(write(tmp_path, text))
    assert fragment in str(info.value)


def test_write_then_read_round_trip(tmp_path):
    values = np.array([[80.0, np.nan], [60.0, 90.0]])
    matrix = AccuracyMatrix(tasks=["a", "b"], trained=["a", "b"], values=values)
    write_matrix_csv(matrix, tmp_path / "out.csv")
    again = read_matrix_csv(tmp_path / "out.csv")
    np.testing.assert_allclose(again.values, values)


def test_metrics_command_prints_all_metrics(tmp_path):
    path = write(tmp_path, LOWER)
    result = subprocess.run([sys.executable, "-m", "drape.cli", "metrics", "--matrix", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name, value in [("MFN", "73.33"), ("MFT", "90.00"), ("MAA", "76.11"), ("BWT", "-25.00"), ("forgetting", "25.00")]:
        line = next(line for line in result.stdout.splitlines() if line.startswith(name))
        assert line.split()[-1] == value


def test_metrics_command_reports_bad_file(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "drape.cli", "metrics", "--matrix", str(tmp_path / "missing.csv")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "missing.csv" in result.stderr
    assert "Traceback" not in result.stderr


def test_custom_corner_label_without_trailing_commas(tmp_path):
    text = "step,a,b,c\na,80\nb,60,90\nc,50,70,100\n"
    metrics = compute_metrics(read_matrix_csv(write(tmp_path, text)))
    assert metrics.mft == pytest.approx(90.0)
    assert metrics.mfn == pytest.approx((50 + 70 + 100) / 3)


@pytest.mark.parametrize("cell", ["950", "-70", "inf", "nan"])
def test_score_outside_percent_range_rejected(tmp_path, cell):
    with pytest.raises(MatrixError) as info:
        read_matrix_csv(write(tmp_path, f"trained,a\na,{cell}\n"))
    assert f"score '{cell}' for task 'a' is not a number from 0 to 100" in str(info.value)


def test_binary_file_rejected(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(MatrixError) as info:
        read_matrix_csv(path)
    assert "not a UTF-8 text file" in str(info.value)


def test_semicolon_separated_file_rejected(tmp_path):
    with pytest.raises(MatrixError) as info:
        read_matrix_csv(write(tmp_path, "trained;a;b\na;90;\nb;80;85\n"))
    assert "must be comma-separated" in str(info.value)


def test_metrics_json_has_null_for_undefined(tmp_path):
    path = write(tmp_path, "trained,a\na,64\n")
    result = subprocess.run(
        [sys.executable, "-m", "drape.cli", "metrics", "--matrix", str(path), "--json"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    import json

    metrics = json.loads(result.stdout)
    assert metrics["MFN"] == 64.0
    assert metrics["BWT"] is None
