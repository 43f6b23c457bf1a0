"""The ``llava-7b`` preset: LLaVA-1.5-7B's vision tower, LLM and projector as drape components.

The architecture is data, in ``llava-7b.json`` next to this module:

* vision: open_clip ``ViT-L-14-336`` with OpenAI weights (QuickGELU). LLaVA-1.5 feeds
  the LLM the patch tokens of the second-to-last transformer block, without the class
  token (``mm_vision_select_layer=-2``, ``mm_vision_select_feature=patch``): 576 tokens of
  width 1024 for a 336 px image.
* LLM: Vicuna-7B-v1.5, a ``LlamaForCausalLM`` with LLaVA's Vicuna v1 conversation template.
* projector: LLaVA-1.5's ``mlp2x_gelu`` (Linear 1024->4096, GELU, Linear 4096->4096), which
  is drape's :class:`~drape.methods.drape.model.Projector` without its input LayerNorm.

The JSON's ``scaled_down`` section overrides only widths, depths and sizes, so
``build_llava_architecture(scale="scaled-down")`` builds the same classes through the same
code small enough for CPU tests. The full scale is meant for the meta device: it
describes about 7.1 B parameters.

Weight files are resolved by :mod:`drape.presets.llava_weights` and the GPU memory of
training is estimated by :mod:`drape.presets.llava_memory`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from drape.methods.drape.model import Projector

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedModel

logger = logging.getLogger(__name__)

PRESET_NAME = "llava-7b"
DESCRIPTION_FILE = Path(__file__).with_name("llava-7b.json")
SCALES = ("full", "scaled-down")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class VisionSpec(_Spec):
    """The open_clip model whose vision tower encodes images."""

    open_clip_model: str  # architecture name in open_clip's model config registry
    pretrained_tag: str  # open_clip pretrained tag of the weights
    hf_hub_repo: str  # Hugging Face repository that hosts the open_clip weight file
    quick_gelu: bool  # OpenAI's CLIP weights were trained with QuickGELU
    select_layer: int = Field(le=-1)  # block whose output is taken, counted from the end
    select_feature: Literal["patch"]  # patch tokens only, without the class token
    image_size: int = Field(ge=1)  # side of the square input, in pixels
    patch_size: int = Field(ge=1)  # side of a square patch, in pixels
    width: int = Field(ge=1)  # width of the residual stream = channels of each patch token
    layers: int = Field(ge=1)  # transformer blocks
    head_width: int = Field(ge=1)  # channels per attention head
    embed_dim: int = Field(ge=1)  # width of CLIP's joint image-text embedding
    text_width: int = Field(ge=1)  # text tower shape; its weights are part of the checkpoint
    text_heads: int = Field(ge=1)
    text_layers: int = Field(ge=1)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class LlmSpec(_Spec):
    """The ``LlamaConfig`` fields of the language model."""

    hf_hub_repo: str
    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)  # inner width of each SwiGLU MLP
    num_hidden_layers: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    max_position_embeddings: int = Field(ge=1)  # max sequence length, in tokens
    rms_norm_eps: float = Field(gt=0)
    conversation: Literal["vicuna_v1"]  # name of the template in drape.presets.conversation


class ProjectorSpec(_Spec):
    """The shared projector and the file of its pretrained weights."""

    type: Literal["mlp2x_gelu"]
    input_norm: bool  # LayerNorm before fc1: False, because LLaVA's projector has none
    hf_hub_repo: str
    file: str


class TrainingSpec(_Spec):
    """Memory-saving settings of the frozen LLM during training."""

    bf16: bool  # keep the frozen LLM and vision tower in bfloat16
    # Recompute each decoder layer in the backward pass instead of storing its activations.
    # The LLM's weights are frozen, but gradients still flow through it to the soft prompts
    # and visual tokens, so its activations are needed in the backward pass.
    gradient_checkpointing: bool


class LlavaSpec(_Spec):
    """The data description of the ``llava-7b`` preset at one scale."""

    name: str
    scale: Literal["full", "scaled-down"]
    vision: VisionSpec
    llm: LlmSpec
    projector: ProjectorSpec
    training: TrainingSpec


def load_llava_spec(scale: str = "full", path: Path = DESCRIPTION_FILE) -> LlavaSpec:
    """Read the preset description; ``scaled-down`` applies the file's ``scaled_down`` overrides."""
    if scale not in SCALES:
        raise ValueError(f"Unknown scale {scale!r} of the {PRESET_NAME} preset. Use one of: {', '.join(SCALES)}.")
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    overrides = raw.pop("scaled_down")
    if scale == "scaled-down":
        for section, values in overrides.items():
            raw[section] = {**raw[section], **values}
    return LlavaSpec.model_validate({**raw, "scale": scale})


def open_clip_overrides(vision: VisionSpec) -> dict[str, Any]:
    """Return the ``create_model`` keyword overrides that give open_clip's model ``vision``'s shape.

    At full scale these equal open_clip's own ``ViT-L-14-336`` config. They are passed
    at both scales so that the scaled-down model takes the same code path.
    """
    return {
        "embed_dim": vision.embed_dim,
        "vision_cfg": {
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "width": vision.width,
            "layers": vision.layers,
            "head_width": vision.head_width,
        },
        "text_cfg": {
            "context_length": 77,  # CLIP's text length, in tokens
            "vocab_size": 49408,  # CLIP's byte-pair vocabulary
            "width": vision.text_width,
            "heads": vision.text_heads,
            "layers": vision.text_layers,
        },
    }


def llama_config(llm: LlmSpec) -> LlamaConfig:
    """Build the ``LlamaConfig`` of ``llm``, with Vicuna's special token ids."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_hidden_layers,
        num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_key_value_heads,
        max_position_embeddings=llm.max_position_embeddings,
        rms_norm_eps=llm.rms_norm_eps,
        tie_word_embeddings=False,  # Llama-2 and Vicuna have a separate lm_head
        bos_token_id=1,  # <s> in the Llama-2 SentencePiece vocabulary
        eos_token_id=2,  # </s>
        pad_token_id=0,  # <unk>, which LLaVA uses as the pad token
    )


def build_projector(spec: LlavaSpec) -> Projector:
    """Build drape's projector with LLaVA-1.5's ``mlp2x_gelu`` shape."""
    return Projector(spec.vision.width, spec.llm.hidden_size, input_norm=spec.projector.input_norm)


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@dataclass
class LlavaArchitecture:
    """The preset's modules, with random weights, on one device."""

    spec: LlavaSpec
    clip: nn.Module  # open_clip CLIP: vision tower, text tower and logit scale
    llm: PreTrainedModel  # LlamaForCausalLM
    projector: Projector

    @property
    def vision(self) -> nn.Module:
        """The open_clip ``VisionTransformer`` of :attr:`clip`."""
        return self.clip.visual

    def parameter_counts(self) -> dict[str, int]:
        """Count the parameters of each LLaVA component and their total.

        ``vision`` is the whole open_clip vision tower, including the 1024x768 CLIP
        projection that LLaVA does not use. ``vision_without_clip_proj`` is the part that
        Hugging Face's ``CLIPVisionModel`` has, the vision tower of LLaVA-1.5. ``total``
        sums ``vision_without_clip_proj``, ``llm`` and ``projector``, as LLaVA-1.5-7B
        consists of these. The CLIP text tower is in ``clip_text`` and not in the total.
        """
        vision = count_parameters(self.vision)
        clip_proj = self.vision.proj.numel() if self.vision.proj is not None else 0
        llm = count_parameters(self.llm)
        projector = count_parameters(self.projector)
        return {
            "vision": vision,
            "vision_without_clip_proj": vision - clip_proj,
            "clip_text": count_parameters(self.clip) - vision,
            "llm": llm,
            "projector": projector,
            "total": vision - clip_proj + llm + projector,
        }


def build_llava_architecture(
    device: str | torch.device = "meta", scale: str = "full", seed: int = 0
) -> LlavaArchitecture:
    """Build the preset's open_clip model, ``LlamaForCausalLM`` and projector on ``device``.

    The modules are created inside a ``torch.device`` context, so on ``"meta"`` no weight
    is allocated and the full scale costs no real memory. Weights are random: seeded
    with ``seed`` on a real device, and absent on the meta device.
    """
    import open_clip
    from transformers import LlamaForCausalLM

    spec = load_llava_spec(scale)
    device = torch.device(device)

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        clip = open_clip.create_model(
            spec.vision.open_clip_model,
            pretrained=None,
            device=device,
            force_quick_gelu=spec.vision.quick_gelu,
            **open_clip_overrides(spec.vision),
        )
        llm = LlamaForCausalLM(llama_config(spec.llm))
        projector = build_projector(spec)

    clip.eval()
    llm.eval()
    return LlavaArchitecture(spec=spec, clip=clip, llm=llm, projector=projector)


def select_patch_features(vision: nn.Module, pixels: torch.Tensor, select_layer: int = -2) -> torch.Tensor:
    """Return LLaVA's visual features: one block's patch tokens, without the class token.

    ``vision`` is an open_clip ``VisionTransformer`` and ``pixels`` a preprocessed batch
    of shape (B, 3, image_size, image_size). ``select_layer=-2`` takes the output of the
    second-to-last transformer block, as LLaVA-1.5's ``mm_vision_select_layer=-2`` does with
    Hugging Face's ``hidden_states[-2]``. ``ln_post`` and the CLIP projection are not
    applied. Returns shape (B, num_patches, width): (B, 576, 1024) for ViT-L-14-336.
    """
    num_blocks = len(vision.transformer.resblocks)
    if not -num_blocks <= select_layer <= -1:
        raise ValueError(
            f"select_layer={select_layer} is invalid for a vision tower of {num_blocks} blocks; "
            f"use a value from -{num_blocks} to -1."
        )
    dtype = next(vision.parameters()).dtype
    output = vision.forward_intermediates(
        pixels.to(dtype),
        indices=[select_layer],
        stop_early=True,  # the blocks after the selected one are not run
        intermediates_only=True,
        output_fmt="NLC",  # (B, num_patches, width), class token removed
    )
    return output["image_intermediates"][0]


def apply_training_flags(llm: PreTrainedModel, training: TrainingSpec) -> PreTrainedModel:
    """Cast the frozen LLM to bfloat16 and enable gradient checkpointing, as ``training`` sets.

    Checkpointing uses the non-reentrant implementation: with frozen weights, the
    reentrant one computes no gradients for layers whose inputs come from the
    embedding table, while the non-reentrant one follows the inputs' ``requires_grad``
    and reaches the soft prompts and visual tokens.
    """
    if training.bf16:
        llm.to(torch.bfloat16)
    if training.gradient_checkpointing:
        # transformers 5.25 renamed gradient_checkpointing_enable to this method.
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # Checkpointing in transformers is active only in training mode. Dropout stays
        # off because Vicuna's LlamaConfig has attention_dropout=0.
        # FrozenLLM keeps the model in eval mode but switches it to train mode for the
        # forward pass of its loss, so checkpointing is active exactly while training.
        llm.train()
    return llm
