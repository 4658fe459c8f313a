"""Target writers: who writes the improver's SFT target ``y'`` from ``{prompt, response, reference}``.

:func:`write_targets` runs any writer over a dataset, writing each finished row to a JSONL file as it comes (so a
rerun resumes) and each failed row, with its reason, to a separate failures file (a rerun retries those). Writers:

- :class:`OpenAITargetWriter`: the real thing. A strong LLM behind any OpenAI-compatible endpoint (OpenAI, vLLM,
  SGLang, TGI, Ollama, ...) rewrites the policy's answer one step toward the reference, following
  :mod:`trl_sgpo.target_prompts`. Bounded concurrency, retries with backoff, per-request timeout, token and cost
  accounting, and an on-disk answer cache so that no request is paid for twice.
- :class:`TransformersTargetWriter`: the same prompt, answered by a local ``transformers`` model. Good with a strong
  local instruct model on a GPU and no server at hand; with a small model (like the 135M default) the targets are
  poor, so use it there only to exercise the pipeline.
- :class:`ReferenceStepWriter`: no model at all. A deterministic sentence-level edit that replaces, inserts or deletes
  the first sentences where the answer differs from the reference, moving it part of the way there. Instant and
  reproducible: for tests, CPU smoke runs, and as a baseline; its targets splice reference sentences into the
  answer, so they are incremental and close to the policy's text but not always fluent.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset
from tqdm.auto import tqdm

from ..io.jsonl import ROW_ID, JsonlWriter, batch_seed, ensure_row_ids, load_done, rows_in_order, stable_hash
from ..openai_client import (  # run_coroutine: re-exported for existing imports
    ChatRun,
    ClientStats,
    EndpointAbort,
    OpenAIEndpoint,
    RowFailure,
    run_coroutine,  # noqa: F401
)
from ..templates import render_prompt
from .checks import check_rows
from .sampling import generate_completions
from .target_prompts import (
    DEFAULT_TARGET_PROMPT,
    MalformedTargetError,
    TargetPromptConfig,
    build_target_messages,
    parse_target,
)


logger = logging.getLogger(__name__)

TARGET_COLUMNS = ("prompt", "response", "reference")


# --------------------------------------------------------------------------------------------- results and stats


@dataclass
class TargetResult:
    """The outcome for one row: a ``target``, or an ``error`` (the reason it failed). ``meta`` is added to the row."""

    target: str | None = None
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# One set of counters and one abort for every client of an OpenAI-compatible endpoint (see trl_sgpo.openai_client).
WriterStats = ClientStats
TargetWriterAbort = EndpointAbort


Job = dict[str, Any]
OnResult = Callable[[Job, TargetResult], None]


class TargetWriter(ABC):
    """A writer turns rows ``{prompt, response, reference}`` into targets; see :func:`write_targets`."""

    name: str = "writer"

    def __init__(self):
        self.stats = WriterStats()

    @abstractmethod
    def run(self, jobs: list[Job], on_result: OnResult) -> None:
        """Write a target for every row of ``jobs`` and call ``on_result(row, result)`` once per row as it finishes.

        Raise :class:`TargetWriterAbort` for a failure that makes the other rows pointless.
        """

    def prepare(self, output_path: Path) -> None:  # noqa: B027 (optional hook, a no-op by default)
        """Called by :func:`write_targets` before :meth:`run` (e.g. to place a cache next to the output)."""


# --------------------------------------------------------------------------------------------- the driver


def sibling_path(output_path: str | os.PathLike, suffix: str) -> Path:
    """``targets.jsonl`` -> ``targets.<suffix>.jsonl``: where the failures and the cache of an output go."""
    path = Path(output_path)
    stem = path.name.removesuffix(".jsonl")
    return path.with_name(f"{stem}.{suffix}.jsonl")


def write_targets(
    writer: TargetWriter,
    dataset: Dataset,
    output_path: str | os.PathLike,
    failures_path: str | os.PathLike | None = None,
    *,
    id_column: str = "id",
    show_progress: bool = True,
) -> Dataset:
    """Write an improver target for every row of ``dataset`` with ``writer``.

    Args:
        writer: A :class:`TargetWriter` (:class:`OpenAITargetWriter`, :class:`TransformersTargetWriter`,
            :class:`ReferenceStepWriter`). Its counters are in ``writer.stats`` afterwards.
        dataset: Rows with ``prompt``, ``response`` (the policy's answer, e.g. from
            :func:`~trl_sgpo.sampling.sample_responses`) and ``reference``. Other columns pass through.
        output_path: JSONL file of finished rows (input columns + ``target``, ``target_writer`` and the writer's
            metadata), appended and fsynced row by row. Rows already in it are skipped, so a rerun resumes.
        failures_path: JSONL file where each failed row is recorded as ``{row_id, reason, writer, time}`` (appended:
            it is a log of attempts). Defaults to ``<output>.failures.jsonl``. Failed rows are not in
            ``output_path``, so a rerun retries them.
        id_column: Column to take ``row_id`` from when the dataset has no ``row_id`` yet.
        show_progress: Show a tqdm progress bar.

    Returns:
        The rows that have a target, in input order.

    Raises:
        ValueError: A column is missing, or a ``prompt``/``reference`` is empty (rows are named). Empty ``response``
            rows are recorded as failures instead, since they come from the model, not the input.
        TargetWriterAbort: Every row would fail (e.g. the endpoint rejects the key). Finished rows are kept.
    """
    hint = " (the policy's answers come from `trl-sgpo sample`)"
    check_rows(dataset, TARGET_COLUMNS, ("prompt", "reference"), "dataset", hint)
    dataset = ensure_row_ids(dataset, id_column)
    output_path = Path(output_path)
    failures_path = Path(failures_path) if failures_path is not None else sibling_path(output_path, "failures")
    done = load_done(output_path, dataset, TARGET_COLUMNS)
    pending = [dataset[i] for i, row_id in enumerate(dataset[ROW_ID]) if row_id not in done]
    if done:
        logger.info("Resuming %s: %d of %d targets already written.", output_path, len(done), len(dataset))

    writer.stats = stats = WriterStats(rows=len(pending))
    writer.prepare(output_path)
    with (
        JsonlWriter(output_path) as out,
        JsonlWriter(failures_path) as failures,
        tqdm(
            total=len(dataset),
            initial=len(dataset) - len(pending),
            desc=f"Targets ({writer.name})",
            disable=not show_progress,
        ) as bar,
    ):
        _run_writer(writer, pending, _recorder(writer, out, failures, done, bar))
    if stats.failed:
        logger.warning(
            "%d of %d rows failed; reasons in %s. Rerun the same command to retry them.",
            stats.failed,
            len(pending),
            failures_path,
        )
    return rows_in_order(dataset, done)


def _recorder(writer: TargetWriter, out: JsonlWriter, failures: JsonlWriter, done: dict, bar) -> Callable:
    """The ``on_result`` callback of ``writer.run``: a target goes to ``out`` (and ``done``), a failure to
    ``failures``; ``writer.stats`` and the progress bar count them."""
    stats = writer.stats

    def on_result(row: Job, result: TargetResult) -> None:
        if result.target is not None:
            row = {**row, "target": result.target, "target_writer": writer.name, **result.meta}
            out.write(row)
            done[row[ROW_ID]] = row
            stats.written += 1
        else:
            failures.write({ROW_ID: row[ROW_ID], "reason": result.error, "writer": writer.name, "time": time.time()})
            stats.failed += 1
        bar.update(1)
        bar.set_postfix(failed=stats.failed, retries=stats.retries, cost=f"${stats.cost_usd:.3f}", refresh=False)

    return on_result


def _run_writer(writer: TargetWriter, pending: list[Job], on_result: Callable) -> None:
    """Run ``writer`` on the ``pending`` rows; an empty response is a failure without a request."""
    stats = writer.stats
    start = time.perf_counter()
    jobs = []
    for row in pending:
        if not str(row["response"] or "").strip():
            on_result(row, TargetResult(error="empty response: the policy wrote nothing to improve"))
        else:
            jobs.append(row)
    try:
        writer.run(jobs, on_result)
    finally:
        stats.elapsed_s = time.perf_counter() - start
        logger.info("Targets: %s", stats.summary())


# --------------------------------------------------------------------------------------------- OpenAI-compatible


class OpenAITargetWriter(TargetWriter, OpenAIEndpoint):
    """Targets from a chat model behind any OpenAI-compatible ``/v1/chat/completions`` endpoint.

    The client machinery (shared with the OpenAI judge) is :mod:`trl_sgpo.openai_client`. It uses
    ``openai.AsyncOpenAI`` with its own retries switched off (``max_retries=0``), so that every retry is ours,
    counted and bounded.

    - Concurrency: at most ``max_concurrency`` requests in flight (an ``asyncio.Semaphore``). The first request goes
      alone until it is answered (a 429 also counts: the endpoint took the key): if the key is bad, one request
      fails, not ``max_concurrency``.
    - Retries: HTTP 429, 408, 409 and 5xx, timeouts, connection errors and malformed bodies are retried up to
      ``max_retries`` times, waiting ``min(backoff_max, backoff_base * 2**attempt)`` seconds with jitter (or the
      server's ``Retry-After``, when it sends one). After that the row is recorded as failed.
    - Fatal: 401/403 (key) and 404 (model or URL) stop the whole run at once, cancelling the requests in flight.
    - Other 4xx (e.g. a prompt over the context length), an empty or cut-off answer (``finish_reason == "length"``),
      or one :func:`~trl_sgpo.target_prompts.parse_target` rejects: the row is recorded as failed, not retried.
    - Cache: each usable answer is appended (fsynced) to ``cache_path`` under the sha256 of the exact request JSON
      (model, messages, sampling parameters) before the row is written. A rerun, or a row with an identical request,
      reuses it without sending anything. Only usable answers are cached, so failed rows are asked again on rerun.
    - Cost: prompt and completion tokens of every answer received are summed; ``cost_usd`` uses the per-million-token
      prices given.
    - The API key is read from the environment variable ``api_key_env`` when the run starts, passed to the client,
      and written nowhere: not in the cache, the failures, the logs or this object's repr. Error texts from the
      server are scrubbed of it before they are recorded.

    Args:
        model: Model name at the endpoint.
        base_url: Endpoint, e.g. ``http://localhost:8000/v1``; ``None`` for api.openai.com (or ``$OPENAI_BASE_URL``).
        api_key_env: Name of the environment variable holding the key. For a server without authentication, set
            it to any value (``export OPENAI_API_KEY=EMPTY``).
        prompt_config: The target-writing prompt (:class:`~trl_sgpo.target_prompts.TargetPromptConfig`).
        temperature, max_tokens: Sampling parameters sent with each request.
        extra_params: More request parameters (e.g. ``{"seed": 0}`` or ``{"max_completion_tokens": 2048}``), sent
            as is and part of the cache key.
        max_concurrency: Most requests in flight at once.
        max_retries: Retries per row after the first attempt.
        timeout: Seconds one attempt may take before it counts as a timeout.
        backoff_base, backoff_max: Backoff schedule, in seconds.
        price_input_per_1m, price_output_per_1m: USD per million prompt / completion tokens, for ``cost_usd``.
        cache_path: Answer cache (JSONL), e.g. one shared by several runs. ``None``: ``<output>.cache.jsonl`` next to
            each output of :func:`write_targets`.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        prompt_config: TargetPromptConfig = DEFAULT_TARGET_PROMPT,
        temperature: float = 0.7,
        max_tokens: int = 2048,
        extra_params: dict[str, Any] | None = None,
        max_concurrency: int = 32,
        max_retries: int = 5,
        timeout: float = 120.0,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        price_input_per_1m: float = 0.0,
        price_output_per_1m: float = 0.0,
        cache_path: str | os.PathLike | None = None,
    ):
        TargetWriter.__init__(self)
        OpenAIEndpoint.__init__(
            self,
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
        self.prompt_config = prompt_config
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.extra_params = dict(extra_params or {})
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.active_cache_path = self.cache_path  # the cache of the current run (see prepare)
        self.name = f"openai:{model}"

    def prepare(self, output_path: Path) -> None:
        self.active_cache_path = self.cache_path or sibling_path(output_path, "cache")

    def build_request(self, row: Job) -> dict[str, Any]:
        """The exact JSON body sent for ``row`` (its sha256 is the cache key)."""
        messages = build_target_messages(row["prompt"], row["response"], row["reference"], self.prompt_config)
        request = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens is not None:
            request["max_tokens"] = self.max_tokens
        request.update(self.extra_params)
        return request

    def check_answer(self, content: str | None, finish_reason: str | None, request: dict[str, Any]) -> None:
        if finish_reason == "length":
            raise RowFailure(
                f"answer cut off at max_tokens={self.max_tokens} (finish_reason 'length'); raise --max-tokens"
            )
        try:
            parse_target(content, self.prompt_config)
        except MalformedTargetError as e:
            raise RowFailure(f"unusable answer: {e}") from None

    def run(self, jobs: list[Job], on_result: OnResult) -> None:
        self.read_api_key()  # a missing key is named before anything else
        if self.active_cache_path is None:
            raise ValueError("`cache_path` is not set; pass it, or run the writer through `write_targets`.")
        self.run_requests(jobs, self._process, on_result, cache_path=self.active_cache_path, stats=self.stats)

    async def _process(self, run: ChatRun, job: Job) -> TargetResult:
        request = self.build_request(job)
        try:
            entry, cached = await run.answer(request, stable_hash(request))
            target = parse_target(entry["content"], self.prompt_config)
        except RowFailure as e:
            return TargetResult(error=run.scrub(str(e)))
        except MalformedTargetError as e:  # a cached answer that a stricter parser (require_tag) now rejects
            return TargetResult(error=f"unusable answer: {e}")
        usage = entry.get("usage") or {}
        return TargetResult(
            target=target,
            meta={
                "target_prompt_tokens": usage.get("prompt_tokens"),
                "target_completion_tokens": usage.get("completion_tokens"),
                "target_cached": cached,
            },
        )


# --------------------------------------------------------------------------------------------- offline writers


class TransformersTargetWriter(TargetWriter):
    """Targets written by a local ``transformers`` chat model, with the same prompt as :class:`OpenAITargetWriter`.

    Worth it with a strong instruct model on a GPU when no server is at hand; a small model writes poor targets (the
    pipeline still runs, which is what tests and CPU smoke runs need). Answers cut off at ``max_new_tokens`` or that
    :func:`~trl_sgpo.target_prompts.parse_target` rejects are recorded as failures.

    Args:
        model, tokenizer: The writer model (a causal LM) and its tokenizer.
        prompt_config: The target-writing prompt.
        batch_size, max_new_tokens, temperature, top_p, seed: Generation settings (``temperature=0`` is greedy).
        system_in_user: Fold the system message into the user turn, for chat templates that reject a system role.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        prompt_config: TargetPromptConfig = DEFAULT_TARGET_PROMPT,
        batch_size: int = 8,
        max_new_tokens: int = 512,
        temperature: float = 0.7,
        top_p: float = 1.0,
        seed: int = 0,
        system_in_user: bool = False,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_config = prompt_config
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.system_in_user = system_in_user
        self.name = f"transformers:{getattr(model.config, '_name_or_path', '') or type(model).__name__}"

    def render(self, row: Job) -> str:
        messages = build_target_messages(row["prompt"], row["response"], row["reference"], self.prompt_config)
        if self.system_in_user:
            messages = [{"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}]
        return render_prompt(messages, self.tokenizer)

    def run(self, jobs: list[Job], on_result: OnResult) -> None:
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(jobs), self.batch_size):
                batch = jobs[start : start + self.batch_size]
                outputs = generate_completions(
                    self.model,
                    self.tokenizer,
                    [self.render(row) for row in batch],
                    max_new_tokens=self.max_new_tokens,
                    temperature=self.temperature,
                    top_p=self.top_p,
                    seed=batch_seed(self.seed, batch),
                )
                for row, (ids, finished) in zip(batch, outputs, strict=True):
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    if not finished:
                        on_result(row, TargetResult(error=f"answer cut off at max_new_tokens={self.max_new_tokens}"))
                        continue
                    try:
                        target = parse_target(text, self.prompt_config)
                    except MalformedTargetError as e:
                        on_result(row, TargetResult(error=f"unusable answer: {e}"))
                        continue
                    on_result(row, TargetResult(target=target, meta={"target_completion_tokens": len(ids)}))
        finally:
            self.model.train(was_training)


_SENTENCE = re.compile(r"[^\n]*?(?:[.!?](?=\s)|\n|$)\s*")


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences, each keeping its trailing whitespace, so ``"".join(...)`` gives ``text`` back.

    A sentence ends at ``.``, ``!`` or ``?`` followed by whitespace, or at a line break (list items, paragraphs).
    """
    return [m.group(0) for m in _SENTENCE.finditer(text) if m.group(0)]


def _join(chunks: list[str]) -> str:
    out = ""
    for chunk in chunks:
        if out and not out[-1].isspace():
            out += " "
        out += chunk
    return out.strip()


def reference_step(response: str, reference: str, fraction: float = 0.5, max_edits: int | None = None) -> str:
    """Move ``response`` part of the way toward ``reference``, one sentence edit at a time.

    The two texts are aligned sentence by sentence (``difflib``); every difference is split into single-sentence
    edits (replace one sentence by the reference's, insert one, delete one), in reading order. The first
    ``ceil(fraction * n_edits)`` of them (at most ``max_edits``) are applied and the rest of the response is kept:
    the beginning of the answer moves toward the reference, the remainder stays the policy's own text.
    ``fraction=1`` gives the reference (``max_edits`` does not apply); identical texts are returned unchanged.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"`fraction` must be in (0, 1], got {fraction}.")
    source, goal = split_sentences(response.strip()), split_sentences(reference.strip())
    matcher = difflib.SequenceMatcher(a=[s.strip() for s in source], b=[s.strip() for s in goal], autojunk=False)
    # Each atomic edit: (source index it replaces or None, source index it goes before, reference sentence or None).
    edits: list[tuple[str, int, str | None]] = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        pairs = min(i2 - i1, j2 - j1)
        edits += [("replace", i1 + k, goal[j1 + k]) for k in range(pairs)]
        edits += [("delete", i, None) for i in range(i1 + pairs, i2)]
        edits += [("insert", i2, goal[j]) for j in range(j1 + pairs, j2)]
    if not edits:
        return response.strip()
    count = math.ceil(fraction * len(edits))
    if max_edits is not None and fraction < 1:  # fraction 1 asks for the reference itself, whatever the cap
        count = min(count, max_edits)
    replaced: dict[int, str] = {}
    deleted: set[int] = set()
    inserted: dict[int, list[str]] = {}
    for kind, index, sentence in edits[:count]:
        if kind == "replace":
            replaced[index] = sentence
        elif kind == "delete":
            deleted.add(index)
        else:
            inserted.setdefault(index, []).append(sentence)
    chunks = []
    for i in range(len(source) + 1):
        chunks += inserted.get(i, [])
        if i < len(source) and i not in deleted:
            chunks.append(replaced.get(i, source[i]))
    return _join(chunks)


class ReferenceStepWriter(TargetWriter):
    """Deterministic offline targets: :func:`reference_step` of each response toward its reference.

    No model, no API, instant and reproducible. For tests, CPU smoke runs of the whole pipeline, and as a baseline.
    Its targets are incremental by construction and share most text with the policy's answer, but a spliced-in
    reference sentence may not read fluently next to the answer's own, and when the answer shares no sentence with
    the reference, a short answer (one or two sentences) is mostly replaced by the reference's opening. Use a real LLM
    writer for training runs.

    Args:
        fraction: Share of the sentence edits between response and reference to apply (``0 < fraction <= 1``).
        max_edits: Most sentence edits per target when ``fraction < 1``; at 1 the target is the reference.
    """

    def __init__(self, fraction: float = 0.5, max_edits: int | None = 3):
        super().__init__()
        if not 0 < fraction <= 1:
            raise ValueError(f"`fraction` must be in (0, 1], got {fraction}.")
        self.fraction = fraction
        self.max_edits = max_edits
        self.name = f"reference-step:{fraction:g}"
        # Its targets are the references: a filter should keep them rather than drop them as reference copies.
        self.writes_references = fraction >= 1

    def run(self, jobs: list[Job], on_result: OnResult) -> None:
        for row in jobs:
            on_result(
                row,
                TargetResult(target=reference_step(row["response"], row["reference"], self.fraction, self.max_edits)),
            )
