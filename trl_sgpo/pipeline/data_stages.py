"""Stages 1-3 of the recipe (sample, targets, filter) on every process of an ``accelerate launch``.

- ``sample`` and ``filter`` (model-bound): each process answers, then scores, its share of the rows
  (:func:`~trl_sgpo.io.jsonl.shard_order`) into its own file under the stage's ``shards/`` folder, resumed from it
  on a rerun; the main process merges the shares into the stage's output.
- ``targets`` (network-bound: one client keeps ``max_concurrency`` requests in flight): the main process only.

The processes meet through files in the run's folder (:class:`~trl_sgpo.io.peers.Peers`): a process that fails
makes the others raise :class:`~trl_sgpo.io.peers.PeerFailedError` with its error within seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from accelerate import PartialState
from datasets import Dataset

from ..data import target_writers
from ..io.jsonl import ROW_ID, ensure_row_ids, load_rows, read_jsonl, rows_in_order, write_jsonl_atomic
from ..io.peers import Peers
from .stages import Stage


SCORE_BATCH_ROWS = 4
"""Most rows the perplexity filter scores per forward pass (each row: the response and the target)."""


def _merge_shards(rows: Dataset, shards: Path, pattern: str) -> Dataset:
    """Every share's rows (of any process count, first copy wins), in the order of ``rows``."""
    done: dict[str, dict[str, Any]] = {}
    for path in sorted(shards.glob(pattern)):
        for row in read_jsonl(path):
            done.setdefault(row[ROW_ID], row)
    return rows_in_order(rows, done)


@contextmanager
def _sharded_stage(
    stage: Stage, peers: Peers, state: PartialState, message: str, merge: Callable[[], dict[str, Any]]
) -> Iterator[tuple[tuple[int, int], Path]]:
    """Around this process's share of a stage's work (the ``with`` block, given ``(shard, shard_file_folder)``): mark
    the stage started, then, once every process did its share, ``merge()`` (returns the summary) on the main."""
    name = stage.root.name
    if state.is_main_process:
        started = stage.start()
        print(message, flush=True)
        peers.signal(f"{name}-start")
    peers.wait(f"{name}-start", [0])
    shards = stage.root / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    yield (peers.index, peers.count), shards
    peers.signal(f"{name}-shard")
    if state.is_main_process:
        peers.wait(f"{name}-shard")
        stage.finish(started, **merge())
        peers.signal(f"{name}-done")
    peers.wait(f"{name}-done", [0])
    stage.check()  # the others read the summary and run id from the marker


def run_data_stages(
    script_args,
    training_args,
    policy: Callable[[], tuple[Any, Any]],
    rows: Dataset,
    stages: list[Stage],
    max_length: int,
    sync_dir: Path,
) -> Stage | None:
    """Stages 1-3 (``stages``: the sample, targets and filter :class:`Stage`) on every process.

    ``max_length`` bounds the rows the filter scores (improver SFT's). ``sync_dir`` is a folder every process sees,
    for the signals of :class:`Peers`. The summaries of the stages that ran are in their :class:`Stage`.

    ``policy()`` loads the policy and its tokenizer on this process's device (once). Returns the finished filter
    stage, or ``None`` when ``--stop_after`` stops the run at or before it.
    """
    state = PartialState()
    peers = Peers(sync_dir, state)
    sample, targets, filtered = stages
    with peers.guard("the data stages"):
        rows = ensure_row_ids(rows)
        if not sample.check():
            _sample(sample, script_args, training_args, policy, rows, state, peers)
        if script_args.stop_after == "sample":
            return None
        if not targets.check():
            _targets(targets, sample, script_args, state, peers)
        if script_args.stop_after == "targets":
            return None
        if not filtered.check():
            _filter(filtered, targets, script_args, policy, max_length, state, peers)
        if script_args.stop_after == "filter":
            return None
        return filtered


def _sample(sample: Stage, script_args, training_args, policy, rows: Dataset, state, peers) -> None:
    """Stage 1: the policy's answers, each process its share."""
    from ..data.sampling import sample_responses

    def merge_answers():
        answered = _merge_shards(rows, sample.root / "shards", "responses.*.jsonl")
        write_jsonl_atomic(sample.root / "responses.jsonl", answered.to_list())
        finished = sum(answered["response_finished"]) if len(answered) else 0
        return {"rows": len(answered), "finished": finished, "finished_frac": finished / max(1, len(answered))}

    message = f"[1/6] sampling the policy's answers to {len(rows)} prompts on {state.num_processes} process(es)"
    with _sharded_stage(sample, peers, state, message, merge_answers) as (shard, shards):
        sample_responses(
            *policy(),
            rows,
            shards / f"responses.{shard[0]}-of-{shard[1]}.jsonl",
            batch_size=script_args.sample_batch_size,
            max_new_tokens=training_args.max_new_tokens,
            temperature=training_args.temperature,
            top_p=training_args.top_p,
            top_k=training_args.top_k,
            seed=training_args.seed,
            show_progress=state.is_local_main_process,
            shard=shard,
            before_batch=peers.check,
        )


def _targets(targets: Stage, sample: Stage, script_args, state, peers) -> None:
    """Stage 2: the target writer on the main process; the others wait."""
    if state.is_main_process:
        started = targets.start()
        answered = load_rows(sample.root / "responses.jsonl")
        if script_args.writer_model:
            writer = target_writers.OpenAITargetWriter(
                model=script_args.writer_model,
                base_url=script_args.base_url,
                api_key_env=script_args.api_key_env,
                max_concurrency=script_args.max_concurrency,
                timeout=script_args.request_timeout,
            )
        else:
            writer = target_writers.ReferenceStepWriter(fraction=script_args.step_fraction)
        print(f"[2/6] writing improver targets with {writer.name}", flush=True)
        progress = state.is_local_main_process
        target_writers.write_targets(writer, answered, targets.root / "targets.jsonl", show_progress=progress)
        targets.finish(started, **writer.stats.as_dict())
        peers.signal("targets-done")
    peers.wait("targets-done", [0])
    targets.check()


def _filter(filtered: Stage, targets: Stage, script_args, policy, max_length: int, state, peers) -> None:
    """Stage 3: the perplexity filter, each process scoring its share."""
    from ..data.perplexity import REPORT_FILE, PerplexityFilterConfig, apply_filter, score_targets

    written = load_rows(targets.root / "targets.jsonl")

    def merge_scores():
        scored = _merge_shards(written, filtered.root / "shards", "scores.*.jsonl")
        write_jsonl_atomic(filtered.root / "scores.jsonl", scored.to_list())
        # Offline targets at step_fraction 1 are the references by definition: asked for, so not dropped as copies.
        offline = script_args.writer_model is None
        writes_references = offline and target_writers.ReferenceStepWriter(script_args.step_fraction).writes_references
        config = PerplexityFilterConfig(
            max_ratio=script_args.ppl_max_ratio, drop_reference_copies=not writes_references
        )
        kept, report = apply_filter(scored, filtered.root, config)
        if len(kept) == 0:
            raise ValueError(
                f"The perplexity filter dropped every target ({report['dropped_by_reason']}); see "
                f"{filtered.root / REPORT_FILE}. Raise --ppl_max_ratio or use a stronger target writer."
            )
        return {k: report[k] for k in ("rows", "kept", "dropped", "dropped_by_reason")}

    message = f"[3/6] perplexity filter on {state.num_processes} process(es)"
    with _sharded_stage(filtered, peers, state, message, merge_scores) as (shard, shards):
        score_targets(
            *policy(),
            written,
            shards / f"scores.{shard[0]}-of-{shard[1]}.jsonl",
            # A few rows per forward: the completions' logits over the whole vocabulary are the filter's peak
            # memory (16 rows: about 3 GB for SmolLM2's 49k tokens), and a CPU gains little from larger batches.
            batch_size=min(script_args.sample_batch_size, SCORE_BATCH_ROWS),
            max_length=max_length,
            show_progress=state.is_local_main_process,
            shard=shard,
            before_batch=peers.check,
        )
