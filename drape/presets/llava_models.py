"""The ``llava-7b`` and ``llava-7b-scaled`` presets of the pipeline's ``models`` stage.

Both presets write ``models/llm``, ``models/clip`` and ``models/manifest.json``, like the
``embedded`` and ``tiny`` presets of :mod:`drape.encoders`, and the stages load them
through the same ``load_llm`` and ``load_clip``:

* ``llava-7b`` copies no weights. ``models/llm`` and ``models/clip`` contain the preset's
  metadata (and a copy of Vicuna's ``config.json``), which point at the resolved weight
  files, and the manifest records their paths, sizes and modification times. Loading
  rejects a file whose size changed since the ``models`` stage.
* ``llava-7b-scaled`` builds the same classes at the widths of ``llava-7b.json``'s
  ``scaled_down`` section with seeded random weights and writes them into ``models/``,
  together with a random ``models/projector/mm_projector.bin`` in LLaVA's key layout.
  The LLM reuses SmolLM2-135M-Instruct's tokenizer (a Llama tokenizer that ships in a
  package), so its vocabulary is SmolLM2's, not the 512 of the spec.

For both, the manifest names the projector file that the ``init`` stage imports into
every method's projector (``Projector(input_norm=False)``), and the ``vicuna_v1``
template that :class:`drape.mllm.FrozenLLM` renders.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from drape.files import save_tensors
from drape.methods.drape.model import Projector
from drape.presets.llava import (
    LlavaSpec,
    apply_training_flags,
    build_projector,
    llama_config,
    load_llava_spec,
    open_clip_overrides,
    select_patch_features,
)
from drape.presets.llava_weights import (
    MM_PROJECTOR_KEYS,
    LlavaWeights,
    load_mm_projector,
    resolve_llava_weights,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Pipeline preset name -> scale of the preset description.
LLAVA_PRESETS = {"llava-7b": "full", "llava-7b-scaled": "scaled-down"}
TEMPLATE = "vicuna_v1"
CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
PROJECTOR_FILE = "projector/mm_projector.bin"  # relative to the models directory
METADATA_FILE = "drape_model.json"  # the same name as in drape.encoders
SEED = 0  # torch seed of the scaled preset's random weights


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _read_metadata(model_dir: Path) -> dict:
    return json.loads((model_dir / METADATA_FILE).read_text(encoding="utf-8"))


def _file_record(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path), "bytes": stat.st_size, "mtime": stat.st_mtime}


def _directory_record(directory: Path) -> dict:
    """Record the size and modification time of each file in ``directory`` (not recursive)."""
    files = {}
    for path in sorted(directory.iterdir()):
        if path.is_file():  # follows the symlinks of a Hugging Face cache snapshot
            stat = path.stat()
            files[path.name] = {"bytes": stat.st_size, "mtime": stat.st_mtime}
    return {"path": str(directory), "files": files}


def _check_unchanged(record: dict) -> None:
    """Raise if a weight file recorded by the ``models`` stage is gone or has another size.

    DVC cannot track files outside the repository, so this check replaces that tracking. A new
    modification time alone (a copy of the same file) is logged, not rejected.
    """
    root = Path(record["path"])
    files = {root: record} if "files" not in record else {root / name: entry for name, entry in record["files"].items()}
    for path, entry in files.items():
        if not path.exists():
            raise FileNotFoundError(
                f"{path}: weight file recorded by the models stage not found; restore it or re-run "
                "the models stage (dvc repro -f models)"
            )
        stat = path.stat()
        if stat.st_size != entry["bytes"]:
            raise ValueError(
                f"{path} has {stat.st_size} bytes but had {entry['bytes']} when the models stage ran; "
                "the weights changed, so re-run the models stage (dvc repro -f models) and the stages after it"
            )
        if stat.st_mtime != entry["mtime"]:
            logger.info("%s has a new modification time but its recorded size; using it", path)


def _models_relative(models_dir: Path, path: str) -> Path:
    """Resolve a path of the manifest: relative ones are relative to the models directory."""
    return models_dir / path


# ---------------------------------------------------------------------------
# Vision tower and text tower
# ---------------------------------------------------------------------------


def _create_clip(spec: LlavaSpec) -> torch.nn.Module:
    import open_clip

    return open_clip.create_model(
        spec.vision.open_clip_model,
        pretrained=None,
        force_quick_gelu=spec.vision.quick_gelu,
        **open_clip_overrides(spec.vision),
    )


def pad_to_square(image: Image.Image, mean: tuple[float, ...]) -> Image.Image:
    """Pad ``image`` to a centred square filled with the mean colour, as LLaVA-1.5 does.

    LLaVA-1.5 runs with ``image_aspect_ratio=pad`` (its ``expand2square``), so the whole
    image stays visible after the resize and centre crop of the CLIP preprocessing.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    background = tuple(int(value * 255) for value in mean)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


class LlavaClipEncoder:
    """LLaVA-1.5's frozen CLIP with the interface of :class:`drape.encoders.ClipEncoder`.

    Patch tokens are the output of the block ``select_layer`` from the end without the
    class token (576 x 1024 for ViT-L-14-336). The pooled image feature, which routing
    compares with the image prototypes, is the mean of those patch tokens, because the
    pipeline needs it at the patch width. Texts are encoded by the CLIP text tower of the
    same model into its joint embedding (768 wide for ViT-L-14-336).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, info: Any, select_layer: int):
        import open_clip

        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer  # open_clip's CLIP tokenizer: list of texts -> (B, 77) ids
        self.info = info
        self.select_layer = select_layer
        self.mean = open_clip.OPENAI_DATASET_MEAN
        config = open_clip.transform.PreprocessCfg(
            size=info.image_size,
            mean=open_clip.OPENAI_DATASET_MEAN,
            std=open_clip.OPENAI_DATASET_STD,
            interpolation="bicubic",
            resize_mode="shortest",
        )
        self.transform = open_clip.transform.image_transform_v2(config, is_train=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Convert a PIL image into a (3, image_size, image_size) float tensor."""
        from drape.encoders import _to_rgb

        return self.transform(pad_to_square(_to_rgb(image), self.mean))

    def encode_images(self, images: list[Image.Image | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(patches, pooled)``: (B, num_patches, image_dim) and their mean, (B, image_dim).

        ``None`` stands for a text-only sample and is encoded from all-zero pixels (``stack_pixels``).
        """
        if not images:
            empty = torch.empty(0, self.info.num_patches, self.info.image_dim, device=self.device)
            return empty, empty[:, 0, :]
        from drape.encoders import stack_pixels

        pixels = stack_pixels(self.preprocess, images).to(self.device)
        with torch.no_grad():
            patches = select_patch_features(self.model.visual, pixels, self.select_layer)
        return patches, patches.mean(dim=1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Return the CLIP text embeddings of ``texts``, shape (B, text_dim), not L2-normalised.

        Texts longer than CLIP's 77 tokens are truncated by open_clip's tokenizer.
        """
        if not texts:
            return torch.empty(0, self.info.text_dim, device=self.device)
        tokens = self.tokenizer(list(texts)).to(self.device)
        with torch.no_grad():
            return self.model.encode_text(tokens)


def _encoder_info(spec: LlavaSpec, name: str):
    from drape.encoders import EncoderInfo

    return EncoderInfo(
        name=name,
        image_dim=spec.vision.width,
        text_dim=spec.vision.embed_dim,
        num_patches=spec.vision.num_patches,
        image_size=spec.vision.image_size,
    )


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_llava_clip(model_dir: Path) -> LlavaClipEncoder:
    """Load the CLIP of a llava preset onto the GPU when there is one, in bfloat16 if the spec says so."""
    import open_clip

    metadata = _read_metadata(model_dir)
    spec = load_llava_spec(LLAVA_PRESETS[metadata["preset"]])
    if "weights" in metadata:
        _check_unchanged(metadata["weights"])
        checkpoint = Path(metadata["weights"]["path"])
    else:
        checkpoint = model_dir / CLIP_WEIGHTS_FILE
    model = _create_clip(spec)
    open_clip.load_checkpoint(model, str(checkpoint), strict=True, weights_only=True)
    if spec.training.bf16:
        model.to(torch.bfloat16)
    model.to(_device())
    tokenizer = open_clip.get_tokenizer(spec.vision.open_clip_model)
    return LlavaClipEncoder(model, tokenizer, _encoder_info(spec, metadata["name"]), spec.vision.select_layer)


# ---------------------------------------------------------------------------
# Language model
# ---------------------------------------------------------------------------


def load_llava_llm(model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the LLM of a llava preset frozen, in eval mode, with the spec's training flags.

    With ``training.bf16`` the weights are read in bfloat16, and with
    ``training.gradient_checkpointing`` checkpointing is enabled. :class:`FrozenLLM` keeps
    the model in eval mode except during its training forward pass, where checkpointing
    needs train mode.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    metadata = _read_metadata(model_dir)
    spec = load_llava_spec(LLAVA_PRESETS[metadata["preset"]])
    source = model_dir
    if "weights" in metadata:
        _check_unchanged(metadata["weights"])
        source = Path(metadata["weights"]["path"])
    dtype = torch.bfloat16 if spec.training.bf16 else torch.float32
    model = LlamaForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    apply_training_flags(model, spec.training)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


# ---------------------------------------------------------------------------
# Materialisation
# ---------------------------------------------------------------------------


def _save_mm_projector(projector: Projector, path: Path) -> None:
    """Write ``projector`` in the key layout of LLaVA-1.5's ``mm_projector.bin``."""
    state = projector.state_dict()
    converted = {source: state[target].detach().clone() for source, target in MM_PROJECTOR_KEYS.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(converted, path)


def _write_scaled(models_dir: Path, spec: LlavaSpec) -> dict:
    """Write the scaled preset's random CLIP, LLM and projector; return the weight records."""
    from drape.encoders import _atomic_output_dir, _load_smollm2_tokenizer
    from transformers import GenerationConfig, LlamaForCausalLM

    tokenizer = _load_smollm2_tokenizer()
    config = llama_config(spec.llm)
    # SmolLM2's tokenizer replaces Vicuna's vocabulary and special token ids.
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, pad_token_id

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        clip = _create_clip(spec)
        llm = LlamaForCausalLM(config)
        projector = build_projector(spec)
    llm.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_token_id
    )
    source = f"random init, torch seed {SEED}, widths of the scaled_down section of llava-7b.json"

    with _atomic_output_dir(models_dir / "llm") as tmp_dir:
        llm.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        _write_json(tmp_dir / METADATA_FILE, {
            "preset": "llava-7b-scaled", "name": "llava-7b-scaled-llama-random", "pretrained": False,
            "source": f"{source}, SmolLM2-135M-Instruct's tokenizer",
        })
    with _atomic_output_dir(models_dir / "clip") as tmp_dir:
        state = {key: value.detach().contiguous() for key, value in clip.state_dict().items()}
        save_tensors(state, str(tmp_dir / CLIP_WEIGHTS_FILE))
        _write_json(tmp_dir / METADATA_FILE, {
            "preset": "llava-7b-scaled", "name": "llava-7b-scaled-vit-random", "pretrained": False, "source": source,
        })
    _save_mm_projector(projector, models_dir / PROJECTOR_FILE)
    # The file is inside models/, which DVC tracks, so it is recorded by its relative path only.
    return {"projector": {"path": PROJECTOR_FILE, "bytes": (models_dir / PROJECTOR_FILE).stat().st_size}}


def _write_references(models_dir: Path, weights: LlavaWeights) -> dict:
    """Write the full preset's metadata, which points at the weights, and return their records."""
    from drape.encoders import _atomic_output_dir

    records = {
        "clip": _file_record(weights.clip_weights),
        "llm": _directory_record(weights.llm_dir),
        "projector": _file_record(weights.projector_file),
    }
    with _atomic_output_dir(models_dir / "llm") as tmp_dir:
        # The stages read the LLM width from models/llm/config.json.
        (tmp_dir / "config.json").write_bytes((weights.llm_dir / "config.json").read_bytes())
        _write_json(tmp_dir / METADATA_FILE, {
            "preset": "llava-7b", "name": "vicuna-7b-v1.5", "pretrained": True, "weights": records["llm"],
        })
    with _atomic_output_dir(models_dir / "clip") as tmp_dir:
        _write_json(tmp_dir / METADATA_FILE, {
            "preset": "llava-7b", "name": "llava-7b-vit-l-14-336-openai", "pretrained": True, "weights": records["clip"],
        })
    return records


def _check_full_weights(spec: LlavaSpec, weights: LlavaWeights) -> dict:
    """Check the shapes of the full preset's weights without loading the CLIP or the LLM.

    Vicuna's ``config.json`` must match the spec, and the projector file is loaded into
    a projector of the spec's widths (84 MB in float32).
    """
    config = json.loads((weights.llm_dir / "config.json").read_text(encoding="utf-8"))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        expected = getattr(spec.llm, key)
        if config.get(key) != expected:
            raise ValueError(
                f"{weights.llm_dir / 'config.json'}: {key} is {config.get(key)!r} but Vicuna-7B-v1.5 has "
                f"{expected}; point models.weights.llm at a copy of {spec.llm.hf_hub_repo}"
            )
    load_mm_projector(weights.projector_file, build_projector(spec))
    # NOTE: the CLIP checkpoint and the LLM's shards are first read by the features and
    # train stages; the capital-of-France and cat-photo checks of drape.encoders do not
    # run for this preset.
    return {"preset": "llava-7b", "llm_config_matches_spec": True, "projector_shapes_match_spec": True}


def _check_scaled(models_dir: Path, spec: LlavaSpec) -> dict:
    """Load the scaled preset's models back and run one image, one text and one LLM forward pass."""
    from drape.encoders import _cat_photo
    from drape.mllm import FrozenLLM

    clip = load_llava_clip(models_dir / "clip")
    patches, pooled = clip.encode_images([_cat_photo()])
    text = clip.encode_texts(["What is the capital of France?"])
    expected = (1, spec.vision.num_patches, spec.vision.width)
    if tuple(patches.shape) != expected or not torch.isfinite(patches.float()).all():
        raise ValueError(f"{models_dir / 'clip'}: patch features of shape {tuple(patches.shape)} (expected {expected}) or not finite")
    llm = FrozenLLM(*load_llava_llm(models_dir / "llm"), template=TEMPLATE)
    projector = build_projector(spec)
    load_mm_projector(models_dir / PROJECTOR_FILE, projector)
    with torch.no_grad():
        content = projector(patches.float())
        loss = llm.loss(content, ["What is the capital of France?"], ["Paris"])
    if not torch.isfinite(loss):
        raise ValueError(f"{models_dir / 'llm'}: the loss of one sample is {float(loss)}; rematerialise the preset")
    return {
        "preset": "llava-7b-scaled",
        "patch_features": list(patches.shape),
        "text_features": list(text.shape),
        "pooled_features": list(pooled.shape),
        "one_sample_loss": float(loss),
        "sensible_output_checked": False,
    }


def materialize_llava_models(
    models_dir: Path,
    preset: str,
    clip: Path | str | None = None,
    llm: Path | str | None = None,
    projector: Path | str | None = None,
) -> dict:
    """Write ``models_dir`` for a llava preset and return its manifest.

    ``clip``, ``llm`` and ``projector`` are the weight paths of ``llava-7b`` (None: the
    ``DRAPE_LLAVA_*`` variable, else the Hugging Face cache); the scaled preset ignores
    them. Missing weights raise :class:`~drape.presets.llava_weights.WeightsNotFoundError`
    listing each missing file before anything is written.
    """
    from drape.encoders import _file_sizes

    scale = LLAVA_PRESETS[preset]
    spec = load_llava_spec(scale)
    models_dir = Path(models_dir)
    start = time.perf_counter()
    if scale == "full":
        weights = resolve_llava_weights(spec, clip, llm, projector)
    models_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = models_dir / "manifest.json"
    manifest_path.unlink(missing_ok=True)

    if scale == "full":
        records = _write_references(models_dir, weights)
        checks = _check_full_weights(spec, weights)
        encoder_name = "llava-7b-vit-l-14-336-openai"
    else:
        records = _write_scaled(models_dir, spec)
        checks = _check_scaled(models_dir, spec)
        encoder_name = _read_metadata(models_dir / "clip")["name"]

    manifest = {
        "preset": preset,
        "encoder": asdict(_encoder_info(spec, encoder_name)),
        "template": TEMPLATE,
        "projector": {"type": spec.projector.type, "input_norm": spec.projector.input_norm, "path": records["projector"]["path"]},
        "weights": records,
        "training": spec.training.model_dump(),
        "file_sizes": {"llm": _file_sizes(models_dir / "llm"), "clip": _file_sizes(models_dir / "clip")},
        "checks": checks,
    }
    tmp_path = manifest_path.with_suffix(".json.partial")
    _write_json(tmp_path, manifest)
    os.replace(tmp_path, manifest_path)
    logger.info("Wrote the %s preset to %s in %.1f s", preset, models_dir, time.perf_counter() - start)
    return manifest


def import_pretrained_projector(manifest: dict, models_dir: Path, projector: Projector) -> bool:
    """Copy the manifest's pretrained projector file into ``projector``; return False if it names none."""
    entry = manifest.get("projector", {})
    if not entry.get("path"):
        return False
    load_mm_projector(_models_relative(Path(models_dir), entry["path"]), projector)
    return True
