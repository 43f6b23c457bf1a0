"""Joint multitask training: the upper bound that may see every earlier task's data.

At each stage the shared generator and projector continue training on the union of the
training sets of all tasks seen so far, for the same number of optimizer steps as the
other methods spend on the new task alone. This is full replay, which continual methods
are not allowed, so its final row bounds what they can reach on this budget.
"""

from __future__ import annotations

from drape.methods.seq_ft.model import SequentialFineTuning


class JointTraining(SequentialFineTuning):
    name = "joint"
    trains_on_seen_tasks = True
    """The train stage passes the union of the seen tasks' training sets."""
