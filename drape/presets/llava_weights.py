"""Local weight files of the ``llava-7b`` preset, and the import of LLaVA's projector.

Nothing here downloads. Each file comes from a path that the caller passes, from the
environment variable named below, or from the local Hugging Face cache, which
``huggingface_hub.try_to_load_from_cache`` reads without network access:

============  ==============================  ============================================
weights       setting                         Hugging Face repository in the cache
============  ==============================  ============================================
CLIP          ``DRAPE_LLAVA_CLIP_WEIGHTS``    timm/vit_large_patch14_clip_336.openai
LLM           ``DRAPE_LLAVA_LLM_DIR``         lmsys/vicuna-7b-v1.5
projector     ``DRAPE_LLAVA_PROJECTOR``       liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5
============  ==============================  ============================================

In the pipeline, ``models.weights.clip``, ``.llm`` and ``.projector`` of ``params.yaml``
are passed as the explicit paths, so they take precedence over the variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from drape.methods.drape.model import Projector
from drape.presets.llava import LlavaSpec

CLIP_WEIGHTS_ENV = "DRAPE_LLAVA_CLIP_WEIGHTS"
LLM_DIR_ENV = "DRAPE_LLAVA_LLM_DIR"
PROJECTOR_ENV = "DRAPE_LLAVA_PROJECTOR"

# File names that open_clip's Hugging Face loader looks for, safetensors first.
CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Index files of a sharded transformers checkpoint. Vicuna-7B-v1.5 is sharded.
LLM_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
LLM_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")

# Keys of LLaVA-1.5's mm_projector.bin: nn.Sequential(Linear, GELU, Linear) saved under
# model.mm_projector, so index 0 is fc1 and index 2 is fc2.
MM_PROJECTOR_KEYS = {
    "model.mm_projector.0.weight": "fc1.weight",
    "model.mm_projector.0.bias": "fc1.bias",
    "model.mm_projector.2.weight": "fc2.weight",
    "model.mm_projector.2.bias": "fc2.bias",
}


class WeightsNotFoundError(FileNotFoundError):
    """A weight file of the preset is neither at the configured path nor in the Hugging Face cache."""


@dataclass(frozen=True)
class LlavaWeights:
    """Resolved local paths of the preset's weights."""

    clip_weights: Path  # open_clip checkpoint file of ViT-L-14-336 (OpenAI)
    llm_dir: Path  # transformers directory of Vicuna-7B-v1.5 with config, tokenizer and shards
    projector_file: Path  # LLaVA-1.5's pretrained mm_projector.bin


def _cached_file(repo: str, filename: str, cache_dir: Path | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
    # try_to_load_from_cache returns a str path, None, or a marker object for a file
    # that the repository is known not to have.
    return Path(found) if isinstance(found, str) else None


def _cache_location(cache_dir: Path | None) -> str:
    from huggingface_hub import constants

    return str(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)


def _setting(explicit: Path | str | None, env: str) -> Path | None:
    if explicit is not None:
        return Path(explicit)
    value = os.environ.get(env)
    return Path(value) if value else None


def resolve_clip_weights(
    spec: LlavaSpec, path: Path | str | None = None, cache_dir: Path | None = None
) -> Path:
    """Locate the open_clip checkpoint of the vision tower."""
    configured = _setting(path, CLIP_WEIGHTS_ENV)
    repo = spec.vision.hf_hub_repo
    if configured is not None:
        if configured.is_file():
            return configured
        raise WeightsNotFoundError(
            f"CLIP weights not found: {configured} (set by models.weights.clip in params.yaml, the "
            f"clip_weights argument or {CLIP_WEIGHTS_ENV}) is not a file. Point it at {CLIP_WEIGHT_FILES[0]} or "
            f"{CLIP_WEIGHT_FILES[1]} of the Hugging Face repository {repo}."
        )
    for filename in CLIP_WEIGHT_FILES:
        found = _cached_file(repo, filename, cache_dir)
        if found is not None:
            return found
    raise WeightsNotFoundError(
        f"CLIP weights not found: expected {' or '.join(CLIP_WEIGHT_FILES)} of {repo} in the "
        f"Hugging Face cache {_cache_location(cache_dir)}. Set models.weights.clip in params.yaml or "
        f"{CLIP_WEIGHTS_ENV} to the file, "
        f"or on a machine with internet access run `hf download {repo} {CLIP_WEIGHT_FILES[0]}` "
        "and copy its Hugging Face cache here."
    )


def _has_llm_weights(directory: Path) -> bool:
    if not (directory / "config.json").is_file():
        return False
    return any((directory / name).is_file() for name in LLM_INDEX_FILES + LLM_SINGLE_FILES)


def resolve_llm_dir(spec: LlavaSpec, path: Path | str | None = None, cache_dir: Path | None = None) -> Path:
    """Locate Vicuna's transformers directory (``config.json`` and its weight files)."""
    configured = _setting(path, LLM_DIR_ENV)
    repo = spec.llm.hf_hub_repo
    expected = f"config.json and {' or '.join(LLM_INDEX_FILES + LLM_SINGLE_FILES)}"
    if configured is not None:
        if _has_llm_weights(configured):
            return configured
        raise WeightsNotFoundError(
            f"LLM weights not found: {configured} (set by models.weights.llm in params.yaml, the llm_dir "
            f"argument or {LLM_DIR_ENV}) "
            f"does not contain {expected}. Point it at a local copy of {repo}."
        )
    config = _cached_file(repo, "config.json", cache_dir)
    # Files of one revision share a snapshot directory in the cache.
    if config is not None and _has_llm_weights(config.parent):
        return config.parent
    raise WeightsNotFoundError(
        f"LLM weights not found: expected {expected} of {repo} in the Hugging Face cache "
        f"{_cache_location(cache_dir)}. Set models.weights.llm in params.yaml or {LLM_DIR_ENV} to "
        f"a directory that contains them, "
        f"or on a machine with internet access run `hf download {repo}` and copy its Hugging "
        "Face cache here."
    )


def resolve_projector_file(
    spec: LlavaSpec, path: Path | str | None = None, cache_dir: Path | None = None
) -> Path:
    """Locate LLaVA-1.5's pretrained ``mm_projector.bin``."""
    configured = _setting(path, PROJECTOR_ENV)
    repo, filename = spec.projector.hf_hub_repo, spec.projector.file
    if configured is not None:
        if configured.is_file():
            return configured
        raise WeightsNotFoundError(
            f"Projector weights not found: {configured} (set by models.weights.projector in params.yaml, the "
            f"projector_file argument or {PROJECTOR_ENV}) is not a file. Point it at {filename} of {repo}."
        )
    found = _cached_file(repo, filename, cache_dir)
    if found is not None:
        return found
    raise WeightsNotFoundError(
        f"Projector weights not found: expected {filename} of {repo} in the Hugging Face cache "
        f"{_cache_location(cache_dir)}. Set models.weights.projector in params.yaml or "
        f"{PROJECTOR_ENV} to the file, or on a machine with "
        f"internet access run `hf download {repo} {filename}` and copy its Hugging Face cache here."
    )


def resolve_llava_weights(
    spec: LlavaSpec,
    clip_weights: Path | str | None = None,
    llm_dir: Path | str | None = None,
    projector_file: Path | str | None = None,
    cache_dir: Path | None = None,
) -> LlavaWeights:
    """Resolve all three weight sources; one error lists every one that is missing."""
    resolved: dict[str, Path] = {}
    missing: list[str] = []
    resolvers = {
        "clip_weights": (resolve_clip_weights, clip_weights),
        "llm_dir": (resolve_llm_dir, llm_dir),
        "projector_file": (resolve_projector_file, projector_file),
    }
    for name, (resolve, path) in resolvers.items():
        try:
            resolved[name] = resolve(spec, path, cache_dir)
        except WeightsNotFoundError as error:
            missing.append(str(error))
    if missing:
        raise WeightsNotFoundError(
            f"The {spec.name} preset is missing {len(missing)} of its 3 weight sources:\n"
            + "\n".join(f"- {message}" for message in missing)
        )
    return LlavaWeights(**resolved)


def load_mm_projector(path: Path | str, projector: Projector) -> Projector:
    """Copy LLaVA-1.5's ``mm_projector.bin`` into ``projector`` and return it.

    ``projector`` must be built with ``input_norm=False``: LLaVA trained its projector on
    the raw CLIP features, so a LayerNorm in front of the imported weights would change
    what they compute. Shapes are checked against ``projector``; the tensors are cast to
    its dtype.
    """
    path = Path(path)
    if not isinstance(projector.norm, torch.nn.Identity):
        raise ValueError(
            f"Cannot load {path} into a Projector with an input LayerNorm: LLaVA's projector has "
            "none. Build it with Projector(vision_dim, llm_dim, input_norm=False)."
        )
    if not path.is_file():
        raise WeightsNotFoundError(
            f"Projector weights not found: {path} is not a file. Set {PROJECTOR_ENV} or pass the "
            "path of LLaVA-1.5's mm_projector.bin."
        )

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} contains a {type(state).__name__}, not a state dict of tensors.")
    unexpected = sorted(set(state) - set(MM_PROJECTOR_KEYS))
    if unexpected:
        raise ValueError(
            f"{path} has keys that LLaVA-1.5's mlp2x_gelu projector does not: {', '.join(unexpected)}. "
            f"Expected exactly: {', '.join(MM_PROJECTOR_KEYS)}."
        )

    target = projector.state_dict()
    converted = {}
    for source_key, target_key in MM_PROJECTOR_KEYS.items():
        expected_shape = tuple(target[target_key].shape)
        if source_key not in state:
            raise ValueError(f"{path} is missing the key {source_key} (shape {expected_shape}).")
        tensor = state[source_key]
        if tuple(tensor.shape) != expected_shape:
            raise ValueError(
                f"{path}: {source_key} has shape {tuple(tensor.shape)} but the projector's "
                f"{target_key} expects {expected_shape}. The file belongs to a model of "
                "another width."
            )
        converted[target_key] = tensor.to(target[target_key].dtype)
    projector.load_state_dict(converted, strict=True)
    return projector
