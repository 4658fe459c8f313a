"""A pairwise judge that runs a causal LM in-process: no endpoint, no API key, no cost per request.

:class:`LocalPairwiseJudge` asks the model the same question as
:class:`~trl_sgpo.evaluation.judges.OpenAIPairwiseJudge` (same prompt and template, rendered with the model's chat
template) and reads the verdict from the next-token distribution after it: ``P(A) / (P(A) + P(B))``, where ``P(A)``
sums the probabilities of the tokens that spell the letter (``"A"``, ``" A"``). Each pair is asked in both orders and
the two are averaged, so ``judge(a, b) == 1 - judge(b, a)`` whatever the model, and a position bias cancels.

The next-token log-probabilities come from a *scorer* (the seam between the judge and the engine):

- :class:`TransformersScorer`: one forward pass per batch of prompts (CPU or GPU);
- :class:`VLLMScorer`: a ``vllm.LLM``: each prompt followed by each letter token, reading that token's prompt
  log-probability (vLLM's sampled log-probabilities cover only its top tokens; prompt log-probabilities are exact).

``backend="auto"`` takes vLLM when it is installed and a GPU is available, else transformers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from ..io.jsonl import stable_hash
from .identity import weights_identity
from .judges import (
    DEFAULT_JUDGE_SYSTEM_PROMPT,
    DEFAULT_JUDGE_TEMPLATE,
    REFERENCE_BLOCK,
    PairwiseJudge,
    _check_lengths,
    _text,
)


PLAIN_PROMPT = "{system_prompt}\n\n{user}\n\nAnswer: "
"""The judge's text for a tokenizer without a chat template."""


def letter_token_ids(tokenizer, letter: str) -> list[int]:
    """The ids of the single tokens that spell ``letter`` as the next word (``"A"``, ``" A"``), deduplicated."""
    ids = []
    for text in (letter, f" {letter}"):
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    if not ids:
        raise ValueError(f"The judge's tokenizer has no single token for {letter!r}; it cannot give a letter verdict.")
    return ids


class TransformersScorer:
    """Next-token log-probabilities of a transformers causal LM, batched with left padding.

    Args:
        model, tokenizer: The LM and its tokenizer.
        batch_size: Prompts per forward pass.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 8):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def logprobs(self, texts: Sequence[str], token_ids: Sequence[int]) -> list[list[float]]:
        """Per text, ``log P(token)`` of each of ``token_ids`` as the token right after the text."""
        import torch

        out: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            encoded = [
                self.tokenizer.encode(t, add_special_tokens=False) for t in texts[start : start + self.batch_size]
            ]
            width = max(len(ids) for ids in encoded)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
            # Positions count real tokens only: models with absolute position embeddings then score a prompt the
            # same whatever it is batched with (rotary ones are unaffected by the padding's offset anyway).
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = self.model(
                    input_ids=input_ids.to(self.model.device),
                    attention_mask=mask.to(self.model.device),
                    position_ids=positions.to(self.model.device),
                ).logits[:, -1, :]
            logp = torch.log_softmax(logits.float(), dim=-1)[:, list(token_ids)]
            out += logp.cpu().tolist()
        return out


class VLLMScorer:
    """Next-token log-probabilities from a ``vllm.LLM``: the prompt log-probability of each candidate token appended
    to the text (``prompt_logprobs=0`` returns exactly the prompt tokens' own log-probabilities).

    Args:
        llm: A ``vllm.LLM`` (or an object with its ``generate`` and ``get_tokenizer``).
        sampling_params_cls: ``vllm.SamplingParams`` by default; a stand-in for CPU tests.
    """

    def __init__(self, llm, *, sampling_params_cls=None):
        if sampling_params_cls is None:
            from vllm import SamplingParams as sampling_params_cls
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.sampling_params_cls = sampling_params_cls

    def logprobs(self, texts: Sequence[str], token_ids: Sequence[int]) -> list[list[float]]:
        prompts = []
        for text in texts:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            prompts += [{"prompt_token_ids": [*ids, token]} for token in token_ids]
        params = self.sampling_params_cls(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        flat = []
        for prompt, output in zip(prompts, outputs, strict=True):
            token = prompt["prompt_token_ids"][-1]
            entry = output.prompt_logprobs[-1][token]
            flat.append(float(getattr(entry, "logprob", entry)))
        k = len(token_ids)
        return [flat[i : i + k] for i in range(0, len(flat), k)]


def _vllm_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


class LocalPairwiseJudge(PairwiseJudge):
    """A causal LM in this process says which of two answers is better, from its verdict-token probabilities.

    Args:
        model: A Hub id or folder (loaded with :func:`trl_sgpo.models.load_model_and_tokenizer`; the embedded
            default ``smollm2-135m-instruct`` works offline), or a model object (then give ``tokenizer``).
        tokenizer: Its tokenizer (loaded with the model when ``model`` is a name).
        system_prompt, template, use_references: The prompt, as for
            :class:`~trl_sgpo.evaluation.judges.OpenAIPairwiseJudge` (same defaults).
        batch_size: Prompts per forward pass (transformers backend).
        backend: ``"auto"`` (vLLM when installed and a GPU is available, else transformers), ``"transformers"`` or
            ``"vllm"``.
        device: transformers backend: where to run (default: cuda when available, else cpu).
        scorer: An object with ``logprobs(texts, token_ids)`` (see :class:`TransformersScorer`), replacing the
            backend; ``tokenizer`` is then required.
        vllm_kwargs: vLLM backend: more arguments of ``vllm.LLM`` (e.g. ``gpu_memory_utilization``).
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        *,
        system_prompt: str = DEFAULT_JUDGE_SYSTEM_PROMPT,
        template: str = DEFAULT_JUDGE_TEMPLATE,
        use_references: bool = True,
        batch_size: int = 8,
        backend: str = "auto",
        device: str | None = None,
        scorer: Any = None,
        vllm_kwargs: dict[str, Any] | None = None,
    ):
        if backend not in ("auto", "transformers", "vllm"):
            raise ValueError(f"`backend` must be auto, transformers or vllm, got {backend!r}.")
        if isinstance(model, (str, os.PathLike)):
            self.model_name = str(model)
        else:
            self.model_name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        self.weights = None
        self._scorer, self._load = scorer, None
        if scorer is not None:
            if tokenizer is None:
                raise ValueError("LocalPairwiseJudge needs the `tokenizer` when `scorer` is given.")
            self.backend = type(scorer).__name__
        elif isinstance(model, (str, os.PathLike)):
            tokenizer = self._prepare(str(model), backend, batch_size, device, vllm_kwargs or {})
        elif model is None or tokenizer is None:
            raise ValueError("LocalPairwiseJudge needs a model name or folder, or a model object and its `tokenizer`.")
        elif backend == "vllm":
            raise ValueError("backend='vllm' needs a model name or folder (vLLM loads it), not a model object.")
        else:
            self._scorer, self.backend = TransformersScorer(model, tokenizer, batch_size=batch_size), "transformers"
            self.weights = weights_identity(None, model)
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.template = template
        self.use_references = use_references
        self.token_ids = {letter: letter_token_ids(tokenizer, letter) for letter in "AB"}
        self.prompt_format = self._prompt_format()
        self.name = f"local:{self.model_name}"

    def _prompt_format(self) -> str:
        """How the prompt reaches the model: ``"system turn"`` (the chat template's system role), ``"in user turn"``
        (a template that rejects the system role, e.g. Gemma's: the system prompt opens the user's turn) or
        ``"plain"`` (no chat template: :data:`PLAIN_PROMPT`)."""
        from jinja2.exceptions import TemplateError

        if not getattr(self.tokenizer, "chat_template", None):
            return "plain"
        try:
            self.tokenizer.apply_chat_template(
                [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                tokenize=False,
                add_generation_prompt=True,
            )
        except TemplateError:
            return "in user turn"
        return "system turn"

    def _prepare(self, name: str, backend: str, batch_size: int, device: str | None, vllm_kwargs: dict):
        """Hash the weights and load the tokenizer now; the model itself on first use (:attr:`scorer`), so that
        :func:`~trl_sgpo.evaluation.evaluate_models` generates every answer before the judge takes the memory."""
        from transformers import AutoTokenizer

        from ..models import load_model_and_tokenizer, resolve_model_path

        path = resolve_model_path(name)
        self.weights = weights_identity(path)
        self.backend = "vllm" if backend == "vllm" or (backend == "auto" and _vllm_available()) else "transformers"

        def load():
            if self.backend == "vllm":
                from vllm import LLM

                return VLLMScorer(LLM(model=path, **vllm_kwargs))
            import torch

            where = device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = torch.bfloat16 if where.startswith("cuda") else torch.float32
            model, tokenizer = load_model_and_tokenizer(path, dtype=dtype)
            return TransformersScorer(model.to(where), tokenizer, batch_size=batch_size)

        self._load = load
        return AutoTokenizer.from_pretrained(path)

    @property
    def scorer(self):
        """The engine behind the verdicts (loaded on first use when the judge was given a model name)."""
        if self._scorer is None:
            self._scorer = self._load()
        return self._scorer

    def identity(self) -> dict[str, Any]:
        """Everything that can change a verdict (JSON-serializable; part of the judgment cache key)."""
        return {
            "class": type(self).__name__,
            "model": self.model_name,
            "weights": self.weights,
            "system_prompt": stable_hash(self.system_prompt),
            "template": stable_hash(self.template),
            "use_references": self.use_references,
            "verdict_tokens": self.token_ids,
            "backend": self.backend,
            "prompt_format": self.prompt_format,
            "plain_prompt": stable_hash(PLAIN_PROMPT) if self.prompt_format == "plain" else None,
            "reference_block": stable_hash(REFERENCE_BLOCK) if self.use_references else None,
        }

    def render(self, prompt: Any, first: str, second: str, reference: str | None) -> str:
        """The text after which the next token is the verdict: the judge prompt in the chat template, with the
        assistant's turn opened."""
        block = REFERENCE_BLOCK.format(reference=reference) if reference and self.use_references else ""
        user = self.template.format(instruction=_text(prompt), reference_block=block, answer_a=first, answer_b=second)
        if self.prompt_format == "plain":
            return PLAIN_PROMPT.format(system_prompt=self.system_prompt, user=user)
        if self.prompt_format == "system turn":
            messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]
        else:
            messages = [{"role": "user", "content": f"{self.system_prompt}\n\n{user}"}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def first_probabilities(self, texts: Sequence[str]) -> list[float]:
        """Per rendered prompt, P(A) / (P(A) + P(B)) of the next token."""
        ids_a, ids_b = self.token_ids["A"], self.token_ids["B"]
        out = []
        for row in self.scorer.logprobs(list(texts), [*ids_a, *ids_b]):
            mass_a = sum(math.exp(v) for v in row[: len(ids_a)])
            mass_b = sum(math.exp(v) for v in row[len(ids_a) :])
            out.append(mass_a / (mass_a + mass_b) if mass_a + mass_b > 0 else math.nan)
        return out

    def judge(self, prompts, answers_a, answers_b, references=None) -> list[float]:
        _check_lengths(prompts, answers_a, answers_b, references)
        texts, asked = [], []
        out = [0.5] * len(prompts)  # identical answers: a tie without asking
        for i in range(len(prompts)):
            a, b = _text(answers_a[i]), _text(answers_b[i])
            if a.strip() == b.strip():
                continue
            reference = references[i] if references is not None else None
            texts += [self.render(prompts[i], a, b, reference), self.render(prompts[i], b, a, reference)]
            asked.append(i)
        p = self.first_probabilities(texts)
        for k, i in enumerate(asked):
            # Both orders: P(a first wins) and 1 - P(b first wins), averaged.
            kept = [v for v in (p[2 * k], 1.0 - p[2 * k + 1]) if not math.isnan(v)]
            out[i] = sum(kept) / len(kept) if kept else math.nan
        return out
