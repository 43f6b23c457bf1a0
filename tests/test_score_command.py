"""The ``drape score`` command on prediction files written by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from drape.cli import main
from drape.scorers import CAPTION_METRICS


def write_lines(path: Path, lines: list) -> Path:
    """Write each item as one line: dicts as JSON, strings as they are."""
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in lines))
    return path


VQA_LINES = [
    {"prediction": "Two", "answers": ["2"] * 3 + ["3"] * 7},  # 0.9
    {"prediction": "unanswerable", "answers": ["unanswerable"] * 10},  # 1.0
    {"prediction": "red", "answer": "blue"},  # 0.0
    {"prediction": "1,000", "answers": ["1000"] + ["100"] * 9},  # 0.3
]


def test_score_vqa_prints_percent_and_counts(tmp_path, capsys):
    path = write_lines(tmp_path / "predictions.jsonl", VQA_LINES)

    assert main(["score", "--scorer", "vqa_accuracy", str(path)]) == 0

    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["vqa_accuracy", "55.00"]  # (0.9 + 1 + 0 + 0.3) / 4
    assert out[1] == "lines scored: 4, skipped: 0"


def test_score_json_output(tmp_path, capsys):
    path = write_lines(tmp_path / "predictions.jsonl", VQA_LINES)

    assert main(["score", "--scorer", "vqa_accuracy", "--json", str(path)]) == 0

    result = json.loads(capsys.readouterr().out)
    assert result["scorer"] == "vqa_accuracy"
    assert result["scored"] == 4
    assert result["skipped"] == 0
    assert result["metrics"] == {"vqa_accuracy": pytest.approx(55.0)}
    assert result["problems"] == []


BAD_LINES = [
    {"prediction": "blue", "answer": "blue"},
    "{not json",
    {"answer": "blue"},
    {"prediction": "blue"},
    "",
    {"prediction": "blue", "answers": []},
    {"prediction": 3, "answer": "3"},
    ["prediction", "blue"],
    {"prediction": "red", "answer": "blue"},
]


def test_score_names_every_bad_line_and_exits_1(tmp_path, capsys):
    path = write_lines(tmp_path / "predictions.jsonl", BAD_LINES)

    assert main(["score", "--scorer", "exact_match", str(path)]) == 1

    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["exact_match        50.00", "lines scored: 2, skipped: 6"]
    errors = captured.err.splitlines()
    assert errors[0].startswith(f"{path}:2: invalid JSON")
    assert errors[1] == f"{path}:3: missing 'prediction'"
    assert errors[2] == f"{path}:4: missing 'answer', 'answers' or 'box'"
    assert errors[3].startswith(f"{path}:6: 'answers' must be a non-empty list")
    assert errors[4] == f"{path}:7: 'prediction' must be a string, got int"
    assert errors[5] == f"{path}:8: expected a JSON object, got list"
    assert "6 lines of" in errors[6]
    assert "--skip-invalid" in errors[6]


def test_score_skip_invalid_exits_0(tmp_path, capsys):
    path = write_lines(tmp_path / "predictions.jsonl", BAD_LINES)

    assert main(["score", "--scorer", "exact_match", "--skip-invalid", "--json", str(path)]) == 0

    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["scored"] == 2
    assert result["skipped"] == 6
    assert [problem["line"] for problem in result["problems"]] == [2, 3, 4, 6, 7, 8]
    assert f"{path}:3: missing 'prediction'" in captured.err


def test_score_scorer_rejection_is_a_bad_line(tmp_path, capsys):
    path = write_lines(
        tmp_path / "predictions.jsonl",
        [
            {"prediction": "(B)", "answer": "B"},
            {"prediction": "B", "answer": "bag"},
        ],
    )

    assert main(["score", "--scorer", "choice_letter", str(path)]) == 1

    captured = capsys.readouterr()
    assert "lines scored: 1, skipped: 1" in captured.out
    assert f"{path}:2: choice_letter scorer: record 'line 2' has answer 'bag', not a letter A-E" in captured.err


def test_score_choice_letter_reads_instruction(tmp_path, capsys):
    instruction = "Which item?\nA. sneaker\nB. bag\nAnswer with the option's letter."
    path = write_lines(tmp_path / "predictions.jsonl", [{"prediction": "bag", "answer": "B", "instruction": instruction}])

    assert main(["score", "--scorer", "choice_letter", str(path)]) == 0
    assert capsys.readouterr().out.split()[:2] == ["choice_letter", "100.00"]


def test_score_grounding_box_field_and_bad_box(tmp_path, capsys):
    path = write_lines(
        tmp_path / "predictions.jsonl",
        [
            {"prediction": "[0.0, 0.0, 0.5, 1.0]", "answer": "[0.00, 0.00, 1.00, 1.00]"},  # IoU 0.5
            {"prediction": "[0.5, 0.5, 1.0, 1.0]", "answer": "the left cat", "box": [0.5, 0.5, 1.0, 1.0]},
            {"prediction": "no idea", "answer": "[0.00, 0.00, 1.00, 1.00]"},  # malformed prediction: 0
            {"prediction": "[0, 0, 1, 1]", "answer": "the cat", "box": [0, 0, 1]},
            {"prediction": "[0, 0, 1, 1]", "answer": "the cat"},
        ],
    )

    assert main(["score", "--scorer", "grounding_iou", str(path)]) == 1

    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].split() == ["grounding_iou", "66.67"]
    assert "lines scored: 3, skipped: 2" in captured.out
    assert f"{path}:4: 'box' must be a list of four finite numbers" in captured.err
    assert f"{path}:5: grounding_iou scorer: record 'line 5' has no valid reference box" in captured.err


def test_score_caption_prints_every_metric(tmp_path, capsys):
    path = write_lines(
        tmp_path / "predictions.jsonl",
        [
            {"prediction": "a b", "answers": ["a b", "x y"]},
            {"prediction": "c d", "answer": "c d"},
        ],
    )

    assert main(["score", "--scorer", "caption", "--json", str(path)]) == 0

    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert list(metrics) == list(CAPTION_METRICS)
    assert metrics["ROUGE-L"] == pytest.approx(100.0)
    assert metrics["BLEU-1"] == pytest.approx(100.0)


def test_score_unknown_scorer_lists_names(tmp_path, capsys):
    path = write_lines(tmp_path / "predictions.jsonl", VQA_LINES)

    assert main(["score", "--scorer", "bleu", str(path)]) == 2

    err = capsys.readouterr().err
    assert "drape: error: unknown scorer 'bleu'; known scorers: caption, choice_letter" in err


def test_score_missing_file(tmp_path, capsys):
    assert main(["score", "--scorer", "exact_match", str(tmp_path / "absent.jsonl")]) == 2
    assert "absent.jsonl: No such file or directory" in capsys.readouterr().err


def test_score_empty_file(tmp_path, capsys):
    path = write_lines(tmp_path / "predictions.jsonl", ["", "  "])

    assert main(["score", "--scorer", "exact_match", str(path)]) == 2
    assert "no predictions found" in capsys.readouterr().err


def test_score_no_usable_line_exits_1(tmp_path, capsys):
    path = write_lines(tmp_path / "predictions.jsonl", ["{bad", {"answer": "x"}])

    assert main(["score", "--scorer", "exact_match", "--skip-invalid", str(path)]) == 1

    captured = capsys.readouterr()
    assert "lines scored: 0, skipped: 2" in captured.out
    assert "no line could be scored" in captured.err


def test_score_reads_evaluate_stage_output(tmp_path, capsys):
    # The evaluate stage writes these keys to predictions.jsonl.
    row = {
        "task": "shape",
        "id": "shapes-choice-3",
        "instruction": "Which shape is in the image? A. circle B. rectangle C. triangle.",
        "prediction": "C",
        "answer": "C",
        "routed_task": "shape",
        "score": 1.0,
    }
    path = write_lines(tmp_path / "predictions.jsonl", [row])

    assert main(["score", "--scorer", "choice_letter", str(path)]) == 0
    assert capsys.readouterr().out.split()[:2] == ["choice_letter", "100.00"]


STAGE_ROWS = [
    {"task": "digits", "id": "d-0", "instruction": "Which digit?", "prediction": "7", "answer": "7"},
    {"task": "shape", "id": "s-0", "instruction": "A. circle B. square", "prediction": "B", "answer": "B"},
    {"task": "shape", "id": "s-1", "instruction": "A. circle B. square", "prediction": "B", "answer": "A"},
]


def test_score_task_selects_its_lines(tmp_path, capsys):
    path = write_lines(tmp_path / "predictions.jsonl", STAGE_ROWS)

    assert main(["score", "--scorer", "choice_letter", "--task", "shape", "--json", str(path)]) == 0

    captured = capsys.readouterr()
    output = json.loads(captured.out)
    assert output["metrics"] == {"choice_letter": 50.0}
    assert output["scored"] == 2
    assert output["other_task_lines"] == 1
    assert output["task"] == "shape"
    assert "warning" not in captured.err


def test_score_several_tasks_warns(tmp_path, capsys):
    path = write_lines(tmp_path / "predictions.jsonl", STAGE_ROWS)

    assert main(["score", "--scorer", "exact_match", str(path)]) == 0

    err = capsys.readouterr().err
    assert "holds the predictions of 2 tasks (digits, shape)" in err
    assert "--task NAME" in err


def test_score_unknown_task_lists_tasks(tmp_path, capsys):
    path = write_lines(tmp_path / "predictions.jsonl", STAGE_ROWS)

    assert main(["score", "--scorer", "exact_match", "--task", "color", str(path)]) == 2

    err = capsys.readouterr().err
    assert f"drape: error: {path}: no line has task 'color'; the file's tasks: digits, shape" in err


def test_score_task_line_without_task_field(tmp_path, capsys):
    path = write_lines(tmp_path / "predictions.jsonl", [STAGE_ROWS[1], {"prediction": "B", "answer": "B"}])

    assert main(["score", "--scorer", "choice_letter", "--task", "shape", str(path)]) == 1

    err = capsys.readouterr().err
    assert f"{path}:2: missing 'task', so the line cannot be matched to --task shape" in err
    assert "1 line of" in err


def test_score_accepts_byte_order_mark(tmp_path, capsys):
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in VQA_LINES), encoding="utf-8-sig")

    assert main(["score", "--scorer", "vqa_accuracy", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "lines scored: 4, skipped: 0"


def test_score_grounding_box_without_answer(tmp_path, capsys):
    path = write_lines(tmp_path / "predictions.jsonl", [
        {"prediction": "[0.1, 0.2, 0.5, 0.6]", "box": [0.1, 0.2, 0.5, 0.6]},
        {"prediction": "[0.6, 0.6, 0.9, 0.9]", "box": [0, 0, 0.5, 0.5]},
    ])

    assert main(["score", "--scorer", "grounding_iou", str(path)]) == 0
    assert capsys.readouterr().out.split()[:2] == ["grounding_iou", "50.00"]
