"""The frozen LLM wrapper: chat-template splicing, answer-only loss, batched generation."""

from __future__ import annotations

import pytest
import torch

from drape.mllm import IGNORE_INDEX, FrozenLLM


@pytest.fixture(scope="module")
def llm(tiny_models):
    from drape.encoders import load_llm

    return FrozenLLM(*load_llm(tiny_models / "llm"))


def test_labels_cover_answer_and_end_token_only(llm):
    content = torch.zeros(2, 3, llm.hidden_size)
    batch = llm.build_batch(content, ["What digit?", "Is it even? Answer yes or no."], ["7", "yes"])
    for i, answer in enumerate(["7", "yes"]):
        labelled = batch.labels[i][batch.labels[i] != IGNORE_INDEX].tolist()
        assert labelled == llm.tokenize([answer])[0] + [llm.eos_id]


def test_training_batch_is_right_padded(llm):
    content = torch.zeros(2, 3, llm.hidden_size)
    batch = llm.build_batch(content, ["short", "a much longer instruction than the first one"], ["a", "b"])
    assert batch.attention_mask[0, 0] == 1
    assert batch.attention_mask[0, -1] == 0
    assert batch.attention_mask[1].all()


def test_generation_batch_is_left_padded(llm):
    content = torch.zeros(2, 3, llm.hidden_size)
    batch = llm.build_batch(content, ["short", "a much longer instruction than the first one"])
    assert batch.labels is None
    assert batch.attention_mask[0, 0] == 0
    assert batch.attention_mask[0, -1] == 1


def test_batched_generation_matches_single(llm):
    torch.manual_seed(0)
    content = torch.randn(3, 4, llm.hidden_size) * 0.5
    instructions = ["What digit is shown?", "Is the digit even? Answer yes or no.", "Which item? A. bag B. coat"]
    together = llm.generate(content, instructions, max_new_tokens=4)
    alone = [llm.generate(content[i : i + 1], [instructions[i]], max_new_tokens=4)[0] for i in range(3)]
    assert together == alone


def test_loss_gradient_reaches_content_only(llm):
    content = torch.randn(2, 3, llm.hidden_size, requires_grad=True)
    loss = llm.loss(content, ["What digit?", "Even?"], ["7", "no"])
    loss.backward()
    assert content.grad is not None
    assert content.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in llm.model.parameters())
