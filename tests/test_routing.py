"""Prototype routing with the embedded real encoders."""

from __future__ import annotations

import pytest
import torch

from drape.data.records import load_image, read_records
from drape.data.stream import build_task
from drape.routing import Prototypes

CLASSIFY = "What digit is written in the image? Answer with a single digit."
PARITY = "Is the digit in the image even? Answer yes or no."


@pytest.fixture(scope="module")
def same_images_two_instructions(embedded_models, tmp_path_factory):
    """Pooled image features and instruction embeddings of two tasks on the very same images."""
    from drape.encoders import load_clip

    folder = tmp_path_factory.mktemp("routing") / "digits"
    build_task("digits-classify", folder, n_train=10, n_test=10, seed=0)
    encoder = load_clip(embedded_models / "clip")
    features = {}
    for split in ("train", "test"):
        images = [load_image(folder / record.image) for record in read_records(folder / f"{split}.jsonl")]
        _, pooled = encoder.encode_images(images)
        features[split] = {
            "image": pooled,
            "classify": encoder.encode_texts([CLASSIFY] * len(images)),
            "parity": encoder.encode_texts([PARITY] * len(images)),
        }
    return features


def route_accuracy(features, alpha: float) -> float:
    train, test = features["train"], features["test"]
    prototypes = Prototypes.empty(train["image"].shape[1], train["classify"].shape[1])
    prototypes = prototypes.add("classify", train["image"], train["classify"])
    prototypes = prototypes.add("parity", train["image"], train["parity"])
    correct = 0
    for task in ("classify", "parity"):
        routes = prototypes.route(test["image"], test[task], alpha)
        correct += sum(route == task for route in routes)
    return correct / (2 * len(test["image"]))


def test_text_separates_tasks_on_same_images(same_images_two_instructions):
    assert route_accuracy(same_images_two_instructions, alpha=0.5) == 1.0


def test_image_alone_cannot_separate_them(same_images_two_instructions):
    # Identical images give identical image scores, so image-only routing picks one task for all.
    assert route_accuracy(same_images_two_instructions, alpha=1.0) == 0.5


def test_image_prototypes_separate_sources():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(1, 8, generator=generator) + 0.1 * torch.randn(20, 8, generator=generator)
    b = torch.randn(1, 8, generator=generator) + 0.1 * torch.randn(20, 8, generator=generator)
    text = torch.ones(20, 4)
    prototypes = Prototypes.empty(8, 4).add("a", a[:10], text[:10]).add("b", b[:10], text[:10])
    assert prototypes.route(a[10:], text[10:], alpha=1.0) == ["a"] * 10
    assert prototypes.route(b[10:], text[10:], alpha=1.0) == ["b"] * 10


def test_routing_without_prototypes_fails():
    with pytest.raises(ValueError, match="no prototypes yet"):
        Prototypes.empty(8, 4).route(torch.zeros(1, 8), torch.zeros(1, 4), alpha=0.5)
