"""O-LoRA: a new LoRA adapter per task, kept orthogonal to the earlier tasks' adapters.

Every task adds an adapter; all adapters stay active and their updates add up, so no task
label is needed at inference. While task t trains, earlier adapters are frozen and the
loss adds ``orthogonal_weight * sum_i sum_layers |A_i A_t^T|`` (the entries of the product
of the down-projections, L1), which pushes the new adapter's input subspace away from the
subspaces earlier tasks use.
"""

from __future__ import annotations

import torch

from drape.methods.lora_adapters import LoraMethod


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Overlap of the row spaces of ``a`` (r1, d) and ``b`` (r2, d): ``||Q_a^T Q_b||_F^2 / min(r1, r2)``.

    0 means orthogonal subspaces and 1 means one contains the other.
    """
    qa = torch.linalg.qr(a.detach().float().T).Q
    qb = torch.linalg.qr(b.detach().float().T).Q
    return float((qa.T @ qb).pow(2).sum() / min(qa.shape[1], qb.shape[1]))


class OLora(LoraMethod):
    name = "o_lora"

    def active_for(self, route):
        return self.adapters()

    def orthogonality(self, task: str) -> torch.Tensor | None:
        """``sum_i sum_layers |A_i A_task^T|`` over the adapters of tasks before ``task``."""
        current = self.adapter_of(task)
        earlier = [name for name in self.adapters() if name != current]
        if not earlier:
            return None
        total = 0.0
        for layer in self.lora_layers():
            new = layer.lora_A[current].weight  # (r, d_in)
            for name in earlier:
                total = total + (layer.lora_A[name].weight.detach() @ new.T).abs().sum()
        return total

    def regularizer(self, batch, task):
        terms = []
        orthogonality = self.orthogonality(task)
        if orthogonality is not None and self.config.orthogonal_weight:
            terms.append(self.config.orthogonal_weight * orthogonality)
        if self.config.l2_weight:
            terms.append(self.config.l2_weight * sum(p.pow(2).sum() for p in self.task_parameters(task)))
        return sum(terms) if terms else None

    def overlaps(self, task: str) -> dict[str, float]:
        """Largest subspace overlap over the layers between ``task``'s adapter and each earlier one."""
        current, result = self.adapter_of(task), {}
        for earlier in self.task_names:
            name = self.adapter_of(earlier)
            if name == current:
                continue
            result[earlier] = max(subspace_overlap(layer.lora_A[name].weight, layer.lora_A[current].weight) for layer in self.lora_layers())
        return result

    def add_task(self, task):
        super().add_task(task)
        if self._peft is not None:
            # Overlap of the freshly initialised adapter, the reference for the trained one.
            self._initial_overlap = max(self.overlaps(task).values(), default=0.0)

    def end_task(self, task, features, device):
        overlaps = self.overlaps(task)
        return {
            "max_subspace_overlap": max(overlaps.values(), default=0.0),
            "initial_max_subspace_overlap": getattr(self, "_initial_overlap", 0.0),
            "subspace_overlap": overlaps,
        }
