"""SSO's weighted three-pair loss (Self-Steering Optimization, arXiv 2410.17131 version 1), as pure functions.

Per prompt ``x`` the policy samples ``y+`` under a good principle (``x+``: the principle as system message), ``y-``
under the matching bad principle (``x-``) and ``y_o`` with no principle. The loss is

    W * [L(x; y+ > y-) + theta * G],     G = L(x+; y+ > y-) + L(x-; y_o > y+),
    W = sigmoid(-(alpha * m(y+) + (1 - alpha) * m(y-))),

with ``L`` a DPO-style base loss against the reference (IPO in the paper's version 1, or sigmoid) and ``m`` the
length-normalized log-prob of an answer under the plain prompt ``x``. ``W`` is not detached, as in the paper and
both published code versions: its gradient pushes the mean log-probs of ``y+`` and ``y-`` up, weighted by the pair
loss. The bad-principle pair prefers the unsteered ``y_o`` over ``y+`` (not ``y+`` over ``y-``), which keeps the
rejected answer near the policy's own distribution.
"""

from __future__ import annotations

import torch

from .sgpo_loss import preference_loss


def sso_weight(mean_logp_chosen: torch.Tensor, mean_logp_rejected: torch.Tensor, alpha: float) -> torch.Tensor:
    """``W = sigmoid(-(alpha * m(y+) + (1 - alpha) * m(y-)))`` on length-normalized log-probs under the plain prompt.

    Log-probs are at most 0, so ``W`` lies in ``[1/2, 1)``; pairs the policy already finds likely weigh less. Not
    detached.
    """
    return torch.sigmoid(-(alpha * mean_logp_chosen + (1 - alpha) * mean_logp_rejected))


def sso_loss(
    plain_logits: torch.Tensor,
    good_logits: torch.Tensor,
    bad_logits: torch.Tensor,
    mean_logp_chosen: torch.Tensor,
    mean_logp_rejected: torch.Tensor,
    beta: float,
    theta: float,
    alpha: float,
    loss_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example SSO loss and its weight ``W``.

    Args:
        plain_logits: DPO logits of ``(x; y+ > y-)``: ``(log pi/pi_ref)(y+|x) - (log pi/pi_ref)(y-|x)``, summed
            log-probs, shape ``[N]``.
        good_logits: The same for ``(x+; y+ > y-)``, answers scored under the good principle.
        bad_logits: The same for ``(x-; y_o > y+)``, answers scored under the bad principle.
        mean_logp_chosen: ``m(y+)``, the policy's mean per-token log-prob of ``y+`` under ``x``.
        mean_logp_rejected: ``m(y-)``, the same for ``y-``.
        beta: Base-loss temperature (``0.2`` in the official launch script).
        theta: Weight of the self-steering term ``G`` (``0.1``).
        alpha: Share of ``y+`` in ``W`` (``0.66``).
        loss_type: ``"ipo"`` (paper version 1) or ``"sigmoid"``.

    Returns:
        ``(losses, weights)``, each of shape ``[N]``.
    """
    main = preference_loss(plain_logits, beta, loss_type)
    steer = preference_loss(good_logits, beta, loss_type) + preference_loss(bad_logits, beta, loss_type)
    weights = sso_weight(mean_logp_chosen, mean_logp_rejected, alpha)
    return weights * (main + theta * steer), weights
