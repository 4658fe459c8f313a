"""Arena-Hard style judging: the judge answers the prompt itself, reasons, then gives a five-level verdict.

The method of Arena-Hard-Auto (Li et al., 2024; ``lmarena/arena-hard-auto``), with a prompt written for this project:

- The judge first writes its own answer to the user prompt, then compares both assistants' answers with it (mistakes,
  helpfulness, relevance, conciseness, missing information) and ends with one of ``[[A>>B]]``, ``[[A>B]]``,
  ``[[A=B]]``, ``[[B>A]]``, ``[[B>>A]]``.
- Two games per prompt with the positions swapped: ``(a, b)`` shown as ``(A, B)``, then as ``(B, A)``.
- The verdict is the last ``[[...]]`` label of the reply (a single-bracket ``[...]`` label when there is none), as
  Arena-Hard reads it.
- A reply without a readable verdict is counted and re-asked once, in the same conversation (the reply, then a short
  request for the verdict alone). A game still without a verdict is dropped and counted; the prompt is then judged by
  its other game alone (Arena-Hard v0.1), and with both games dropped it is an abstention (``nan``).

Verdict to preference, as Arena-Hard-Auto counts battles (``show_result.py``: a strong verdict is three battles won
or lost, a weak one one battle, a tie one battle scored 0.5). Each game's label gives a score for the answer shown as
A and a weight, :data:`VERDICT_SCORES`: ``A>>B`` (1, 3), ``A>B`` (1, 1), ``A=B`` (0.5, 1), ``B>A`` (0, 1), ``B>>A``
(0, 3). A :class:`~trl_sgpo.evaluation.judges.PairwiseJudge` returns one probability per prompt, so a prompt's
preference is the weighted mean of its games' scores (the swapped game's score taken from ``b``'s side): all ``A>B``
(both games won weakly) gives 1, ``A>>B`` in game 1 with ``B>A`` in game 2 (won strongly, then lost weakly) gives
``(3 * 1 + 1 * 0) / 4 = 0.75``. Arena-Hard's own score is the mean over all battles, which weighs a prompt by its
battle count; the win rate here weighs prompts equally. The raw replies stay in the request cache, so Arena-Hard's
battle counting can be recomputed from them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..io.jsonl import stable_hash
from ..openai_client import ChatRun, ClientStats, RowFailure
from .judges import OpenAIPairwiseJudge, _check_lengths, _text


ARENA_HARD_SYSTEM_PROMPT = (
    "You are the referee of a contest between two AI assistants. You will see a user prompt and the answers of "
    "assistant A and assistant B, and you decide which answer serves the user better.\n\n"
    "Work in this order.\n"
    "1. Before weighing the two answers, write your own answer to the user prompt.\n"
    "2. Check each assistant's answer against yours and against what you know: name every mistake or inaccuracy and "
    "say what is right instead.\n"
    "3. Ask of each answer: is it helpful (it does what the prompt asks; when the prompt is ambiguous or open to "
    "several readings, asking the user what they mean is better than guessing), relevant (every part bears on the "
    "request) and concise (clear, no padding or needless length)?\n"
    "4. Where the prompt calls for it, weigh creativity and originality, and point out important information that an "
    "answer leaves out.\n\n"
    "The position of an answer (first or second) and its length are no reason to prefer it.\n\n"
    "Finish with your final verdict, written as exactly one of these labels:\n"
    "[[A>>B]] if assistant A is much better,\n"
    "[[A>B]] if assistant A is somewhat better,\n"
    "[[A=B]] if they are about equally good,\n"
    "[[B>A]] if assistant B is somewhat better,\n"
    "[[B>>A]] if assistant B is much better.\n"
    'For example: "Final verdict: [[B>A]]".'
)

ARENA_HARD_TEMPLATE = (
    "<<<User prompt>>>\n{instruction}\n<<<End of user prompt>>>\n\n"
    "{reference_block}"
    "<<<Answer of assistant A>>>\n{answer_a}\n<<<End of answer of assistant A>>>\n\n"
    "<<<Answer of assistant B>>>\n{answer_b}\n<<<End of answer of assistant B>>>"
)

ARENA_HARD_REFERENCE_BLOCK = (
    "A reference answer, for guidance only (it may itself be imperfect):\n<<<Reference answer>>>\n{reference}\n"
    "<<<End of reference answer>>>\n\n"
)

REASK_PROMPT = (
    "Your reply did not end with a verdict in the required form. Reply with your final verdict only: exactly one of "
    "[[A>>B]], [[A>B]], [[A=B]], [[B>A]], [[B>>A]]."
)

VERDICT_SCORES = {"A>>B": (1.0, 3.0), "A>B": (1.0, 1.0), "A=B": (0.5, 1.0), "B>A": (0.0, 1.0), "B>>A": (0.0, 3.0)}
"""Per verdict label: (score of the answer shown as A, weight of the game), Arena-Hard's battle count (module doc)."""

# Equivalent spellings a judge sometimes writes, mapped to the five labels.
_SYNONYMS = {"B=A": "A=B", "A<B": "B>A", "A<<B": "B>>A", "B<A": "A>B", "B<<A": "A>>B"}
_DOUBLE = re.compile(r"\[\[([AB<>=]+)\]\]")
_SINGLE = re.compile(r"\[([AB<>=]+)\]")


def parse_verdict(text: str | None) -> str | None:
    """The verdict label of a judge's reply: the last ``[[label]]`` (else the last ``[label]``), or ``None``."""
    upper = str(text or "").upper()
    for pattern in (_DOUBLE, _SINGLE):
        labels = [_SYNONYMS.get(m, m) for m in pattern.findall(upper)]
        labels = [label for label in labels if label in VERDICT_SCORES]
        if labels:
            return labels[-1]
    return None


@dataclass
class ArenaHardStats(ClientStats):
    """:class:`~trl_sgpo.openai_client.ClientStats` plus the games: played, re-asked, dropped, and verdict counts
    (labels as shown to the judge, before the swap is undone)."""

    games: int = 0
    reasked: int = 0
    dropped: int = 0
    verdicts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICT_SCORES, 0))


class ArenaHardJudge(OpenAIPairwiseJudge):
    """An LLM behind any OpenAI-compatible endpoint judges Arena-Hard style (see the module doc).

    Same endpoint, client, cache and cost accounting as :class:`~trl_sgpo.evaluation.judges.OpenAIPairwiseJudge`;
    the verdict is read from the reply's text (no log-probabilities), so replies are long: ``max_tokens`` 4096 and
    temperature 0, as Arena-Hard v0.1 sends them.

    Args:
        model, base_url, api_key_env, cache_path, max_concurrency, max_retries, timeout, backoff_base, backoff_max,
            price_input_per_1m, price_output_per_1m, extra_params: As for ``OpenAIPairwiseJudge``.
        temperature, max_tokens: Of each judging request (and of the re-ask).
        system_prompt, template: The prompt; ``template`` has ``{instruction}``, ``{reference_block}``,
            ``{answer_a}`` and ``{answer_b}`` fields.
        use_references: Show the row's reference to the judge (off by default: Arena-Hard's judge writes its own).
        verdict_scores: ``(score of A in [0, 1], weight > 0)`` per label (default :data:`VERDICT_SCORES`; all five
            labels needed).
    """

    reference_block = ARENA_HARD_REFERENCE_BLOCK

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        *,
        temperature: float = 0.0,
        max_tokens: int = 4096,
        system_prompt: str = ARENA_HARD_SYSTEM_PROMPT,
        template: str = ARENA_HARD_TEMPLATE,
        use_references: bool = False,
        verdict_scores: dict[str, tuple[float, float]] | None = None,
        **kwargs: Any,
    ):
        if kwargs.pop("logprobs", False):
            raise ValueError("ArenaHardJudge reads its verdict from the reply's text; drop `logprobs`.")
        super().__init__(
            model,
            base_url,
            logprobs=False,
            temperature=temperature,
            max_tokens=max_tokens,
            system_prompt=system_prompt,
            template=template,
            use_references=use_references,
            **kwargs,
        )
        scores = {label: tuple(map(float, v)) for label, v in (verdict_scores or VERDICT_SCORES).items()}
        if set(scores) != set(VERDICT_SCORES) or not all(0 <= v <= 1 and w > 0 for v, w in scores.values()):
            raise ValueError(
                f"`verdict_scores` must give (score in [0, 1], weight > 0) for each of {list(VERDICT_SCORES)}, "
                f"got {verdict_scores}."
            )
        self.verdict_scores = scores
        self.stats = ArenaHardStats()
        self.name = f"arena-hard:{model}"

    def identity(self) -> dict[str, Any]:
        """Everything that can change a verdict (JSON-serializable; part of the judgment cache key)."""
        return {
            "class": type(self).__name__,
            "model": self.model,
            "base_url": self.base_url,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "system_prompt": stable_hash(self.system_prompt),
            "template": stable_hash(self.template),
            "reask_prompt": stable_hash(REASK_PROMPT),
            "use_references": self.use_references,
            "reference_block": stable_hash(self.reference_block) if self.use_references else None,
            "verdict_scores": {label: list(v) for label, v in self.verdict_scores.items()},
            "extra_params": self.extra_params,
        }

    @staticmethod
    def reask_request(request: dict[str, Any], reply: str | None) -> dict[str, Any]:
        """The follow-up asking for the verdict alone, after ``reply`` had none."""
        messages = [*request["messages"], {"role": "assistant", "content": reply or ""}]
        return {**request, "messages": [*messages, {"role": "user", "content": REASK_PROMPT}]}

    def _play(self, jobs: list[tuple[int, int, dict[str, Any]]]) -> dict[tuple[int, int], tuple[str | None, str]]:
        """``{(row, order): (label or None, reply)}`` for every game that got a reply (failed requests are left out)."""
        results: dict[tuple[int, int], tuple[str | None, str]] = {}

        async def process(run: ChatRun, job):
            try:
                entry, _ = await run.answer(job[2], self.request_key(job[2]))
            except RowFailure:
                return None
            return entry.get("content") or ""

        def on_result(job, reply) -> None:
            if reply is not None:
                results[job[0], job[1]] = (parse_verdict(reply), reply)

        if jobs:
            self.run_requests(
                jobs, process, on_result, cache_path=self.cache_path, stats=self.stats, cache=self._memory_cache
            )
        return results

    def judge(self, prompts, answers_a, answers_b, references=None) -> list[float]:
        _check_lengths(prompts, answers_a, answers_b, references)
        games: dict[int, list[tuple[float, float]]] = {}
        jobs = []
        for i in range(len(prompts)):
            a, b = _text(answers_a[i]), _text(answers_b[i])
            if a.strip() == b.strip():
                games[i] = [(0.5, 1.0)]  # identical answers: a tie without asking
                continue
            reference = references[i] if references is not None else None
            jobs.append((i, 0, self.build_request(prompts[i], a, b, reference)))  # game 1: a shown as A
            jobs.append((i, 1, self.build_request(prompts[i], b, a, reference)))  # game 2: b shown as A
        self.stats.rows += len(jobs)
        self.stats.games += len(jobs)
        played = self._play(jobs)
        # A reply without a verdict is asked once more; a failed request is not (the client retried it already).
        unread = [(i, order, req) for i, order, req in jobs if played.get((i, order), ("", ""))[0] is None]
        retry = [(i, order, self.reask_request(req, played[i, order][1])) for i, order, req in unread]
        self.stats.reasked += len(retry)
        played.update(self._play(retry))
        for i, order, _ in jobs:
            label = played.get((i, order), (None, ""))[0]
            if label is None:
                self.stats.dropped += 1
                self.stats.failed += 1
                continue
            self.stats.written += 1
            self.stats.verdicts[label] += 1
            score, weight = self.verdict_scores[label]
            games.setdefault(i, []).append((score if order == 0 else 1.0 - score, weight))
        return [_weighted_mean(games.get(i)) for i in range(len(prompts))]


def _weighted_mean(games: list[tuple[float, float]] | None) -> float:
    """A prompt's preference from its games' ``(score, weight)`` (``nan`` with no game)."""
    if not games:
        return math.nan
    return sum(s * w for s, w in games) / sum(w for _, w in games)
