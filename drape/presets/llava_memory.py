"""An estimate of the GPU memory that DRAPE training needs per device with the ``llava-7b`` preset.

The estimate is a sum of formulas, not a measurement. Its assumptions:

* Each device stores a full copy of every model (data parallelism), and ``batch_size``
  is per device. ``seq_len`` counts every LLM input position: chat template, soft
  prompts, the 576 visual tokens, instruction and answer.
* The LLM and the whole open_clip model (vision and text tower, as drape's routing
  embeds instructions with the CLIP text tower) are frozen and kept in bfloat16.
* The prompt generator and the projector train in float32 with AdamW: 4 bytes of
  weights, 4 of gradients and 8 of AdamW moments per parameter. The null-space
  protection adds a float64 covariance and basis per projector Linear layer and a
  float32 snapshot of the projector.
* Gradient checkpointing keeps each decoder layer's bfloat16 input. In the backward
  pass one layer at a time is recomputed, with its activations and their gradients
  alive together. Attention uses a fused kernel (PyTorch SDPA or FlashAttention), so no
  (S x S) score matrix is stored.
* The logits of all positions are materialised: bfloat16 from ``lm_head``, a float32
  copy for the loss, the float32 log-softmax and the float32 logit gradient.
* Visual features are computed without gradients (or read from the feature stage),
  so the vision tower's activations are freed before the LLM runs and are not counted.
* A fixed CUDA context and allocator reserve of 1 GiB and 10 % fragmentation are added.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from drape.methods.drape.config import DrapeConfig
from drape.methods.drape.model import PromptGenerator
from drape.presets.llava import LlavaSpec, build_llava_architecture, count_parameters

GIB = 1024**3
BF16_BYTES = 2
FP32_BYTES = 4
FP64_BYTES = 8
# Float32 weights, gradients and AdamW's two moments.
TRAINABLE_BYTES_PER_PARAMETER = 4 * FP32_BYTES
CUDA_CONTEXT_BYTES = 1 * GIB
FRAGMENTATION_FRACTION = 0.10


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes per device of each part of DRAPE training; ``total`` sums them."""

    frozen_weights: int  # bf16 LLM and open_clip model
    trainable_states: int  # fp32 generator and projector with gradients and AdamW moments
    nullspace: int  # covariances, bases and weight snapshot of the null-space protection
    checkpointed_inputs: int  # each decoder layer's input, kept by gradient checkpointing
    recomputed_layer: int  # one decoder layer's activations and their gradients
    logits: int  # bf16 logits, fp32 copy, log-softmax and gradient
    projector_activations: int  # fp32 projector activations of the visual tokens
    context_and_fragmentation: int  # CUDA context, allocator reserve and fragmentation

    @property
    def total(self) -> int:
        return sum(getattr(self, field.name) for field in fields(self))

    def table(self) -> str:
        """Render the parts and the total in GiB, one per line."""
        lines = [f"{field.name:28s} {getattr(self, field.name) / GIB:8.2f} GiB" for field in fields(self)]
        lines.append(f"{'total':28s} {self.total / GIB:8.2f} GiB")
        return "\n".join(lines)


def generator_parameter_count(spec: LlavaSpec, drape: DrapeConfig) -> int:
    """Count one task's prompt generator's parameters, built on the meta device."""
    with torch.device("meta"):
        generator = PromptGenerator(spec.llm.hidden_size, drape)
    return count_parameters(generator)


def decoder_layer_activation_bytes(spec: LlavaSpec, tokens: int) -> int:
    """Estimate the bytes that one Llama decoder layer stores for ``tokens`` positions.

    Attention stores about 8 hidden-width bf16 tensors (normalised input, q, k, v,
    rotated q and k, attention output, output-projection input). The SwiGLU MLP stores
    4 intermediate-width bf16 tensors (gate, up, activation, product) and its input.
    The two RMSNorms keep float32 copies of their inputs.
    """
    hidden, intermediate = spec.llm.hidden_size, spec.llm.intermediate_size
    attention = 8 * hidden * BF16_BYTES
    mlp = (4 * intermediate + hidden) * BF16_BYTES
    norms = 2 * hidden * FP32_BYTES
    return tokens * (attention + mlp + norms)


def estimate_training_memory(
    spec: LlavaSpec,
    batch_size: int,
    seq_len: int,
    drape: DrapeConfig | None = None,
    generators: int = 1,
) -> MemoryEstimate:
    """Estimate the GPU memory per device of one DRAPE training step (see the module docstring).

    ``generators`` is the number of prompt generators on the device (one per task seen
    so far). Only the current task's generator trains, so each earlier one adds its
    float32 weights without gradients or optimizer state.
    """
    if batch_size < 1 or seq_len < 1 or generators < 1:
        raise ValueError(
            f"batch_size ({batch_size}), seq_len ({seq_len}) and generators ({generators}) must be >= 1"
        )
    drape = drape or DrapeConfig()
    architecture = build_llava_architecture("meta", spec.scale)
    llm_parameters = count_parameters(architecture.llm)
    clip_parameters = count_parameters(architecture.clip)
    projector_parameters = count_parameters(architecture.projector)
    generator_parameters = generator_parameter_count(spec, drape)

    frozen_weights = (llm_parameters + clip_parameters) * BF16_BYTES
    trainable_states = (projector_parameters + generator_parameters) * TRAINABLE_BYTES_PER_PARAMETER
    trainable_states += (generators - 1) * generator_parameters * FP32_BYTES

    # One covariance and one basis of (in + 1)^2 float64 per Linear, plus the snapshot.
    nullspace = 0
    for layer in (architecture.projector.fc1, architecture.projector.fc2):
        nullspace += 2 * (layer.in_features + 1) ** 2 * FP64_BYTES
    nullspace += projector_parameters * FP32_BYTES

    tokens = batch_size * seq_len
    hidden = spec.llm.hidden_size
    checkpointed_inputs = spec.llm.num_hidden_layers * tokens * hidden * BF16_BYTES
    recomputed_layer = 2 * decoder_layer_activation_bytes(spec, tokens)
    logits = tokens * spec.llm.vocab_size * (BF16_BYTES + 3 * FP32_BYTES)

    # The projector keeps its input, the fc1 output, the GELU output and its output.
    patches = batch_size * spec.vision.num_patches
    projector_activations = patches * (spec.vision.width + 3 * hidden) * FP32_BYTES

    subtotal = (
        frozen_weights + trainable_states + nullspace + checkpointed_inputs
        + recomputed_layer + logits + projector_activations
    )
    context = CUDA_CONTEXT_BYTES + int(FRAGMENTATION_FRACTION * subtotal)
    return MemoryEstimate(
        frozen_weights=frozen_weights,
        trainable_states=trainable_states,
        nullspace=nullspace,
        checkpointed_inputs=checkpointed_inputs,
        recomputed_layer=recomputed_layer,
        logits=logits,
        projector_activations=projector_activations,
        context_and_fragmentation=context,
    )
