"""Null-space protection of the shared projector, on the real Projector module."""

import torch

from drape.methods.drape.model import Projector
from drape.nullspace import NullSpaceProjector, augmented_inputs, protected_basis, relative_change

VISION, LLM = 24, 16


def task_inputs(seed: int, dims: slice, n: int = 256) -> torch.Tensor:
    """Patch features of one task: large values on its own coordinates, small noise elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    x = 0.01 * torch.randn(n, 4, VISION, generator=generator)
    x[..., dims] += 2.0 * torch.randn(n, 4, dims.stop - dims.start, generator=generator)
    return x


def train(projector, inputs, nullspace, seed: int, steps: int = 150, protect: bool = True):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(inputs.shape[0], inputs.shape[1], LLM, generator=generator)
    optimizer = torch.optim.Adam(projector.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(projector(inputs), target)
        loss.backward()
        if protect:
            nullspace.snapshot()
        optimizer.step()
        if protect:
            nullspace.project_step()
        optimizer.zero_grad()
    return loss.item()


def after_two_tasks(threshold: float, protect: bool):
    torch.manual_seed(0)
    projector = Projector(VISION, LLM)
    nullspace = NullSpaceProjector(projector, threshold)
    old, new = task_inputs(1, slice(0, 10)), task_inputs(2, slice(12, 24))

    train(projector, old, nullspace, seed=1, protect=protect)
    with torch.no_grad(), nullspace.accumulating():
        projector(old)
    nullspace.update_bases()
    with torch.no_grad():
        before = projector(old)
    weights_before = {name: nullspace._augmented_weight(layer).clone() for name, layer in nullspace.layers.items()}

    new_loss = train(projector, new, nullspace, seed=2, protect=protect)
    with torch.no_grad():
        after = projector(old)
    return projector, nullspace, old, before, after, weights_before, new_loss


def test_protected_outputs_stay_unprotected_move():
    *_, before, after, _, protected_loss = after_two_tasks(0.999, protect=True)
    protected = relative_change(before, after)
    *_, before_free, after_free, _, _ = after_two_tasks(0.999, protect=False)
    unprotected = relative_change(before_free, after_free)

    assert unprotected > 0.3, f"unprotected training barely moved old outputs ({unprotected:.3f})"
    assert protected < 0.1 * unprotected, f"protected drift {protected:.4f} vs unprotected {unprotected:.4f}"
    assert protected_loss < 1.0, f"the new task did not train under protection (loss {protected_loss:.3f})"


def test_first_layer_change_within_threshold_bound():
    # ||dW X^T||_F^2 <= ||dW||_2^2 * (energy of X outside U) <= ||dW||_2^2 * (1 - threshold) * trace(C)
    threshold = 0.95
    projector, nullspace, old, *_, weights_before, _ = after_two_tasks(threshold, protect=True)
    layer = "fc1"
    delta = (nullspace._augmented_weight(nullspace.layers[layer]) - weights_before[layer]).double()
    x = augmented_inputs(projector.norm(old))
    change = (x @ delta.T).norm()
    bound = torch.linalg.matrix_norm(delta, ord=2) * torch.sqrt((1 - threshold) * torch.trace(x.T @ x))
    assert change <= bound * 1.0001, f"first-layer change {change:.4f} exceeds the threshold bound {bound:.4f}"
    assert delta.norm() > 1e-3, "the layer did not change at all, so the bound says nothing"


def test_full_threshold_freezes_old_outputs():
    *_, before, after, _, _ = after_two_tasks(1.0, protect=True)
    assert relative_change(before, after) < 1e-4


def test_basis_rank_follows_energy_threshold():
    eigenvalues = torch.tensor([50.0, 30.0, 15.0, 4.0, 1.0], dtype=torch.float64)
    covariance = torch.diag(eigenvalues)
    assert protected_basis(covariance, 0.80).shape[1] == 2
    assert protected_basis(covariance, 0.95).shape[1] == 3
    assert protected_basis(covariance, 1.0).shape[1] == 5
    assert protected_basis(torch.zeros(3, 3, dtype=torch.float64), 0.9).shape[1] == 0


def test_bias_is_protected():
    # Inputs all zero except the appended 1: only the bias can move their output.
    projector = Projector(VISION, LLM)
    nullspace = NullSpaceProjector(projector, 0.999)
    nullspace.covariances["fc1"][-1, -1] = 100.0
    nullspace.update_bases()
    nullspace.snapshot()
    with torch.no_grad():
        projector.fc1.bias.add_(1.0)
    nullspace.project_step()
    assert torch.allclose(projector.fc1.bias, nullspace._snapshot["fc1"][:, -1])
