"""Answers of a model to a prompt set, for judging: batched, resumable JSONL, progress bar, AlpacaEval export.

A *generator* turns rendered prompt texts into answers. :class:`TransformersGenerator` runs a ``transformers`` causal
LM (the same rendering, padding and stopping as SGPO's policy generation, via
:func:`~trl_sgpo.data.sampling.generate_completions`); :class:`VLLMGenerator` runs a ``vllm.LLM`` (GPU; optional,
tested on CPU with a stand-in object of the same interface). :func:`generate_answers` runs either over a dataset,
appending each finished batch to ``answers.jsonl`` (a rerun answers only what is missing) and writing AlpacaEval's
``model_outputs.json`` (``instruction``, ``output``, ``generator``) beside it, so the answers can be handed to
``alpaca_eval`` as they are.

With ``improve=True`` the model answers the improver request (:func:`~trl_sgpo.templates.improver_prompt`) for each
row's ``draft``: the improvements SGPO trains on, to be judged against the drafts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from datasets import Dataset
from tqdm.auto import tqdm

from ..data.checks import check_rows
from ..io.jsonl import (
    ROW_ID,
    JsonlWriter,
    batch_seed,
    ensure_row_ids,
    load_done,
    rows_in_order,
    split_stale,
    stable_hash,
    write_jsonl_atomic,
)
from ..templates import DEFAULT_TEMPLATE, improver_prompt, improver_template_for, question_text, render_prompt
from .identity import identity_hash, rerun_line, weights_identity


logger = logging.getLogger(__name__)

OUTPUTS_FILE = "model_outputs.json"
ANSWER_KEY = "answer_key"
"""Column of ``answers.jsonl`` naming what made the answer: hashes of the model, the generation settings and the
rendered request. A rerun reuses a row only when all three are the same."""

_CHANGES = {
    "model": "model changed",
    "generation": "generation settings changed",
    "request": "prompt changed",
    None: "written without a key",
}


class AnswerGenerator(Protocol):
    """What :func:`generate_answers` needs: a ``name``, ``render(prompt) -> str`` and a batched ``generate``.

    A generator should also have ``identity() -> dict``: its model's identity under ``"model"`` and every setting
    that can change an answer, JSON-serializable. Without it, saved answers are reused by the generator's class and
    ``name`` alone.
    """

    name: str

    def render(self, prompt: Any) -> str: ...

    def generate(self, texts: list[str], seed: int) -> list[tuple[str, int, bool]]:
        """``(answer text, answer tokens, finished)`` per text; ``finished`` is false when cut at the token budget."""
        ...


class TransformersGenerator:
    """Answers from a ``transformers`` causal LM (greedy by default).

    Args:
        model, tokenizer: The model (used in eval mode on its device) and its tokenizer (needs a pad token).
        max_new_tokens, temperature, top_p: Generation settings; ``temperature=0`` is greedy.
        name: Name in the outputs (default: the model's ``_name_or_path``).
        improver_template: The improver request's template (``improve=True``). Default: the one saved with the
            model (``improver_template.json``), else the default; so a model is asked as it was trained.
        model_identity: The model's identity for saved answers (e.g. ``weights_identity(folder)`` when the model was
            just loaded from that folder). Default: a hash of its parameters as they are in memory, taken when
            :func:`generate_answers` starts.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_new_tokens=256,
        temperature=0.0,
        top_p=1.0,
        name: str | None = None,
        improver_template=None,
        model_identity: dict[str, Any] | None = None,
    ):
        self.model = model
        self.model_identity = model_identity
        self.improver_template = improver_template or improver_template_for(model)
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__

    def render(self, prompt: Any) -> str:
        return render_prompt(prompt, self.tokenizer)

    def identity(self) -> dict[str, Any]:
        """The model (see ``model_identity``) and the generation settings."""
        return {
            "class": type(self).__name__,
            "model": self.model_identity or weights_identity(None, self.model),
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "generation_config": _generation_config(self.model),
        }

    def generate(self, texts: list[str], seed: int) -> list[tuple[str, int, bool]]:
        from ..data.sampling import generate_completions

        was_training = self.model.training
        self.model.eval()
        try:
            outputs = generate_completions(
                self.model,
                self.tokenizer,
                texts,
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                seed=seed,
            )
        finally:
            self.model.train(was_training)
        return [
            (self.tokenizer.decode(ids, skip_special_tokens=True).strip(), len(ids), finished)
            for ids, finished in outputs
        ]


class VLLMGenerator:
    """Answers from a ``vllm.LLM`` (one call per batch; vLLM schedules it internally).

    Args:
        llm: A ``vllm.LLM`` (or an object with its ``generate(prompts, sampling_params, use_tqdm=...)`` and
            ``get_tokenizer()``).
        max_new_tokens, temperature, top_p: Sampling settings.
        sampling_params_cls: ``vllm.SamplingParams`` by default; a stand-in for CPU tests.
        name: Name in the outputs.
        improver_template: The improver request's template (``improve=True``); default: the package default (pass
            ``improver_template_for(<model folder>)`` to use the one saved with the model).
        model_identity: The served model's identity for saved answers. Default: from the engine's model (a local
            folder's content hash, or the Hub id and revision), else ``name``.
    """

    def __init__(
        self,
        llm,
        *,
        max_new_tokens=256,
        temperature=0.0,
        top_p=1.0,
        sampling_params_cls=None,
        name: str = "vllm",
        improver_template=None,
        model_identity: dict[str, Any] | None = None,
    ):
        self.improver_template = improver_template or DEFAULT_TEMPLATE
        self.model_identity = model_identity
        if sampling_params_cls is None:
            from vllm import SamplingParams as sampling_params_cls
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.sampling_params_cls = sampling_params_cls
        self.name = name

    def render(self, prompt: Any) -> str:
        return render_prompt(prompt, self.tokenizer)

    def identity(self) -> dict[str, Any]:
        """The served model and the sampling settings."""
        model = self.model_identity
        if model is None:
            config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
            path = getattr(config, "model", None)
            if path is None:
                model = {"name": self.name}
            elif os.path.isdir(path):
                model = weights_identity(path)
            else:
                model = {"hub_id": path, "revision": getattr(config, "revision", None)}
        return {
            "class": type(self).__name__,
            "model": model,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }

    def generate(self, texts: list[str], seed: int) -> list[tuple[str, int, bool]]:
        params = self.sampling_params_cls(
            max_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p, seed=seed
        )
        outputs = self.llm.generate(texts, params, use_tqdm=False)
        results = []
        for output in outputs:
            completion = output.outputs[0]
            results.append((completion.text.strip(), len(completion.token_ids), completion.finish_reason == "stop"))
        return results


def generate_answers(
    generator: AnswerGenerator,
    dataset: Dataset,
    output_path: str | os.PathLike,
    *,
    batch_size: int = 8,
    seed: int = 0,
    improve: bool = False,
    id_column: str = "id",
    show_progress: bool = True,
) -> Dataset:
    """Answer every row's ``prompt`` (or, with ``improve``, improve every row's ``draft``) with ``generator``.

    Args:
        generator: A :class:`TransformersGenerator`, :class:`VLLMGenerator` or any :class:`AnswerGenerator`.
        dataset: Rows with ``prompt`` (and ``draft`` when ``improve``); other columns pass through.
        output_path: JSONL written batch by batch (fsynced). A row already in it is not answered again when its
            :data:`ANSWER_KEY` matches (same model, generation settings, seed and rendered request); one that does not
            is answered again and replaced, and one log line says how many were reused and why others were not.
            AlpacaEval's ``model_outputs.json`` is (re)written in the same folder at the end.
        batch_size: Prompts per generate call (grouped by length to limit padding).
        seed: Sampling seed (per batch, derived from its row ids: a rerun samples alike).
        improve: Answer the improver request for ``(prompt, draft)`` instead of the prompt.
        id_column: Column to take ``row_id`` from when present.
        show_progress: Show a tqdm progress bar.

    Returns:
        The rows in input order with ``row_id``, ``answer``, ``answer_tokens``, ``answer_finished`` and ``generator``.
    """
    columns = ("prompt", "draft") if improve else ("prompt",)
    check_rows(dataset, columns, ("prompt",), "dataset", " (a string, or a list of chat messages)")
    dataset = ensure_row_ids(dataset, id_column)
    output_path = Path(output_path)
    # The generator's model is asked to improve with the template it was trained with (saved beside its weights).
    template = getattr(generator, "improver_template", None) or DEFAULT_TEMPLATE

    def request(row):
        return improver_prompt(row["prompt"], row["draft"] or "", template) if improve else row["prompt"]

    texts = {i: generator.render(request(row)) for i, row in enumerate(dataset)}
    keys = answer_keys(generator, dataset[ROW_ID], [texts[i] for i in range(len(dataset))], seed, batch_size)
    done, stale = _reusable_rows(output_path, dataset, keys, generator.name, improve)
    pending = [i for i, row_id in enumerate(dataset[ROW_ID]) if row_id not in done]
    pending.sort(key=lambda i: -len(texts[i]))  # similar lengths share a batch: less padding
    what = "Improving" if improve else "Answering"
    with (
        JsonlWriter(output_path) as writer,
        tqdm(
            total=len(dataset),
            initial=len(dataset) - len(pending),
            desc=f"{what} ({generator.name})",
            disable=not show_progress,
        ) as bar,
    ):
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            rows = [dataset[i] for i in batch]
            outputs = generator.generate([texts[i] for i in batch], batch_seed(seed, rows))
            for row, (text, tokens, finished) in zip(rows, outputs, strict=True):
                row.update(answer=text, answer_tokens=tokens, answer_finished=finished, generator=generator.name)
                row[ANSWER_KEY] = keys[row[ROW_ID]]
                done[row[ROW_ID]] = row
            writer.write_many(rows)
            bar.update(len(rows))
    if stale:  # the replaced rows leave the file, so that no reader ever sees them
        write_jsonl_atomic(output_path, done.values())
    result = rows_in_order(dataset, done)
    cut = sum(1 for f in result["answer_finished"] if not f) if len(result) else 0
    if cut:
        logger.warning("%d of %d answers of %s were cut at the token budget.", cut, len(result), generator.name)
    write_model_outputs(result, output_path.parent / OUTPUTS_FILE, generator.name)
    return result


def _generation_config(model: Any) -> dict[str, Any] | None:
    """The model's ``generation_config`` (repetition penalty, stop tokens...), without the library version."""
    config = getattr(model, "generation_config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    values = json.loads(config.to_json_string(use_diff=False))
    values.pop("transformers_version", None)
    return values


def generator_identity(generator: Any) -> dict[str, Any]:
    """``generator.identity()``, or its class and ``name`` for a generator without one."""
    if hasattr(generator, "identity"):
        return generator.identity()
    return {"class": type(generator).__qualname__, "name": getattr(generator, "name", None)}


def answer_keys(
    generator: Any, row_ids: list[str], texts: list[str], seed: int, batch_size: int
) -> dict[str, dict[str, str]]:
    """Per row id, the :data:`ANSWER_KEY` this run writes: hashes of the model, of the generation settings (with the
    seed, and the batch size when sampling: a batch's seed depends on its rows) and of the rendered request."""
    identity = generator_identity(generator)
    settings = {k: v for k, v in identity.items() if k != "model"}
    sampling = identity.get("temperature", 1.0) != 0
    common = {
        "model": identity_hash({"model": identity.get("model")}),
        "generation": identity_hash({**settings, "seed": seed, "batch_size": batch_size if sampling else None}),
    }
    return {row_id: {**common, "request": stable_hash(text)[:32]} for row_id, text in zip(row_ids, texts, strict=True)}


def _reusable_rows(path: Path, dataset: Dataset, keys, name: str, improve: bool) -> tuple[dict[str, Any], int]:
    """The rows of ``path`` (by row id) that this run can reuse, and how many it must redo; logs the one line."""
    done = load_done(path, dataset, ())
    kept, changed = split_stale(done, keys, ANSWER_KEY)
    stale = sum(1 for row_id in keys if row_id in done and row_id not in kept)
    reused = sum(1 for row_id in keys if row_id in kept)
    labels = {**_CHANGES, "request": "prompt or draft changed"} if improve else _CHANGES
    what = f"{'improvements' if improve else 'answers'} for {name}"
    logger.info(rerun_line(what, reused, stale, len(keys) - reused - stale, changed, labels))
    return kept, stale


def write_model_outputs(rows: Dataset, path: str | os.PathLike, generator: str) -> Path:
    """AlpacaEval's ``model_outputs.json``: a list of ``{instruction, output, generator}`` (plus ``dataset`` when
    rows have a ``category``), ready for ``alpaca_eval --model_outputs``."""
    records = []
    categories = rows["category"] if "category" in rows.column_names else [None] * len(rows)
    for prompt, answer, category in zip(rows["prompt"], rows["answer"], categories, strict=True):
        record = {"instruction": question_text(prompt), "output": answer, "generator": generator}
        if category is not None:
            record["dataset"] = category
        records.append(record)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
    os.replace(tmp, path)
    return path
