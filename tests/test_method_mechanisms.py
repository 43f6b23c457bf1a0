"""The defining mechanism of each baseline, on the tiny LLM with synthetic features.

The features are random tensors arranged in two well-separated image clusters, one per
task, so what each method should learn from them is known in advance.
"""

from __future__ import annotations

import json

import pytest
import torch

from drape.config import TaskTrainConfig
from drape.encoders import load_llm
from drape.features import FeatureSet
from drape.methods import METHODS, create_method
from drape.methods.base import ModelDims
from drape.mllm import FrozenLLM
from drape.routing import Prototypes
from drape.train import train_task

VISION_DIM, TEXT_DIM, PATCHES = 24, 16, 4


@pytest.fixture()
def llm(tiny_models):
    # A fresh LLM per test: LoRA methods insert adapters into it.
    return FrozenLLM(*load_llm(tiny_models / "llm"))


@pytest.fixture()
def dims(llm, tiny_models) -> ModelDims:
    encoder = json.loads((tiny_models / "manifest.json").read_text())["encoder"]["name"]
    return ModelDims(encoder=encoder, vision_dim=VISION_DIM, text_dim=TEXT_DIM, llm_dim=llm.hidden_size)


def cluster(center: int, count: int, instruction: str, answer: str, seed: int) -> FeatureSet:
    """``count`` samples whose pooled image features lie around basis vector ``center``."""
    generator = torch.Generator().manual_seed(seed)
    pooled = torch.zeros(count, VISION_DIM)
    pooled[:, center] = 5.0
    pooled += 0.1 * torch.randn(count, VISION_DIM, generator=generator)
    return FeatureSet(
        ids=[f"{center}-{i}" for i in range(count)],
        instructions=[instruction] * count,
        answers=[answer] * count,
        answer_lists=[None] * count,
        patches=torch.randn(count, PATCHES, VISION_DIM, generator=generator),
        pooled=pooled,
        text=torch.randn(count, TEXT_DIM, generator=generator),
    )


TASK_A = ("a", 0, "What digit is it?", "3")
TASK_B = ("b", 7, "Is it even?", "yes")


def features_of(task, count: int = 8, seed: int = 0) -> FeatureSet:
    _, center, instruction, answer = task
    return cluster(center, count, instruction, answer, seed)


def build(name: str, dims: ModelDims, llm, **settings):
    config = METHODS[name][0](**settings)
    method = create_method(name, config, dims)
    method.attach(llm)
    return method


def train(method, llm, task, steps: int, lr: float = 1e-2, seed: int = 0):
    settings = TaskTrainConfig(epochs=100, batch_size=4, generator_lr=lr, projector_lr=0.0, max_steps=steps)
    return train_task(method, llm, task[0], features_of(task, seed=seed), settings, seed=seed)


# ----- O-LoRA --------------------------------------------------------------------------


def test_o_lora_orthogonality_penalty_falls(dims, llm):
    method = build("o_lora", dims, llm, rank=4, lr=1e-2, orthogonal_weight=1.0)
    train(method, llm, TASK_A, steps=3)
    log = train(method, llm, TASK_B, steps=30)

    assert len(log.regularizer) == 30
    assert log.regularizer[-1] < 0.5 * log.regularizer[0]


def test_o_lora_subspaces_end_nearly_orthogonal(dims, llm):
    method = build("o_lora", dims, llm, rank=4, lr=1e-2, orthogonal_weight=1.0)
    train(method, llm, TASK_A, steps=3)
    log = train(method, llm, TASK_B, steps=30)

    # 0 is orthogonal, 1 is the same subspace; random rank-4 subspaces start well above 0.
    initial, final = log.extra["initial_max_subspace_overlap"], log.extra["max_subspace_overlap"]
    assert final < 0.02
    assert final < 0.5 * initial


def test_o_lora_keeps_earlier_adapters_frozen(dims, llm):
    method = build("o_lora", dims, llm, rank=4, lr=1e-2)
    train(method, llm, TASK_A, steps=3)
    before = {key: value.clone() for key, value in method.stored_tensors().items() if key.startswith("lora.task_a.")}
    train(method, llm, TASK_B, steps=3)
    after = method.stored_tensors()
    assert before
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# ----- prompt pools keyed by the image feature --------------------------------------------


def test_l2p_keys_move_toward_image_features(dims, llm):
    method = build("l2p", dims, llm, pool_size=6, prompt_length=2, top_k=2, key_loss_weight=1.0)
    log = train(method, llm, TASK_A, steps=20, lr=5e-2)
    assert log.regularizer[-1] < log.regularizer[0]


def test_l2p_selection_follows_image_feature(dims, llm):
    method = build("l2p", dims, llm, pool_size=6, prompt_length=2, top_k=1, key_loss_weight=1.0)
    train(method, llm, TASK_A, steps=20, lr=5e-2)
    train(method, llm, TASK_B, steps=20, lr=5e-2)

    chosen_a = method.select(features_of(TASK_A, seed=5).pooled)
    chosen_b = method.select(features_of(TASK_B, seed=5).pooled)
    # Each cluster settles on one prompt, and the two clusters pick different prompts.
    assert chosen_a.unique().numel() == 1
    assert chosen_b.unique().numel() == 1
    assert chosen_a[0] != chosen_b[0]


def test_dualprompt_routes_by_learned_keys(dims, llm):
    method = build("dualprompt", dims, llm, general_length=2, expert_length=2, key_loss_weight=1.0)
    train(method, llm, TASK_A, steps=20, lr=5e-2)
    train(method, llm, TASK_B, steps=20, lr=5e-2)

    test_a, test_b = features_of(TASK_A, seed=9), features_of(TASK_B, seed=9)
    # The true task passed here is wrong on purpose: key matching must not read it.
    assert method.route(test_a.pooled, test_a.text, None, task="b") == ["a"] * len(test_a)
    assert method.route(test_b.pooled, test_b.text, None, task="a") == ["b"] * len(test_b)


def test_coda_prompt_weights_follow_image_feature(dims, llm):
    method = build("coda_prompt", dims, llm, components_per_task=3, prompt_length=2)
    train(method, llm, TASK_A, steps=10, lr=5e-2)
    train(method, llm, TASK_B, steps=10, lr=5e-2)

    weights_a = method.weights(features_of(TASK_A, seed=3).pooled)
    weights_b = method.weights(features_of(TASK_B, seed=3).pooled)
    assert weights_a.shape == (8, 6)
    # Samples of one cluster weigh the components alike; the two clusters weigh them differently.
    assert (weights_a - weights_a.mean(0)).abs().max() < 0.2
    assert (weights_a.mean(0) - weights_b.mean(0)).abs().max() > 0.2


def test_coda_prompt_freezes_and_orthogonalises_old_components(dims, llm):
    method = build("coda_prompt", dims, llm, components_per_task=3, prompt_length=2)
    train(method, llm, TASK_A, steps=5, lr=5e-2)
    old = method.components["a"].detach().clone()
    method.add_task("b")
    new = method.components["b"].detach()

    old_rows = torch.nn.functional.normalize(old.flatten(1), dim=-1)
    new_rows = torch.nn.functional.normalize(new.flatten(1), dim=-1)
    assert (old_rows @ new_rows.T).abs().max() < 1e-4
    assert not method.components["a"].requires_grad


# ----- task labels: only oracle variants read them ------------------------------------------


def routed_variants():
    for name in METHODS:
        yield name, {}
    yield "drape-oracle", {"oracle_routing": True}


@pytest.mark.parametrize("variant", [name for name, _ in routed_variants()])
def test_only_oracle_reads_task_label(variant, dims, llm):
    name, settings = ("drape", {"oracle_routing": True}) if variant == "drape-oracle" else (variant, {})
    if name in ("drape", "seq_ft", "joint"):
        settings.update(hidden=16, heads=2, prompt_length=2)
    method = build(name, dims, llm, **settings)
    train(method, llm, TASK_A, steps=1)
    train(method, llm, TASK_B, steps=1)

    train_a, train_b = features_of(TASK_A), features_of(TASK_B)
    prototypes = Prototypes.empty(VISION_DIM, TEXT_DIM).add("a", train_a.pooled, train_a.text).add("b", train_b.pooled, train_b.text)
    test = features_of(TASK_A, seed=11)
    labelled_a = method.route(test.pooled, test.text, prototypes, task="a")
    labelled_b = method.route(test.pooled, test.text, prototypes, task="b")

    if variant == "drape-oracle":
        assert labelled_a == ["a"] * len(test)
        assert labelled_b == ["b"] * len(test)
    else:
        assert labelled_a == labelled_b


# ----- Training loop --------------------------------------------------------------------


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3])
def test_gradient_clipped_before_step(dims, llm, monkeypatch, max_grad_norm):
    method = build("drape", dims, llm)
    seen = []

    def record_norm():
        grads = [p.grad for p in method.parameters() if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    monkeypatch.setattr(method, "before_optimizer_step", record_norm)
    settings = TaskTrainConfig(epochs=100, batch_size=4, generator_lr=1e-2, projector_lr=1e-3, max_steps=3, max_grad_norm=max_grad_norm)
    log = train_task(method, llm, "a", features_of(TASK_A), settings, seed=0)

    assert len(seen) == 3
    assert all(norm > 1e-3 for norm in log.gradient_norms)
    if max_grad_norm is None:
        assert seen == pytest.approx(log.gradient_norms, rel=1e-5)
    else:
        assert seen == pytest.approx([max_grad_norm] * 3, rel=1e-4)
