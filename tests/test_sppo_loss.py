"""SPPO's win-rate estimate and loss against values worked out by hand."""

import math

import pytest
import torch

from trl_sgpo.trainers.sppo_loss import (
    estimated_win_rates,
    judge_win_probabilities,
    sppo_loss,
    win_probabilities_from_scores,
)


def test_win_rates_include_the_self_term_one_half():
    # Row i: P(y_i beats y_k). By hand: (0.5 + 0.8 + 0.6) / 3, (0.2 + 0.5 + 0.3) / 3, (0.4 + 0.7 + 0.5) / 3.
    probabilities = torch.tensor([[0.5, 0.8, 0.6], [0.2, 0.5, 0.3], [0.4, 0.7, 0.5]])
    assert estimated_win_rates(probabilities).tolist() == pytest.approx([1.9 / 3, 1.0 / 3, 1.6 / 3])


def test_self_term_is_a_tie_whatever_the_judge_said():
    # A judge with position bias may give P(y beats y) != 1/2; the estimate uses 1/2. By hand: (0.5 + 1) / 2.
    probabilities = torch.tensor([[0.9, 1.0], [0.0, 0.1]])
    assert estimated_win_rates(probabilities).tolist() == pytest.approx([0.75, 0.25])


def test_sure_winner_among_k_is_not_one():
    probabilities = torch.tensor([[0.5, 1.0, 1.0, 1.0, 1.0]] + [[0.0, 0.5, 0.5, 0.5, 0.5]] * 4)
    assert estimated_win_rates(probabilities)[0].item() == pytest.approx(4.5 / 5)


def test_probabilities_from_scores_are_bradley_terry():
    # s = [0, ln 3]: P(y_0 beats y_1) = 1 / (1 + 3) = 1/4. P_hat = [(1/2 + 1/4) / 2, (3/4 + 1/2) / 2].
    probabilities = win_probabilities_from_scores(torch.tensor([0.0, math.log(3.0)]))
    assert probabilities.flatten().tolist() == pytest.approx([0.5, 0.25, 0.75, 0.5])
    assert estimated_win_rates(probabilities).tolist() == pytest.approx([0.375, 0.625])


def test_batched_shapes():
    scores = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    win_rates = estimated_win_rates(win_probabilities_from_scores(scores))
    assert win_rates.flatten().tolist() == pytest.approx([0.375, 0.625, 0.5, 0.5])


def test_soft_loss_uses_eta_one_over_beta():
    # beta = 0.01 -> eta = 100; P_hat = 0.75 -> target log-ratio 25. Log-ratio 5: (5 - 25)^2 = 400.
    # P_hat = 0.3 -> target -20; log-ratio -20: 0. P_hat = 0.5 -> target 0; log-ratio 2: 4.
    losses = sppo_loss(
        policy_logps=torch.tensor([-10.0, -40.0, -3.0]),
        ref_logps=torch.tensor([-15.0, -20.0, -5.0]),
        win_rates=torch.tensor([0.75, 0.3, 0.5]),
        beta=0.01,
    )
    assert losses.tolist() == pytest.approx([400.0, 0.0, 4.0])


def test_default_beta_gives_targets_of_hundreds_of_nats():
    # beta = 1e-3: P_hat = 0.6 -> target 100 nats; log-ratio 0 -> 10000.
    loss = sppo_loss(torch.tensor([-7.0]), torch.tensor([-7.0]), torch.tensor([0.6]), beta=1e-3)
    assert loss.item() == pytest.approx(1e4)


def test_hard_labels_match_trl_sppo_hard():
    # TRL's sppo_hard: (lr_w - 0.5/beta)^2 + (lr_l + 0.5/beta)^2. beta = 0.5: (3 - 1)^2 + (-2 + 1)^2 = 5; the mean
    # over the two answers is 2.5.
    losses = sppo_loss(torch.tensor([1.0, -4.0]), torch.tensor([-2.0, -2.0]), torch.tensor([1.0, 0.0]), beta=0.5)
    assert losses.tolist() == pytest.approx([4.0, 1.0])


def test_gradient_of_the_squared_loss():
    # d/d logp (lr - t)^2 = 2 (lr - t): lr = 5, t = 25 -> -40.
    policy = torch.tensor([-10.0], requires_grad=True)
    sppo_loss(policy, torch.tensor([-15.0]), torch.tensor([0.75]), beta=0.01).sum().backward()
    assert policy.grad.item() == pytest.approx(-40.0)


def test_rejects_non_square_matrix():
    with pytest.raises(ValueError, match=r"\[\.\.\., K, K\]"):
        estimated_win_rates(torch.zeros(2, 3))


class LengthScores:
    """Pointwise stand-in judge: the score of an answer is its length."""

    def scores(self, prompts, answers, references=None):
        return [float(len(a)) for a in answers]


class LongerWins:
    """Pairwise stand-in judge: P(a beats b) = 0.9 when a is longer, 0.1 when shorter, 0.5 on equal lengths."""

    def __init__(self):
        self.calls = []

    def judge(self, prompts, answers_a, answers_b, references=None):
        self.calls += list(zip(answers_a, answers_b))
        return [0.5 if len(a) == len(b) else (0.9 if len(a) > len(b) else 0.1) for a, b in zip(answers_a, answers_b)]


def test_pointwise_judge_gives_bradley_terry_matrices():
    # Scores 1 and 1 + ln 3 -> the ln 3 gap of test_probabilities_from_scores_are_bradley_terry, via lengths 1 and 2.
    matrices = judge_win_probabilities(LengthScores(), ["p", "q"], [["a", "bb"], ["a", "a", "a"]], batch_size=2)
    assert [tuple(m.shape) for m in matrices] == [(2, 2), (3, 3)]
    assert matrices[0][1, 0].item() == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert matrices[1].flatten().tolist() == pytest.approx([0.5] * 9)


def test_pairwise_judge_asked_once_per_pair_with_complementary_probabilities():
    judge = LongerWins()
    (matrix,) = judge_win_probabilities(judge, ["p"], [["a", "bbb", "cc"]], batch_size=1)
    assert len(judge.calls) == 3  # pairs (0,1), (0,2), (1,2); never an answer against itself
    # By hand: "bbb" beats both (0.9), "cc" beats "a" (0.9). P_hat = [(0.5+0.1+0.1)/3, (0.9+0.5+0.9)/3, (0.9+0.1+0.5)/3]
    assert matrix.flatten().tolist() == pytest.approx([0.5, 0.1, 0.1, 0.9, 0.5, 0.9, 0.9, 0.1, 0.5])
    assert estimated_win_rates(matrix).tolist() == pytest.approx([0.7 / 3, 2.3 / 3, 1.5 / 3])
    # Positions alternate (i + j odd: the higher index first), so a position bias does not favour low indices.
    assert judge.calls == [("bbb", "a"), ("a", "cc"), ("cc", "bbb")]


def test_not_a_judge():
    with pytest.raises(TypeError, match="scores"):
        judge_win_probabilities(object(), ["p"], [["a", "b"]])


class TemperedScores(LengthScores):
    """A pointwise judge with its own reading of two scores (as ReferenceSimilarityJudge has a temperature)."""

    def probability(self, score_a, score_b):
        return 1 / (1 + math.exp(-(score_a - score_b) / 2))


def test_pointwise_judge_probability_method_is_used():
    # Lengths 1 and 3, temperature 2: P(long beats short) = sigmoid(1).
    (matrix,) = judge_win_probabilities(TemperedScores(), ["p"], [["a", "bbb"]])
    assert matrix[1, 0].item() == pytest.approx(1 / (1 + math.exp(-1.0)))
