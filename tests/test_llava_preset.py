"""The llava-7b preset: architecture on the meta device, features, template, weights, memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from drape.methods.drape.model import Projector
from drape.presets.conversation import VICUNA_V1, VICUNA_V1_SYSTEM
from drape.presets.llava import (
    apply_training_flags,
    build_llava_architecture,
    build_projector,
    load_llava_spec,
    select_patch_features,
)
from drape.presets.llava_memory import GIB, estimate_training_memory
from drape.presets.llava_weights import (
    CLIP_WEIGHTS_ENV,
    LLM_DIR_ENV,
    PROJECTOR_ENV,
    WeightsNotFoundError,
    load_mm_projector,
    resolve_llava_weights,
)


@pytest.fixture(scope="module")
def full():
    return build_llava_architecture("meta", "full")


@pytest.fixture(scope="module")
def small():
    return build_llava_architecture("cpu", "scaled-down")


@pytest.fixture
def no_weight_settings(monkeypatch):
    for name in (CLIP_WEIGHTS_ENV, LLM_DIR_ENV, PROJECTOR_ENV):
        monkeypatch.delenv(name, raising=False)


def vit_parameters(width: int, layers: int, patch: int, image: int, output_dim: int) -> int:
    """Parameters of an OpenAI-style ViT: conv stem, class and position embeddings, blocks, norms."""
    tokens = (image // patch) ** 2 + 1
    block = 2 * 2 * width + (width * 3 * width + 3 * width) + (width * width + width)
    block += (width * 4 * width + 4 * width) + (4 * width * width + width)
    return 3 * patch * patch * width + width + tokens * width + 2 * width + layers * block + 2 * width + width * output_dim


def llama_parameters(vocab: int, hidden: int, intermediate: int, layers: int) -> int:
    """Parameters of a Llama with full multi-head attention, untied embeddings and no biases."""
    layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    return 2 * vocab * hidden + layers * layer + hidden


def test_full_scale_parameter_counts(full):
    counts = full.parameter_counts()
    vision = vit_parameters(width=1024, layers=24, patch=14, image=336, output_dim=768)
    llm = llama_parameters(vocab=32000, hidden=4096, intermediate=11008, layers=32)
    projector = (1024 * 4096 + 4096) + (4096 * 4096 + 4096)

    assert counts["vision"] == vision
    assert counts["vision_without_clip_proj"] == vision - 1024 * 768
    assert counts["llm"] == llm
    assert counts["projector"] == projector
    assert counts["total"] == vision - 1024 * 768 + llm + projector
    # Published sizes: Vicuna-7B (Llama-2-7B) 6.74 B, CLIP ViT-L/14 vision about 303-304 M.
    assert llm == 6_738_415_616
    assert 303_000_000 <= counts["vision_without_clip_proj"] <= 304_500_000
    assert projector == 20_979_712


def test_full_scale_stays_on_meta(full):
    modules = {"clip": full.clip, "llm": full.llm, "projector": full.projector}
    for name, module in modules.items():
        devices = {parameter.device.type for parameter in module.parameters()}
        assert devices == {"meta"}, f"{name} has parameters on {devices}"


def test_full_scale_patch_features_shape(full):
    pixels = torch.empty(2, 3, 336, 336, device="meta")
    features = select_patch_features(full.vision, pixels, full.spec.vision.select_layer)
    assert tuple(features.shape) == (2, 576, 1024)
    assert full.spec.vision.num_patches == 576


def test_scaled_down_uses_same_classes(full, small):
    assert type(small.clip) is type(full.clip)
    assert type(small.vision) is type(full.vision)
    assert type(small.llm) is type(full.llm)
    assert type(small.projector.norm) is type(full.projector.norm) is torch.nn.Identity
    assert small.parameter_counts()["total"] < 1_000_000


def test_patch_features_match_manual_forward(small):
    vision = small.vision
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, 56, 56)
    features = select_patch_features(vision, pixels, select_layer=-2)

    with torch.no_grad():
        x = vision.conv1(pixels).flatten(2).transpose(1, 2)  # (B, 16, width)
        cls = vision.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + vision.positional_embedding
        x = vision.ln_pre(x)
        for block in vision.transformer.resblocks[:-1]:
            x = block(x)
        penultimate = x[:, 1:]
        last = vision.transformer.resblocks[-1](x)[:, 1:]

    assert features.shape == (3, 16, 64)
    torch.testing.assert_close(features, penultimate)
    assert not torch.allclose(features, last)


def test_patch_features_reject_bad_layer(small):
    with pytest.raises(ValueError, match="select_layer=-4 is invalid"):
        select_patch_features(small.vision, torch.zeros(1, 3, 56, 56), select_layer=-4)


def test_vicuna_template_one_turn():
    assert VICUNA_V1.render([("What is shown?", None)]) == f"{VICUNA_V1_SYSTEM} USER: What is shown? ASSISTANT:"
    assert VICUNA_V1.render([("What is shown?", "A cat.")]) == (
        f"{VICUNA_V1_SYSTEM} USER: What is shown? ASSISTANT: A cat.</s>"
    )


def test_vicuna_template_two_turns():
    text = VICUNA_V1.render([("What is shown?", "A cat."), ("What color?", None)])
    assert text == f"{VICUNA_V1_SYSTEM} USER: What is shown? ASSISTANT: A cat.</s>USER: What color? ASSISTANT:"
    with pytest.raises(ValueError, match="turn 0 has no answer"):
        VICUNA_V1.render([("What is shown?", None), ("What color?", None)])


def test_vicuna_template_split():
    prefix, suffix = VICUNA_V1.split()
    assert prefix == f"<s>{VICUNA_V1_SYSTEM} USER: "
    assert suffix == " ASSISTANT:"
    assert prefix + "Q?" + suffix == "<s>" + VICUNA_V1.render([("Q?", None)])


def llava_projector_state(vision_dim: int, llm_dim: int) -> dict[str, torch.Tensor]:
    """A state dict in LLaVA-1.5's mm_projector.bin layout, saved as float16 as LLaVA does."""
    generator = torch.Generator().manual_seed(3)
    shapes = {
        "model.mm_projector.0.weight": (llm_dim, vision_dim),
        "model.mm_projector.0.bias": (llm_dim,),
        "model.mm_projector.2.weight": (llm_dim, llm_dim),
        "model.mm_projector.2.bias": (llm_dim,),
    }
    return {key: torch.randn(shape, generator=generator).half() for key, shape in shapes.items()}


def test_mm_projector_import(small, tmp_path):
    spec = small.spec
    state = llava_projector_state(spec.vision.width, spec.llm.hidden_size)
    path = tmp_path / "mm_projector.bin"
    torch.save(state, path)

    projector = load_mm_projector(path, build_projector(spec))
    patches = torch.randn(2, 16, spec.vision.width)
    first = torch.nn.functional.gelu(patches @ state["model.mm_projector.0.weight"].float().T + state["model.mm_projector.0.bias"].float())
    expected = first @ state["model.mm_projector.2.weight"].float().T + state["model.mm_projector.2.bias"].float()

    assert projector.fc1.weight.dtype == torch.float32
    torch.testing.assert_close(projector.fc2.bias, state["model.mm_projector.2.bias"].float())
    torch.testing.assert_close(projector(patches), expected)


def test_mm_projector_shape_error(small, tmp_path):
    spec = small.spec
    path = tmp_path / "mm_projector.bin"
    torch.save(llava_projector_state(spec.vision.width + 1, spec.llm.hidden_size), path)
    with pytest.raises(ValueError) as error:
        load_mm_projector(path, build_projector(spec))
    message = str(error.value)
    assert str(path) in message
    assert "model.mm_projector.0.weight" in message
    assert f"expects ({spec.llm.hidden_size}, {spec.vision.width})" in message


def test_mm_projector_missing_key(small, tmp_path):
    spec = small.spec
    state = llava_projector_state(spec.vision.width, spec.llm.hidden_size)
    del state["model.mm_projector.2.bias"]
    path = tmp_path / "mm_projector.bin"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing the key model\.mm_projector\.2\.bias"):
        load_mm_projector(path, build_projector(spec))


def test_mm_projector_needs_no_input_norm(small, tmp_path):
    spec = small.spec
    path = tmp_path / "mm_projector.bin"
    torch.save(llava_projector_state(spec.vision.width, spec.llm.hidden_size), path)
    with pytest.raises(ValueError, match="input_norm=False"):
        load_mm_projector(path, Projector(spec.vision.width, spec.llm.hidden_size))


def test_missing_weights_single_message(tmp_path, no_weight_settings):
    spec = load_llava_spec("full")
    with pytest.raises(WeightsNotFoundError) as error:
        resolve_llava_weights(spec, cache_dir=tmp_path)
    message = str(error.value)
    assert "missing 3 of its 3 weight sources" in message
    for expected in (
        "open_clip_model.safetensors or open_clip_pytorch_model.bin of timm/vit_large_patch14_clip_336.openai",
        "lmsys/vicuna-7b-v1.5",
        "mm_projector.bin of liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5",
        str(tmp_path),
        CLIP_WEIGHTS_ENV,
        LLM_DIR_ENV,
        PROJECTOR_ENV,
    ):
        assert expected in message


def test_configured_path_missing(tmp_path, monkeypatch):
    spec = load_llava_spec("full")
    missing = tmp_path / "ViT-L-14-336.safetensors"
    monkeypatch.setenv(CLIP_WEIGHTS_ENV, str(missing))
    with pytest.raises(WeightsNotFoundError) as error:
        resolve_llava_weights(spec, llm_dir=tmp_path, projector_file=tmp_path / "mm_projector.bin", cache_dir=tmp_path)
    message = str(error.value)
    assert f"{missing} (set by models.weights.clip in params.yaml, the clip_weights argument or {CLIP_WEIGHTS_ENV}) is not a file" in message
    assert f"{tmp_path} (set by models.weights.llm in params.yaml, the llm_dir argument or {LLM_DIR_ENV}) does not contain config.json" in message


def write_cached_file(cache: Path, repo: str, filename: str) -> Path:
    """Lay out one file the way huggingface_hub stores a downloaded revision."""
    commit = "0" * 40
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    path = repo_dir / "snapshots" / commit / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_weights_found_in_hf_cache(tmp_path, no_weight_settings):
    spec = load_llava_spec("full")
    clip = write_cached_file(tmp_path, spec.vision.hf_hub_repo, "open_clip_pytorch_model.bin")
    config = write_cached_file(tmp_path, spec.llm.hf_hub_repo, "config.json")
    write_cached_file(tmp_path, spec.llm.hf_hub_repo, "model.safetensors.index.json")
    projector = write_cached_file(tmp_path, spec.projector.hf_hub_repo, "mm_projector.bin")

    weights = resolve_llava_weights(spec, cache_dir=tmp_path)
    assert weights.clip_weights == clip
    assert weights.llm_dir == config.parent
    assert weights.projector_file == projector


def test_llm_cache_without_weights_is_missing(tmp_path, no_weight_settings):
    spec = load_llava_spec("full")
    write_cached_file(tmp_path, spec.llm.hf_hub_repo, "config.json")
    with pytest.raises(WeightsNotFoundError, match="LLM weights not found"):
        resolve_llava_weights(spec, cache_dir=tmp_path)


def test_training_flags_keep_input_gradients(small):
    llm = build_llava_architecture("cpu", "scaled-down").llm
    apply_training_flags(llm, small.spec.training)
    assert llm.dtype == torch.bfloat16
    assert llm.is_activation_checkpointing
    llm.requires_grad_(False)

    embeds = torch.randn(2, 5, small.spec.llm.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, small.spec.llm.vocab_size, (2, 5))
    llm(inputs_embeds=embeds, labels=labels).loss.backward()
    assert embeds.grad is not None
    assert embeds.grad.abs().sum() > 0


def test_memory_estimate_parts(full):
    spec = full.spec
    estimate = estimate_training_memory(spec, batch_size=16, seq_len=1024)
    frozen = (full.parameter_counts()["llm"] + sum(p.numel() for p in full.clip.parameters())) * 2
    tokens = 16 * 1024

    assert estimate.frozen_weights == frozen
    assert estimate.checkpointed_inputs == 32 * tokens * 4096 * 2
    assert estimate.logits == tokens * 32000 * (2 + 3 * 4)
    assert estimate.total == sum(vars(estimate).values())
    # The frozen bf16 weights alone are about 13.3 GiB, so a 40 GB device is the minimum.
    assert 13 * GIB < estimate.frozen_weights < 14 * GIB
    larger = estimate_training_memory(spec, batch_size=32, seq_len=1024)
    assert larger.total > estimate.total
    assert larger.frozen_weights == estimate.frozen_weights
