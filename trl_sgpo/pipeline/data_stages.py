"""Stages 1-3 of the recipe (sample, targets, filter), one function each, on every process of an ``accelerate launch``.

- ``sample`` and ``filter`` (model-bound): each process answers, then scores, its share of the rows
  (:func:`~trl_sgpo.io.jsonl.shard_order`) into its own file under the stage's ``shards/`` folder, resumed from it
  on a rerun; the main process merges the shares into the stage's output.
- ``targets`` (network-bound: one client keeps ``max_concurrency`` requests in flight): the main process only.

The processes meet through files in the run's folder (:class:`~trl_sgpo.io.peers.Peers`): a process that fails
makes the others raise :class:`~trl_sgpo.io.peers.PeerFailedError` with its error within seconds.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import Dataset

from ..data import target_writers
from ..io.jsonl import ROW_ID, ensure_row_ids, load_rows, read_jsonl, rows_in_order, write_jsonl_atomic
from ..io.peers import Peers
from .fingerprints import SAMPLING_SETTINGS
from .stages import Stage, StageOutput, run_stage


if TYPE_CHECKING:
    from .run import Run


SCORE_BATCH_ROWS = 4
"""Most rows the perplexity filter scores per forward pass (each row: the response and the target)."""


@dataclass
class DataRun:
    """What stages 1-3 share: the run, the processes' handshake, the improver rows and the policy, loaded once."""

    run: Run
    peers: Peers
    rows: Dataset
    loaded: tuple[Any, Any] | None = None

    def policy(self) -> tuple[Any, Any]:
        """The policy and its tokenizer on this process's device."""
        if self.loaded is None:
            model, tokenizer = self.run.load(self.run.model_name)
            self.loaded = (model.to(self.run.state.device), tokenizer)
        return self.loaded


@contextmanager
def data_stages(run: Run) -> Iterator[DataRun]:
    """Around stages 1-3 (the ``with`` block): an error on one process stops the others with it, and the policy is
    freed afterwards, before improver SFT loads its own."""
    data = DataRun(run, Peers(run.out / ".sync", run.state), ensure_row_ids(run.rows.improver))
    try:
        with data.peers.guard("the data stages"):
            yield data
    finally:
        data.loaded = None
        gc.collect()


def sample(data: DataRun) -> StageOutput:
    """Stage 1: the policy's answers to the improver prompts, each process its share."""
    from ..data import sampling

    run, rows, args = data.run, data.rows, data.run.training_args
    sampling_settings = {name: getattr(args, name) for name in SAMPLING_SETTINGS}
    stage = Stage(run.folder("sample"), "sample", {**run.settings("sample"), **sampling_settings})

    def merge_answers():
        answered = _merge_shards(rows, stage.root / "shards", "responses.*.jsonl")
        write_jsonl_atomic(stage.root / "responses.jsonl", answered.to_list())
        finished = sum(answered["response_finished"]) if len(answered) else 0
        return {"rows": len(answered), "finished": finished, "finished_frac": finished / max(1, len(answered))}

    message = f"[1/6] sampling the policy's answers to {len(rows)} prompts on {run.state.num_processes} process(es)"
    with run_stage(stage, run.state, message, data.peers, merge_answers) as todo:
        if todo is not None:  # not finished yet
            sampling.sample_responses(
                *data.policy(),
                rows,
                _share_file(stage, data.peers, "responses"),
                batch_size=run.script_args.sample_batch_size,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                show_progress=run.state.is_local_main_process,
                shard=(data.peers.index, data.peers.count),
                before_batch=data.peers.check,
            )
    return StageOutput("sample", stage.summary, stage)


def write_targets(data: DataRun, sampled: StageOutput) -> StageOutput:
    """Stage 2: the target writer edits each answer toward its reference, on the main process; the others wait."""
    run, script_args = data.run, data.run.script_args
    writer_kind = "openai" if script_args.writer_model else "reference-step"
    settings = {**run.settings("targets"), "writer": writer_kind}
    stage = Stage(run.folder("targets"), "targets", settings, after=sampled.stage)
    writer_name = script_args.writer_model or f"the offline writer (step_fraction {script_args.step_fraction:g})"
    with run_stage(stage, run.state, f"[2/6] writing improver targets with {writer_name}", data.peers) as todo:
        if todo is not None and run.state.is_main_process:  # not finished yet
            answered = load_rows(sampled.stage.root / "responses.jsonl")
            writer = _target_writer(script_args)
            progress = run.state.is_local_main_process
            target_writers.write_targets(writer, answered, stage.root / "targets.jsonl", show_progress=progress)
            todo.update(writer.stats.as_dict())
    return StageOutput("targets", stage.summary, stage)


def _target_writer(script_args) -> target_writers.TargetWriter:
    """The OpenAI-compatible writer at ``--base_url`` when ``--writer_model`` is set, else the offline one."""
    if not script_args.writer_model:
        return target_writers.ReferenceStepWriter(fraction=script_args.step_fraction)
    return target_writers.OpenAITargetWriter(
        model=script_args.writer_model,
        base_url=script_args.base_url,
        api_key_env=script_args.api_key_env,
        max_concurrency=script_args.max_concurrency,
        timeout=script_args.request_timeout,
    )


def perplexity_filter(data: DataRun, written: StageOutput) -> StageOutput:
    """Stage 3: the perplexity filter keeps the targets close to the policy's distribution, each process scoring its
    share; its output ``improver_sft.jsonl`` is improver SFT's data."""
    from ..data.perplexity import score_targets

    run, script_args = data.run, data.run.script_args
    stage = Stage(run.folder("filter"), "filter", run.settings("filter"), after=written.stage)

    def merge_scores():
        return _apply_filter(stage, targets, script_args)  # `targets`: read in the block, which runs first

    message = f"[3/6] perplexity filter on {run.state.num_processes} process(es)"
    with run_stage(stage, run.state, message, data.peers, merge_scores) as todo:
        if todo is not None:  # not finished yet
            targets = load_rows(written.stage.root / "targets.jsonl")
            score_targets(
                *data.policy(),
                targets,
                _share_file(stage, data.peers, "scores"),
                # A few rows per forward: the completions' logits over the whole vocabulary are the filter's peak
                # memory (16 rows: about 3 GB for SmolLM2's 49k tokens), and a CPU gains little from larger batches.
                batch_size=min(script_args.sample_batch_size, SCORE_BATCH_ROWS),
                max_length=script_args.improver_sft["max_length"],
                show_progress=run.state.is_local_main_process,
                shard=(data.peers.index, data.peers.count),
                before_batch=data.peers.check,
            )
    return StageOutput("filter", stage.summary, stage)


def _apply_filter(stage: Stage, targets: Dataset, script_args) -> dict[str, Any]:
    """Merge every share's scores of ``targets``, keep the targets that pass, and return the stage's summary."""
    from ..data.perplexity import REPORT_FILE, PerplexityFilterConfig, apply_filter

    scored = _merge_shards(targets, stage.root / "shards", "scores.*.jsonl")
    write_jsonl_atomic(stage.root / "scores.jsonl", scored.to_list())
    # Offline targets at step_fraction 1 are the references by definition: asked for, so not dropped as copies.
    offline = script_args.writer_model is None
    writes_references = offline and target_writers.ReferenceStepWriter(script_args.step_fraction).writes_references
    config = PerplexityFilterConfig(max_ratio=script_args.ppl_max_ratio, drop_reference_copies=not writes_references)
    kept, report = apply_filter(scored, stage.root, config)
    if len(kept) == 0:
        raise ValueError(
            f"The perplexity filter dropped every target ({report['dropped_by_reason']}); see "
            f"{stage.root / REPORT_FILE}. Raise --ppl_max_ratio or use a stronger target writer."
        )
    return {k: report[k] for k in ("rows", "kept", "dropped", "dropped_by_reason")}


def _merge_shards(rows: Dataset, shards: Path, pattern: str) -> Dataset:
    """Every share's rows (of any process count, first copy wins), in the order of ``rows``."""
    done: dict[str, dict[str, Any]] = {}
    for path in sorted(shards.glob(pattern)):
        for row in read_jsonl(path):
            done.setdefault(row[ROW_ID], row)
    return rows_in_order(rows, done)


def _share_file(stage: Stage, peers: Peers, name: str) -> Path:
    """This process's file of the stage's rows, under the stage's ``shards/`` folder (resumed from on a rerun)."""
    shards = stage.root / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    return shards / f"{name}.{peers.index}-of-{peers.count}.jsonl"
