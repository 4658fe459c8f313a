"""SPPO's estimated win rates and squared loss (Self-Play Preference Optimization, arXiv 2405.00675), as pure functions.

SPPO regresses each sampled answer's log-ratio to the reference onto its estimated win rate against the reference's
own samples (paper eq. 4.7, with the log-partition replaced by the constant ``eta/2``):

    loss(y) = (log pi(y|x) - log pi_ref(y|x) - eta * (P_hat(y) - 1/2)) ** 2,    eta = 1 / beta

on sequence-summed log-probs. ``P_hat(y_i) = mean_k P(y_i beats y_k)`` over the K samples of the prompt, the sample
itself included with ``P(y_i beats y_i) = 1/2`` (paper section 5.1; official ``compute_prob.py``).
"""

from __future__ import annotations

import torch


def win_probabilities_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """Pairwise win probabilities ``P[..., i, j] = sigmoid(s_i - s_j)`` from pointwise scores ``[..., K]``.

    This is how the official code turns (PairRM) scores into probabilities, and the Bradley-Terry reading of a reward
    model. The diagonal is exactly 1/2.
    """
    return torch.sigmoid(scores.unsqueeze(-1) - scores.unsqueeze(-2))


def estimated_win_rates(probabilities: torch.Tensor) -> torch.Tensor:
    """``P_hat(y_i) = mean_k P[..., i, k]`` from a ``[..., K, K]`` matrix of pairwise win probabilities.

    The mean runs over all K samples, the sample itself included (its term is 1/2), so with K samples one answer
    that beats every other one with certainty gets ``(K - 1 + 1/2) / K``, not 1.
    """
    if probabilities.size(-1) != probabilities.size(-2):
        raise ValueError(f"`probabilities` must be a [..., K, K] matrix, got shape {tuple(probabilities.shape)}.")
    eye = torch.eye(probabilities.size(-1), dtype=torch.bool, device=probabilities.device)
    # Whatever a judge says about an answer against itself, the self term is a tie.
    probabilities = probabilities.masked_fill(eye, 0.5)
    return probabilities.mean(-1)


def sppo_loss(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, win_rates: torch.Tensor, beta: float
) -> torch.Tensor:
    """Per-answer SPPO loss ``(log pi/pi_ref (y) - (P_hat(y) - 1/2) / beta) ** 2``.

    Args:
        policy_logps: Sequence-summed log-probs of the answers under the policy, shape ``[N]``.
        ref_logps: The same under the reference (the policy at the start of the round), shape ``[N]``.
        win_rates: Target win rates ``P_hat`` in ``[0, 1]``, shape ``[N]``. With hard labels (``sppo_hard``) they are
            1 for the winner and 0 for the loser.
        beta: ``1 / eta``; the official runs use ``1e-3`` (``eta = 1000``).

    Returns:
        The per-answer losses, shape ``[N]``. The official trainer averages the winner's and the loser's terms; TRL's
        ``DPOTrainer(loss_type="sppo_hard")`` sums them (twice this mean).
    """
    targets = (win_rates.to(policy_logps.dtype) - 0.5) / beta
    return (policy_logps - ref_logps - targets) ** 2


def judge_win_probabilities(
    judge, prompts: list, answers: list[list[str]], references: list | None = None, batch_size: int = 64
) -> list[torch.Tensor]:
    """Pairwise win-probability matrices ``[K_b, K_b]``, one per prompt, from any judge of :mod:`trl_sgpo.evaluation`.

    - A pointwise judge (a ``scores(prompts, answers, references=None)`` method, e.g. a reward model) scores every
      answer once; ``P[i, j] = judge.probability(s_i, s_j)`` when the judge defines it, else ``sigmoid(s_i - s_j)``.
    - A pairwise judge (a ``judge(prompts, answers_a, answers_b, references=None)`` method returning ``P(a beats
      b)``) is asked once per unordered pair ``i < j``; ``P[j, i] = 1 - P[i, j]``. Which answer comes first
      alternates, so a judge that favours one position does not favour the lower index.

    Prompts may have different numbers of answers. Calls go in chunks of ``batch_size``. An abstention (``nan``) stays
    in the matrix; the caller decides what to do with the prompt.
    """
    references = references if references is not None else [None] * len(prompts)
    if hasattr(judge, "scores"):
        flat = [(p, a, r) for p, group, r in zip(prompts, answers, references, strict=True) for a in group]
        scores: list[float] = []
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            refs = [r for _, _, r in chunk]
            scores += list(
                judge.scores([p for p, _, _ in chunk], [a for _, a, _ in chunk], None if refs[0] is None else refs)
            )
        out, offset = [], 0
        for group in answers:
            group_scores = [float(s) for s in scores[offset : offset + len(group)]]
            offset += len(group)
            if hasattr(judge, "probability"):  # a judge's own reading of two scores (e.g. with a temperature)
                out.append(torch.tensor([[judge.probability(a, b) for b in group_scores] for a in group_scores]))
            else:
                out.append(win_probabilities_from_scores(torch.tensor(group_scores)))
        return out
    if not hasattr(judge, "judge"):
        raise TypeError(
            f"{type(judge).__name__} is not a judge: it needs a `scores(prompts, answers, references=None)` method "
            "(pointwise) or a `judge(prompts, answers_a, answers_b, references=None)` method (pairwise)."
        )
    comparisons = []  # (prompt index, i, j, flipped)
    for b, group in enumerate(answers):
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                comparisons.append((b, i, j, (i + j) % 2 == 1))
    results: list[float] = []
    for start in range(0, len(comparisons), batch_size):
        chunk = comparisons[start : start + batch_size]
        first = [answers[b][j] if flip else answers[b][i] for b, i, j, flip in chunk]
        second = [answers[b][i] if flip else answers[b][j] for b, i, j, flip in chunk]
        refs = [references[b] for b, *_ in chunk]
        results += list(judge.judge([prompts[b] for b, *_ in chunk], first, second, None if refs[0] is None else refs))
    out = [torch.full((len(group), len(group)), 0.5) for group in answers]
    for (b, i, j, flip), p in zip(comparisons, results, strict=True):
        p_ij = 1.0 - float(p) if flip else float(p)
        out[b][i, j], out[b][j, i] = p_ij, 1.0 - p_ij
    return out
