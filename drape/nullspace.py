"""Null-space protection of a shared module's Linear layers.

After a task, each Linear layer accumulates the uncentered covariance ``C += X^T X`` of
its inputs over the task's tokens, with a constant 1 appended to every input so that the
bias is covered. The eigenvectors of ``C`` that carry ``threshold`` of its trace span the
subspace ``U`` that earlier tasks use. Later updates of that layer's augmented weight
``[W b]`` are projected, ``dW <- dW (I - U U^T)``, so the layer's output on earlier inputs
moves only through the input energy outside ``U`` (at most ``1 - threshold`` of it).

The projection applies to the update the optimizer made, not to the gradient: Adam's
per-coordinate scaling would carry a projected gradient out of the null space again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

logger = logging.getLogger(__name__)


def augmented_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """Flatten layer inputs to (N, d_in) and append the constant 1 that multiplies the bias."""
    flat = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)
    return torch.cat([flat, torch.ones(flat.shape[0], 1, dtype=flat.dtype, device=flat.device)], dim=1)


def protected_basis(covariance: torch.Tensor, threshold: float) -> torch.Tensor:
    """Eigenvectors of ``covariance`` holding ``threshold`` of its trace: (d_in + 1, k)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    eigenvalues = eigenvalues.flip(0).clamp(min=0)
    eigenvectors = eigenvectors.flip(1)
    total = eigenvalues.sum()
    if total <= 0:
        return covariance.new_zeros((covariance.shape[0], 0))
    energy = torch.cumsum(eigenvalues, 0) / total
    rank = int(torch.searchsorted(energy, torch.tensor(threshold, dtype=energy.dtype)).item()) + 1
    return eigenvectors[:, : min(rank, eigenvectors.shape[1])]


class NullSpaceProjector:
    """Covariances of every Linear layer in ``module`` and the projection of their updates."""

    def __init__(self, module: nn.Module, threshold: float):
        self.module = module
        self.threshold = threshold
        self.layers: dict[str, nn.Linear] = {
            name: layer for name, layer in module.named_modules() if isinstance(layer, nn.Linear)
        }
        self.covariances: dict[str, torch.Tensor] = {
            name: torch.zeros(layer.in_features + 1, layer.in_features + 1, dtype=torch.float64)
            for name, layer in self.layers.items()
        }
        self.bases: dict[str, torch.Tensor] = {}
        self._snapshot: dict[str, torch.Tensor] = {}

    @contextmanager
    def accumulating(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """Within the block, every forward pass of ``module`` adds its inputs to the covariances.

        ``reduce`` is a sum over data-parallel processes that each run the block on their
        share of the samples. With it, the block's inputs are summed into fresh matrices,
        which pass through ``reduce`` before they are added, so every process ends with the
        same covariances.
        """
        earlier = self.covariances
        if reduce is not None:
            self.covariances = {name: torch.zeros_like(covariance) for name, covariance in earlier.items()}

        def hook(name: str):
            def record(_layer: nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
                x = augmented_inputs(args[0].detach()).cpu()
                self.covariances[name] += x.T @ x

            return record

        handles = [layer.register_forward_hook(hook(name)) for name, layer in self.layers.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            if reduce is not None:
                added, self.covariances = self.covariances, earlier
        if reduce is not None:
            for name, covariance in added.items():
                self.covariances[name] = earlier[name] + reduce(covariance)

    def update_bases(self) -> dict[str, int]:
        """Recompute the protected subspaces from the covariances; return each layer's rank."""
        self.bases = {name: protected_basis(cov, self.threshold) for name, cov in self.covariances.items()}
        return self.ranks()

    def ranks(self) -> dict[str, int]:
        return {name: basis.shape[1] for name, basis in self.bases.items()}

    @property
    def active(self) -> bool:
        return any(basis.shape[1] > 0 for basis in self.bases.values())

    def _augmented_weight(self, layer: nn.Linear) -> torch.Tensor:
        bias = layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
        return torch.cat([layer.weight.detach(), bias.detach()[:, None]], dim=1)  # (d_out, d_in + 1)

    def snapshot(self) -> None:
        """Remember the weights before an optimizer step."""
        if self.active:
            self._snapshot = {name: self._augmented_weight(layer).clone() for name, layer in self.layers.items()}

    @torch.no_grad()
    def project_step(self) -> None:
        """Replace the update since ``snapshot`` by its projection onto the null space."""
        if not self.active:
            return
        for name, layer in self.layers.items():
            basis = self.bases[name]
            if basis.shape[1] == 0:
                continue
            before = self._snapshot[name]
            delta = (self._augmented_weight(layer) - before).to(torch.float64)  # (d_out, d_in + 1)
            basis = basis.to(delta.device)
            delta = delta - (delta @ basis) @ basis.T
            updated = (before.to(torch.float64) + delta).to(layer.weight.dtype)
            layer.weight.copy_(updated[:, :-1])
            if layer.bias is not None:
                layer.bias.copy_(updated[:, -1])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"covariance.{name}": cov for name, cov in self.covariances.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.covariances:
            key = f"covariance.{name}"
            if key not in state or state[key].shape != self.covariances[name].shape:
                found = tuple(state[key].shape) if key in state else "missing"
                raise ValueError(
                    f"null-space covariance '{key}' has shape {found}, expected {tuple(self.covariances[name].shape)}; "
                    "the checkpoint comes from a projector of another shape"
                )
            self.covariances[name] = state[key].to(torch.float64).clone()
        self.update_bases()


def relative_change(before: torch.Tensor, after: torch.Tensor) -> float:
    """``||after - before||_F / ||before||_F``."""
    return float((after - before).norm() / before.norm().clamp(min=1e-12))

