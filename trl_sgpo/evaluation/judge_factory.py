"""The one judge factory: :func:`build_judge` makes the judge of ``trl-sgpo eval --judge``, of the recipes' ``--judge``
and of the recipe's evaluation stage, so that a judge kind means the same everywhere.

A module of its own: the judges it makes (:mod:`.arena_hard`, :mod:`.local_judge`) build on :mod:`.judges`.
"""

from __future__ import annotations

from typing import Any

from .judges import OpenAIPairwiseJudge, PairwiseJudge, ReferenceSimilarityJudge, RewardModelJudge


JUDGE_KINDS = ("none", "similarity", "reward-model", "openai", "local")
JUDGE_STYLES = ("alpaca-eval", "arena-hard")


def build_judge(
    kind: str,
    *,
    model: str | None = None,
    base_url: str | None = None,
    style: str = "alpaca-eval",
    logprobs: bool = True,
    read_api_key: bool = True,
    reward_model: str | None = None,
    similarity_temperature: float = 0.05,
    device: str | None = None,
    flag_separator: str = "_",
    **endpoint: Any,
) -> PairwiseJudge | None:
    """The judge named ``kind``, its settings checked before any model loads: the one factory behind
    ``trl-sgpo eval --judge``, the recipes' ``--judge`` and the recipe's evaluation stage.

    Args:
        kind: One of :data:`JUDGE_KINDS`: ``none`` (returns ``None``), ``similarity``
            (:class:`ReferenceSimilarityJudge`), ``reward-model`` (:class:`RewardModelJudge`), ``openai``
            (:class:`OpenAIPairwiseJudge`, or :class:`~trl_sgpo.evaluation.arena_hard.ArenaHardJudge` with
            ``style="arena-hard"``) or ``local`` (:class:`~trl_sgpo.evaluation.local_judge.LocalPairwiseJudge`).
        model: openai: the model name at ``base_url``; local: a Hub id or folder of a causal LM.
        base_url: openai: the endpoint (default: api.openai.com).
        style: openai: ``alpaca-eval`` (one letter) or ``arena-hard`` (the judge answers, reasons, gives a
            five-level verdict).
        logprobs: openai, alpaca-eval style: ask for the verdict token's log-probabilities.
        read_api_key: openai: read the key now, so that a missing one fails before any answer is generated.
        reward_model: reward-model: Hub id or folder.
        similarity_temperature: similarity: ``P(a beats b) = sigmoid((sim_a - sim_b) / T)``.
        device: reward-model and local: where the model runs (default: cuda when available).
        flag_separator: How error messages spell option names: ``_`` for the recipes (``--judge_model``), ``-`` for
            the command line (``--judge-model``).
        endpoint: openai: more :class:`OpenAIPairwiseJudge` settings (``api_key_env``, ``max_concurrency``,
            ``max_retries``, ``timeout``, ``cache_path``, ``price_input_per_1m``, ``price_output_per_1m``).
    """

    def flag(name: str) -> str:
        return "--" + name.replace("_", flag_separator)

    if kind not in JUDGE_KINDS:
        raise ValueError(f"{flag('judge')} must be one of {JUDGE_KINDS}, got {kind!r}.")
    if style not in JUDGE_STYLES:
        raise ValueError(f"{flag('judge_style')} must be one of {JUDGE_STYLES}, got {style!r}.")
    if style != "alpaca-eval" and kind != "openai":
        raise ValueError(f"{flag('judge_style')} {style} applies to --judge openai only, not --judge {kind}.")
    if kind == "none":
        return None
    if kind == "similarity":
        return ReferenceSimilarityJudge(temperature=similarity_temperature)
    if kind == "reward-model":
        if not reward_model:
            raise ValueError(
                f"--judge reward-model needs {flag('reward_model')} (Hub id or folder of the reward model)."
            )
        return RewardModelJudge(reward_model, device=device)
    if not model:
        what = "(a Hub id or folder of a causal LM)" if kind == "local" else f"(the model name at {flag('base_url')})"
        raise ValueError(f"--judge {kind} needs {flag('judge_model')} {what}.")
    if kind == "local":
        from .local_judge import LocalPairwiseJudge

        return LocalPairwiseJudge(model, device=device)
    if style == "arena-hard":
        from .arena_hard import ArenaHardJudge

        judge = ArenaHardJudge(model, base_url, **endpoint)
    else:
        judge = OpenAIPairwiseJudge(model, base_url, logprobs=logprobs, **endpoint)
    if read_api_key:
        judge.read_api_key()
    return judge
