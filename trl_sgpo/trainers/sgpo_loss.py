"""SGPO's pair loss, as pure functions: DPO (sigmoid) or IPO on (chosen: the improvement ``y'``, rejected: the draft
``y``) against the reference, the two losses of TRL's ``OnlineDPOTrainer``. SSO's loss builds on the same
:func:`preference_loss`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def preference_loss(logits: torch.Tensor, beta: float, loss_type: str) -> torch.Tensor:
    """DPO (``"sigmoid"``) or IPO (``"ipo"``) loss of ``logits = (log pi/pi_ref)(chosen) - (log pi/pi_ref)(rejected)``.

    The same two losses as TRL's ``OnlineDPOTrainer``: ``-log sigmoid(beta * logits)`` and
    ``(logits - 1 / (2 * beta)) ** 2``.
    """
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    raise ValueError(f"`loss_type` must be 'sigmoid' or 'ipo', got {loss_type!r}.")


def sgpo_loss(
    logps: dict[str, torch.Tensor], ref_logps: dict[str, torch.Tensor], beta: float, loss_type: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair loss and the usual DPO statistics, from the summed completion log-probs of ``"chosen"`` and
    ``"rejected"`` under the policy (``logps``) and the reference (``ref_logps``)."""
    chosen, rejected = logps["chosen"], logps["rejected"]
    chosen_ratio = chosen - ref_logps["chosen"]
    rejected_ratio = rejected - ref_logps["rejected"]
    logits = chosen_ratio - rejected_ratio
    margins = beta * logits.detach()
    metrics = {
        "logps/chosen": chosen.detach(),
        "logps/rejected": rejected.detach(),
        "rewards/chosen": beta * chosen_ratio.detach(),
        "rewards/rejected": beta * rejected_ratio.detach(),
        "rewards/margins": margins,
        "rewards/accuracies": (margins > 0).float(),
    }
    return preference_loss(logits, beta, loss_type), metrics
