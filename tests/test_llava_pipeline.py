"""The llava presets in the pipeline: CoIN and UCIT fixture files through every stage on CPU.

``llava-7b-scaled`` has the classes of ``llava-7b`` (open_clip ViT-L-14-336 and its text
tower, a Llama LLM with the Vicuna v1 template, LLaVA's projector file) at small widths
with random weights. Its scores are near zero, so the checks are on shapes, coverage,
the import of the projector and how scores are computed from the saved predictions.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_pipeline_repo, small_params
from drape.cli import main
from drape.data.records import read_records
from drape.encoders import load_llm
from drape.metrics import read_matrix_csv
from drape.mllm import FrozenLLM
from drape.presets.conversation import VICUNA_V1_SYSTEM
from drape.presets.llava_weights import CLIP_WEIGHTS_ENV, LLM_DIR_ENV, MM_PROJECTOR_KEYS, PROJECTOR_ENV
from drape.scorers import CAPTION_METRICS, caption_metrics, caption_rouge_l
from test_benchmarks import conversation, question, save_png, write_json

# Stream task name -> (benchmark, task key): every CoIN task, then every UCIT task, in
# their published orders.
TASKS = {
    "scienceqa": ("coin", "scienceqa"),
    "textvqa": ("coin", "textvqa"),
    "imagenet": ("coin", "imagenet"),
    "gqa": ("coin", "gqa"),
    "vizwiz": ("coin", "vizwiz"),
    "grounding": ("coin", "grounding"),
    "vqav2": ("coin", "vqav2"),
    "ocrvqa": ("coin", "ocrvqa"),
    "imagenet-r": ("ucit", "imagenet-r"),
    "arxivqa": ("ucit", "arxivqa"),
    "vizwiz-caption": ("ucit", "vizwiz-caption"),
    "iconqa": ("ucit", "iconqa"),
    "clevr-math": ("ucit", "clevr-math"),
    "flickr30k": ("ucit", "flickr30k"),
}
CAPTION_TASK = "flickr30k"
CAPTION_TASKS = ["vizwiz-caption", "flickr30k"]


def write_coin(root: Path) -> None:
    """A few records of every CoIN task in CoIN's file layout, with images under ``cl_dataset``."""
    images = root / "cl_dataset"
    for index in range(4):
        save_png(images / "ScienceQA" / "train" / f"{index}" / "image.png", (10, 40 * index, 90))
        save_png(images / "TextVQA" / "train_images" / f"t{index}.jpg", (200, 20 * index, 30))
        save_png(images / "COCO2014" / "train2014" / f"{index}.png", (40 * index, 10, 200))
    instructions = root / "playground" / "Instructions"

    choices = "Which is a mammal?\nA. trout\nB. whale\nAnswer with the option's letter from the given choices directly."
    write_json(instructions / "ScienceQA" / "train.json", [
        conversation("sqa-0", "ScienceQA/train/0/image.png", f"<image>\n{choices}", "B"),
        conversation("sqa-1", "ScienceQA/train/1/image.png", f"<image>\n{choices}", "B"),
        conversation("sqa-2", None, choices, "B"),
    ])
    write_json(instructions / "ScienceQA" / "test.json", [
        question("sqa-t0", "ScienceQA/train/2/image.png", choices, answer="B"),
        question("sqa-t1", "ScienceQA/train/3/image.png", choices, answer="A"),
    ])

    ocr = "What is written on the sign?\nAnswer the question using a single word or phrase."
    write_json(instructions / "TextVQA" / "train.json", [
        conversation("tv-0", "TextVQA/train_images/t0.jpg", f"<image>\n{ocr}", "stop"),
        conversation("tv-1", "TextVQA/train_images/t1.jpg", f"<image>\n{ocr}", "exit"),
        conversation("tv-2", "TextVQA/train_images/t2.jpg", f"<image>\n{ocr}", "open"),
    ])
    write_json(instructions / "TextVQA" / "test.json", [
        question("tv-t0", "TextVQA/train_images/t3.jpg", ocr, answers=["stop", "stop", "STOP", "halt"]),
        question("tv-t1", "TextVQA/train_images/t0.jpg", ocr, answers=[{"answer": "exit"}, {"answer": "exit"}, {"answer": "out"}]),
    ])

    refer = "Please provide the bounding box coordinate of the region this sentence describes: man in red."
    write_json(instructions / "Grounding" / "train.json", [
        conversation("g-0", "COCO2014/train2014/0.png", f"<image>\n{refer}", "[0.10, 0.20, 0.50, 0.60]"),
        conversation("g-1", "COCO2014/train2014/1.png", f"<image>\n{refer}", "[0.30, 0.30, 0.90, 0.80]"),
    ])
    write_json(instructions / "Grounding" / "test.json", [
        question(7, "COCO2014/train2014/2.png", refer, answer_bbox="[0.12, 0.30, 0.58, 0.91]", size=[640, 480]),
        question(8, "COCO2014/train2014/3.png", refer, answer_bbox="[0.2, 0.2, 0.4, 0.4]", size=[640, 480]),
    ])

    short = "Answer the question using a single word or phrase."
    for index in range(4):
        save_png(images / "ImageNet" / "train" / "n01440764" / f"{index}.JPEG", (90, 60 + 30 * index, 40))
        save_png(images / "GQA" / "images" / f"n{index}.jpg", (20, 90, 30 * index))
        save_png(images / "VizWiz" / "train" / f"VizWiz_train_{index:08d}.jpg", (120, 30 * index, 120))
        save_png(images / "OCR-VQA" / "images" / f"{index}.jpg", (30 * index, 200, 200))
    imagenet = f"What is the object in the image?\n{short}"
    write_json(instructions / "ImageNet" / "train.json", [
        conversation("in-0", "ImageNet/train/n01440764/0.JPEG", f"<image>\n{imagenet}", "tench"),
        conversation("in-1", "ImageNet/train/n01440764/1.JPEG", f"<image>\n{imagenet}", "tench"),
    ])
    write_json(instructions / "ImageNet" / "test.json", [
        question("in-t0", "ImageNet/train/n01440764/2.JPEG", imagenet, answer="tench"),
        question("in-t1", "ImageNet/train/n01440764/3.JPEG", imagenet, answer="goldfish"),
    ])
    write_json(instructions / "GQA" / "train.json", [
        conversation("gqa-0", "GQA/images/n0.jpg", f"<image>\nIs the sky blue?\n{short}", "yes"),
        conversation("gqa-1", "GQA/images/n1.jpg", f"<image>\nWhat is on the table?\n{short}", "laptop"),
    ])
    write_json(instructions / "GQA" / "test.json", [
        question("gqa-t0", "GQA/images/n2.jpg", f"Is the sky blue?\n{short}", answer="no"),
        question("gqa-t1", "GQA/images/n3.jpg", f"Which side is the cup on?\n{short}", answer="left"),
    ])
    vizwiz = f"What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n{short}"
    write_json(instructions / "VizWiz" / "train.json", [
        conversation("vw-0", "VizWiz/train/VizWiz_train_00000000.jpg", f"<image>\n{vizwiz}", "unanswerable"),
        conversation("vw-1", "VizWiz/train/VizWiz_train_00000001.jpg", f"<image>\n{vizwiz}", "soup"),
    ])
    # VizWiz annotations are objects with an annotator's response and confidence.
    write_json(instructions / "VizWiz" / "test.json", [
        question("vw-t0", "VizWiz/train/VizWiz_train_00000002.jpg", vizwiz, answers=[
            {"answer": "unanswerable", "answer_confidence": "yes"}, {"answer": "unanswerable", "answer_confidence": "maybe"},
            {"answer": "unsuitable image", "answer_confidence": "yes"},
        ]),
        question("vw-t1", "VizWiz/train/VizWiz_train_00000003.jpg", vizwiz, answers=["corn", "corn", "canned corn"]),
    ])
    write_json(instructions / "VQAv2" / "train.json", [
        conversation("vqa-0", "COCO2014/train2014/0.png", f"<image>\nWhat color is the bus?\n{short}", "red"),
        conversation("vqa-1", "COCO2014/train2014/1.png", f"<image>\nHow many people are there?\n{short}", "2"),
    ])
    write_json(instructions / "VQAv2" / "test.json", [
        question("vqa-t0", "COCO2014/train2014/2.png", f"How many people are there?\n{short}", answers=["two", "2", "2", "3"]),
        question("vqa-t1", "COCO2014/train2014/3.png", f"What color is the bus?\n{short}", answers=["red"] * 9 + ["orange"]),
    ])
    # OCR-VQA's training records are multi-turn: several questions about one book cover.
    write_json(instructions / "OCRVQA" / "train.json", [
        conversation("ocr-0", "OCR-VQA/images/0.jpg", f"<image>\nWho wrote this book?\n{short}", "Jane Austen",
                     "What is the title of this book?", "Emma", "Is this a romance book?", "Yes"),
        conversation("ocr-1", "OCR-VQA/images/1.jpg", f"<image>\nWhat type of book is this?\n{short}", "Cookbooks, Food & Wine"),
    ])
    write_json(instructions / "OCRVQA" / "test.json", [
        question("ocr-t0", "OCR-VQA/images/2.jpg", f"What is the title of this book?\n{short}", answer="Dune"),
        question("ocr-t1", "OCR-VQA/images/3.jpg", f"Is this a comedy book?\n{short}", answer="No"),
    ])


def write_ucit(root: Path) -> None:
    """A few records of every UCIT task in UCIT's file layout: conversations for training, questions for testing."""
    images = root / "datasets" / "ImageNet-R"
    for index in range(4):
        save_png(images / "goldfish" / f"{index}.jpg", (250, 120, 20 * index))
        save_png(root / "datasets" / "Flickr30k" / f"{1000 + index}.jpg", (30 * index, 160, 60))
    prompt = "What is the object in the image?\nAnswer the question using a single word or phrase."
    write_json(root / "instructions" / "ImageNet-R" / "train.json", [
        conversation("r-0", "ImageNet-R/goldfish/0.jpg", f"<image>\n{prompt}", "goldfish"),
        conversation("r-1", "ImageNet-R/goldfish/1.jpg", f"<image>\n{prompt}", "goldfish"),
    ])
    write_json(root / "instructions" / "ImageNet-R" / "test_3000.json", [
        question("r-t0", "ImageNet-R/goldfish/2.jpg", prompt, answer="goldfish"),
        question("r-t1", "ImageNet-R/goldfish/3.jpg", prompt, answer="goldfish"),
    ])

    brief = "Provide a one-sentence caption for the provided image."
    write_json(root / "instructions" / "Flickr30k" / "train_brief_4w.json", [
        conversation("f-0", "Flickr30k/1000.jpg", f"<image>\n{brief}", "A dog runs across a green field."),
        conversation("f-1", "Flickr30k/1001.jpg", f"{brief}\n<image>", "Two men play guitar on a stage."),
    ])
    # Several reference captions per test image, as Flickr30k has five.
    write_json(root / "instructions" / "Flickr30k" / "test_3000.json", [
        question("f-t0", "Flickr30k/1002.jpg", brief, answers=[
            "A child in a red coat walks in the snow.", "A kid walks through snow.", "A small child is outside in winter.",
        ]),
        question("f-t1", "Flickr30k/1003.jpg", brief, answers=[
            "A woman rides a bicycle down a city street.", "A cyclist on a busy road.",
        ]),
    ])

    short = "Answer the question using a single word or phrase."
    choice = "Answer with the option's letter from the given choices directly."
    datasets = root / "datasets"
    for index in range(4):
        save_png(datasets / "ArxivQA" / "images" / f"{index}.jpg", (240, 240, 30 * index))
        save_png(datasets / "VizWiz" / "train" / f"VizWiz_train_{index:08d}.jpg", (60, 30 * index, 60))
        save_png(datasets / "IconQA" / "train" / f"{index}" / "image.png", (30 * index, 30, 160))
        save_png(datasets / "CLEVR" / "images" / f"CLEVR_train_{index:06d}.png", (128, 128, 30 * index))
    plot = f"Which trend does the plot show?\nA. rising\nB. falling\nC. flat\nD. periodic\n{choice}"
    write_json(root / "instructions" / "ArxivQA" / "train_4w.json", [
        conversation("ax-0", "ArxivQA/images/0.jpg", f"<image>\n{plot}", "A"),
        conversation("ax-1", "ArxivQA/images/1.jpg", f"<image>\n{plot}", "C"),
    ])
    write_json(root / "instructions" / "ArxivQA" / "test_3000.json", [
        question("ax-t0", "ArxivQA/images/2.jpg", plot, answer="B"),
        question("ax-t1", "ArxivQA/images/3.jpg", plot, answer="D"),
    ])
    write_json(root / "instructions" / "VizWiz" / "train.json", [
        conversation("vc-0", "VizWiz/train/VizWiz_train_00000000.jpg", f"<image>\n{brief}", "A can of soup on a kitchen counter."),
        conversation("vc-1", "VizWiz/train/VizWiz_train_00000001.jpg", f"<image>\n{brief}", "A blurry photo of a white ceiling."),
    ])
    write_json(root / "instructions" / "VizWiz" / "test_3000.json", [
        question("vc-t0", "VizWiz/train/VizWiz_train_00000002.jpg", brief, answers=[
            "A bottle of shampoo held in a hand.", "A hand holds a plastic bottle.", "Shampoo bottle.",
        ]),
        question("vc-t1", "VizWiz/train/VizWiz_train_00000003.jpg", brief, answers=[
            "A computer screen showing an error message.", "A monitor with text on it.",
        ]),
    ])
    shapes = f"Which shape comes next?\nA. circle\nB. square\nC. triangle\n{choice}"
    write_json(root / "instructions" / "IconQA" / "train.json", [
        conversation("iq-0", "IconQA/train/0/image.png", f"<image>\n{shapes}", "B"),
        conversation("iq-1", "IconQA/train/1/image.png", f"<image>\n{shapes}", "A"),
    ])
    write_json(root / "instructions" / "IconQA" / "test_3000.json", [
        question("iq-t0", "IconQA/train/2/image.png", shapes, answer="C"),
        question("iq-t1", "IconQA/train/3/image.png", shapes, answer="A"),
    ])
    math = f"Subtract all red cubes. How many objects are left?\n{short}"
    write_json(root / "instructions" / "CLEVR" / "train_4w.json", [
        conversation("cm-0", "CLEVR/images/CLEVR_train_000000.png", f"<image>\n{math}", "3"),
        conversation("cm-1", "CLEVR/images/CLEVR_train_000001.png", f"<image>\n{math}", "5"),
    ])
    write_json(root / "instructions" / "CLEVR" / "test_3000.json", [
        question("cm-t0", "CLEVR/images/CLEVR_train_000002.png", math, answer="4"),
        question("cm-t1", "CLEVR/images/CLEVR_train_000003.png", math, answer="0"),
    ])


def llava_params(coin: Path, ucit: Path, preset: str = "llava-7b-scaled", **models) -> dict:
    roots = {"coin": coin, "ucit": ucit}
    stream, after = {}, "init"
    for name, (benchmark, key) in TASKS.items():
        stream[name] = {
            "after": after,
            "data": {"kind": "benchmark", "benchmark": benchmark, "task": key, "root": str(roots[benchmark])},
            "train": {"epochs": 1, "batch_size": 2, "generator_lr": 1e-3, "projector_lr": 1e-3},
        }
        after = name
    params = small_params(preset=preset, stream=stream, method="drape")
    params["models"].update(models)
    return params


def run_in(repo: Path, *commands: list[str]) -> list[int]:
    previous = os.getcwd()
    os.chdir(repo)
    try:
        return [main(command) for command in commands]
    finally:
        os.chdir(previous)


@pytest.fixture(scope="module")
def llava_run(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("benchmarks")
    write_coin(data / "coin")
    write_ucit(data / "ucit")
    repo = make_pipeline_repo(tmp_path_factory.mktemp("llava") / "repo", llava_params(data / "coin", data / "ucit"))

    commands = [["stage", "data", "--task", name] for name in TASKS]
    commands.append(["stage", "models"])
    commands += [["stage", "features", "--task", name] for name in TASKS]
    commands.append(["stage", "init"])
    for name in TASKS:
        commands += [
            ["stage", "train", "--task", name],
            ["stage", "prototypes", "--task", name],
            ["stage", "evaluate", "--task", name],
        ]
    commands.append(["stage", "report", "--no-mlflow"])
    codes = run_in(repo, *commands)
    assert codes == [0] * len(commands), list(zip(codes, commands))
    return repo


def test_matrix_covers_every_task(llava_run):
    matrix = read_matrix_csv(llava_run / "results/report/matrix.csv")
    assert matrix.tasks == list(TASKS)
    assert matrix.trained == list(TASKS)
    assert np.isfinite(matrix.values).all()
    assert (matrix.values >= 0).all()
    # CIDEr x 100, the caption task's entry, can exceed 100; the other entries are percentages.
    caption_column = matrix.tasks.index(CAPTION_TASK)
    assert (np.delete(matrix.values, caption_column, axis=1) <= 100).all()


def saved_predictions(repo: Path, stage: str, task: str) -> list[dict]:
    lines = (repo / "results/eval" / stage / "predictions.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["task"] == task]


@pytest.mark.parametrize("caption_task", CAPTION_TASKS)
def test_caption_entry_is_corpus_cider(llava_run, caption_task):
    # The random model's captions share no word with the references, so every metric is
    # about 0 here. The score_split tests in test_scorers.py check that each setting of
    # evaluate.caption_metric puts its own value in the matrix.
    records = {record.id: record for record in read_records(llava_run / "data/stream" / caption_task / "test.jsonl", check_images=False)}
    assert all(len(record.answers) >= 2 for record in records.values())
    matrix = read_matrix_csv(llava_run / "results/report/matrix.csv")
    column = matrix.tasks.index(caption_task)

    for row, stage in enumerate(TASKS):
        rows = saved_predictions(llava_run, stage, caption_task)
        predictions = [item["prediction"] for item in rows]
        references = [records[item["id"]] for item in rows]
        expected = {name: 100.0 * value for name, value in caption_metrics(predictions, references).items()}
        scores = json.loads((llava_run / "results/eval" / stage / "scores.json").read_text())

        assert len(rows) == len(records)
        assert scores["matrix_metric"] == dict.fromkeys(CAPTION_TASKS, "CIDEr")
        assert scores["corpus_metrics"][caption_task] == pytest.approx(expected)
        assert list(scores["corpus_metrics"][caption_task]) == list(CAPTION_METRICS)
        assert scores["scores"][caption_task] == pytest.approx(expected["CIDEr"])
        # matrix.csv keeps four decimals.
        assert matrix.values[row, column] == pytest.approx(expected["CIDEr"], abs=1e-4)


def test_heatmap_title_names_caption_tasks(llava_run):
    from drape.config import load_config
    from drape.report import heatmap_title

    title = heatmap_title(load_config(llava_run / "params.yaml"))
    assert title.endswith("vizwiz-caption, flickr30k: CIDEr x 100")


def test_caption_sample_score_is_rouge_l(llava_run):
    records = {record.id: record for record in read_records(llava_run / "data/stream" / CAPTION_TASK / "test.jsonl", check_images=False)}
    for item in saved_predictions(llava_run, CAPTION_TASK, CAPTION_TASK):
        assert item["score"] == pytest.approx(caption_rouge_l(item["prediction"], records[item["id"]]))


def test_non_caption_outputs_lack_corpus_fields(llava_run):
    for stage in TASKS:
        scores = json.loads((llava_run / "results/eval" / stage / "scores.json").read_text())
        assert list(scores) == ["trained", "scores", "timing", "corpus_metrics", "matrix_metric"]
        assert list(scores["corpus_metrics"]) == CAPTION_TASKS
        assert list(scores["matrix_metric"]) == CAPTION_TASKS
        for task in TASKS:
            for item in saved_predictions(llava_run, stage, task):
                keys = ["task", "id", "instruction", "prediction", "answer", "routed_task", "score"]
                if "answers" in item:
                    keys.insert(5, "answers")
                assert list(item) == keys


@pytest.mark.parametrize(("task", "scorer"), [("textvqa", "vqa_accuracy"), ("vizwiz", "vqa_accuracy"), (CAPTION_TASK, "caption")])
def test_saved_predictions_rescore_as_stage(llava_run, task, scorer, tmp_path):
    """``drape score`` on predictions.jsonl scores against every reference, as the evaluate stage does."""
    from drape.scorers import get_scorer, score_corpus
    from drape.scorers.rescore import rescore_file

    records = {record.id: record for record in read_records(llava_run / "data/stream" / task / "test.jsonl", check_images=False)}
    rows = saved_predictions(llava_run, task, task)
    for row in rows:
        assert row["answers"] == list(records[row["id"]].answers)
    # Predict a second annotator's answer or reference caption, which a file with one
    # reference per sample would score lower.
    edited = [{**row, "prediction": row["answers"][1]} for row in rows]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in edited))

    result = rescore_file(scorer, path)
    assert result.problems == []
    predictions = [row["prediction"] for row in edited]
    references = [records[row["id"]] for row in edited]
    if scorer == "caption":
        assert result.metrics == pytest.approx(score_corpus(scorer, predictions, references))
    else:
        expected = [get_scorer(scorer)(prediction, record) for prediction, record in zip(predictions, references)]
        assert result.metrics[scorer] == pytest.approx(sum(expected) / len(expected))
        assert result.metrics[scorer] > 0


def test_caption_metrics_mlflow_names(llava_run):
    from drape.tracking import caption_metrics_for_mlflow

    scores = json.loads((llava_run / "results/eval" / CAPTION_TASK / "scores.json").read_text())
    names = caption_metrics_for_mlflow(scores)
    assert sorted(names) == sorted(f"caption.{metric}.{task}" for task in CAPTION_TASKS for metric in CAPTION_METRICS)
    assert names[f"caption.CIDEr.{CAPTION_TASK}"] == scores["corpus_metrics"][CAPTION_TASK]["CIDEr"]
    assert caption_metrics_for_mlflow({"trained": "scienceqa", "scores": {"scienceqa": 50.0}, "timing": {}}) == {}


def test_report_logs_caption_metrics_to_mlflow(llava_run):
    from mlflow.tracking import MlflowClient

    # Runs the report stage again, now with MLflow; it rewrites the same report files.
    assert run_in(llava_run, ["stage", "report"]) == [0]
    client = MlflowClient(tracking_uri=f"sqlite:///{llava_run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("drape-mini-stream")
    children = [run for run in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in run.data.tags]
    assert sorted(run.data.tags["task"] for run in children) == sorted(TASKS)
    for run in children:
        scores = json.loads((llava_run / "results/eval" / run.data.tags["task"] / "scores.json").read_text())
        for task in CAPTION_TASKS:
            for metric, value in scores["corpus_metrics"][task].items():
                assert run.data.metrics[f"caption.{metric}.{task}"] == pytest.approx(value)
        logged = {name.rsplit(".", 1)[1] for name in run.data.metrics if name.startswith("caption.")}
        assert logged == set(CAPTION_TASKS)


def test_metrics_are_finite(llava_run):
    metrics = json.loads((llava_run / "results/report/metrics.json").read_text())
    for key in ("MFN", "MFT", "MAA", "BWT", "forgetting", "routing_accuracy", "projector_drift"):
        assert math.isfinite(metrics[key]), key


def test_manifest_records_scaled_preset(llava_run):
    manifest = json.loads((llava_run / "models/manifest.json").read_text())
    assert manifest["preset"] == "llava-7b-scaled"
    assert manifest["template"] == "vicuna_v1"
    assert manifest["projector"] == {"type": "mlp2x_gelu", "input_norm": False, "path": "projector/mm_projector.bin"}
    # scaled_down section of llava-7b.json: 56 px images in 14 px patches, 64-wide ViT, 32-wide text embedding.
    assert manifest["encoder"]["num_patches"] == 16
    assert manifest["encoder"]["image_dim"] == 64
    assert manifest["encoder"]["text_dim"] == 32


def test_features_are_penultimate_patches(llava_run):
    import pyarrow.parquet as pq

    from drape.presets.llava import select_patch_features
    from drape.stages import StageContext

    previous = os.getcwd()
    os.chdir(llava_run)
    try:
        ctx = StageContext()
        features = ctx.features("textvqa", "train")
        image = ctx.paths.stream / "textvqa"
        records = [json.loads(line) for line in (image / "train.jsonl").read_text().splitlines()]
        from PIL import Image

        pixels = ctx.clip.preprocess(Image.open(image / records[0]["image"]))[None]
        expected = select_patch_features(ctx.clip.model.visual, pixels, select_layer=-2).float()
    finally:
        os.chdir(previous)
    assert features.patches.shape == (3, 16, 64)
    assert features.text.shape == (3, 32)
    # The cache stores float16, so compare at float16 precision.
    torch.testing.assert_close(features.patches[0], expected[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(features.pooled[0], features.patches[0].mean(dim=0), rtol=1e-2, atol=1e-2)
    assert pq.read_schema(llava_run / "data/features/textvqa/train.parquet").metadata is not None


def test_init_imports_projector_file(llava_run):
    stored = torch.load(llava_run / "models/projector/mm_projector.bin", weights_only=True)
    initial = load_file(llava_run / "results/train/init/projector.safetensors")
    assert set(initial) == set(MM_PROJECTOR_KEYS.values())
    for source, target in MM_PROJECTOR_KEYS.items():
        assert torch.equal(initial[target], stored[source]), target


def test_first_task_starts_from_imported_projector(llava_run):
    # Training moves the projector away from the imported weights, so init is not a fresh copy.
    initial = load_file(llava_run / "results/train/init/projector.safetensors")
    trained = load_file(llava_run / "results/train/scienceqa/projector.safetensors")
    assert not torch.equal(initial["fc1.weight"], trained["fc1.weight"])


def test_vicuna_template_prefix_and_suffix(llava_run):
    model, tokenizer = load_llm(llava_run / "models/llm")
    llm = FrozenLLM(model, tokenizer, template="vicuna_v1")
    prefix = tokenizer.decode(llm.prefix_ids)
    suffix = tokenizer.decode(llm.suffix_ids)
    assert prefix == f"{tokenizer.bos_token}{VICUNA_V1_SYSTEM} USER: "
    assert suffix == " ASSISTANT:"
    assert llm.prefix_ids[0] == tokenizer.bos_token_id


def test_chat_template_choice_unchanged(llava_run):
    model, tokenizer = load_llm(llava_run / "models/llm")
    llm = FrozenLLM(model, tokenizer, template="chat_template")
    assert "system" in tokenizer.decode(llm.prefix_ids)
    assert "USER:" not in tokenizer.decode(llm.prefix_ids)


def test_unknown_template_rejected(llava_run):
    model, tokenizer = load_llm(llava_run / "models/llm")
    with pytest.raises(ValueError, match="unknown template 'vicuna_v2'; use one of: chat_template, vicuna_v1"):
        FrozenLLM(model, tokenizer, template="vicuna_v2")


def test_llm_loads_bf16_with_checkpointing(llava_run):
    model, tokenizer = load_llm(llava_run / "models/llm")
    assert model.dtype == torch.bfloat16
    assert model.is_activation_checkpointing
    assert not model.training


def test_checkpointed_loss_matches_plain_loss(llava_run):
    model, tokenizer = load_llm(llava_run / "models/llm")
    checkpointed = FrozenLLM(model, tokenizer, template="vicuna_v1")
    assert checkpointed.checkpointing
    torch.manual_seed(0)
    content = torch.randn(2, 3, checkpointed.hidden_size, requires_grad=True)
    loss = checkpointed.loss(content, ["What is it?", "Which one?"], ["a fish", "B"])
    loss.backward()
    checkpointed_grad = content.grad.clone()
    assert not model.training

    model.activation_checkpointing_disable()
    plain = FrozenLLM(model, tokenizer, template="vicuna_v1")
    assert not plain.checkpointing
    content.grad = None
    plain_loss = plain.loss(content, ["What is it?", "Which one?"], ["a fish", "B"])
    plain_loss.backward()
    torch.testing.assert_close(loss, plain_loss)
    torch.testing.assert_close(checkpointed_grad, content.grad)
    assert checkpointed_grad.abs().sum() > 0


@pytest.fixture
def no_weight_settings(monkeypatch, tmp_path):
    for name in (CLIP_WEIGHTS_ENV, LLM_DIR_ENV, PROJECTOR_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))


def test_full_preset_missing_weights_message(tmp_path, capsys, no_weight_settings):
    missing = tmp_path / "weights"
    params = llava_params(
        tmp_path / "coin", tmp_path / "ucit", preset="llava-7b",
        weights={"clip": str(missing / "clip.safetensors"), "llm": "vicuna", "projector": None},
    )
    repo = make_pipeline_repo(tmp_path / "repo", params)
    assert run_in(repo, ["stage", "models"]) == [2]

    error = capsys.readouterr().err
    assert error.count("drape: error:") == 1
    assert "The llava-7b preset is missing 3 of its 3 weight sources" in error
    assert f"{missing / 'clip.safetensors'} (set by models.weights.clip in params.yaml" in error
    # A relative path is resolved against the repository root.
    assert f"{Path('.') / 'vicuna'} (set by models.weights.llm in params.yaml" in error
    assert "Projector weights not found: expected mm_projector.bin of liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5" in error
    assert "Set models.weights.projector in params.yaml or DRAPE_LLAVA_PROJECTOR" in error
    assert not (repo / "models").exists()


def test_full_preset_checks_llm_config(tmp_path, no_weight_settings):
    from drape.presets.llava_models import materialize_llava_models
    from drape.presets.llava_weights import WeightsNotFoundError

    llm_dir = tmp_path / "vicuna"
    llm_dir.mkdir()
    (llm_dir / "config.json").write_text(json.dumps({"hidden_size": 4096}))
    (llm_dir / "model.safetensors.index.json").write_text("{}")
    clip_file = tmp_path / "clip.safetensors"
    clip_file.write_bytes(b"0" * 10)
    projector = tmp_path / "mm_projector.bin"
    projector.write_bytes(b"0" * 10)

    # Every source resolves, so the check of Vicuna's config.json is what fails.
    with pytest.raises(ValueError, match=r"config.json: intermediate_size is None but Vicuna-7B-v1.5 has 11008"):
        materialize_llava_models(tmp_path / "models", "llava-7b", clip_file, llm_dir, projector)
    assert not (tmp_path / "models" / "manifest.json").exists()
    with pytest.raises(WeightsNotFoundError):
        materialize_llava_models(tmp_path / "models", "llava-7b", clip_file, tmp_path / "nothing", projector)
