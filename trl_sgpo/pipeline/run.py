"""The whole pipeline, stage by stage: the library behind ``recipes/sgpo.py``.

1. ``sample``: the policy answers the improver prompts (``prompt`` + ``reference`` rows).
2. ``targets``: an external OpenAI-compatible LLM (``--base_url``/``--writer_model``), or the offline writer, edits
   each answer one step toward its reference.
3. ``filter``: the perplexity filter keeps targets close to the policy's distribution.
4. ``improver_sft``: :class:`~trl_sgpo.ImproverSFTTrainer` teaches the improver role.
5. rounds of the method (``--method``, SGPO by default; :mod:`trl_sgpo.pipeline.methods`), ``iterations`` of them,
   each starting from the last round's model. Methods other than SGPO skip stages 1-4.
6. evaluation on held-out prompts (:mod:`trl_sgpo.pipeline.evaluation_stage`), then the final model and its card in
   ``<output_dir>``, and with ``--push_to_hub`` upload them; the items every round trained on go to
   ``<output_dir>/items/`` and, when pushing, to the dataset ``<model repo>-items`` (:mod:`.items_dataset`).

Every stage writes into ``<output_dir>/stages/<nn>_<stage>/`` and is skipped when it finished with the same settings,
resumed when it was interrupted, and refused when the folder holds a run with other settings (:mod:`.stages`,
:mod:`.fingerprints`). Each stage's settings include those of the stage it is made from, and a stage whose predecessor
was redone is redone. Under ``accelerate launch`` stages 1 and 3 shard their rows over every process and stage 2 runs
on the main process (:mod:`.data_stages`); the trainers use every process.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import PartialState
from datasets import Dataset, load_dataset
from huggingface_hub import HfApi
from transformers.trainer_utils import get_last_checkpoint

from ..data.checks import check_columns, check_non_empty, load_default_dataset
from ..data.splits import split_held_out
from ..io.jsonl import load_rows, stable_hash
from ..models import DEFAULT_MODEL, HUB_ID, load_model_and_tokenizer
from ..templates import save_improver_template
from ..trainers.improver_sft_config import ImproverSFTConfig
from ..trainers.improver_sft_trainer import ImproverSFTTrainer
from ..trainers.sgpo_config import SGPOConfig
from ..utils import set_cpu_threads
from .data_stages import data_stages, perplexity_filter, sample, write_targets
from .evaluation_stage import EvaluationArguments, EvaluationOutput, run_evaluation_stage
from .fingerprints import fingerprint, model_fingerprint, script_fingerprint
from .items_dataset import collect_items, push_items
from .memory import TrimHeapCallback, limit_heap_fragmentation
from .methods import Method, MethodArguments, get_method, method_prompts, round_figures
from .stages import TRAINING_STAGES, Stage, StageOutput, run_stage, stage_folder


logger = logging.getLogger(__name__)


IMPROVER_SFT_DEFAULTS = {
    "num_train_epochs": 2.0,
    "learning_rate": 1e-5,
    "per_device_train_batch_size": 2,
    # An optimizer step sees batch size x this x processes rows: small batches bound the memory the logits over the
    # vocabulary take.
    "gradient_accumulation_steps": 4,
    "max_length": 768,
}
"""The recipe's improver-SFT settings where its ``improver_sft`` section leaves them unset."""

RUN_WIDE = (
    "seed",
    "optim",
    "bf16",
    "fp16",
    "use_cpu",
    "activation_checkpointing",
    "logging_steps",
    "report_to",
    "project",
    "save_steps",
    "save_total_limit",
    "disable_tqdm",
    "dataloader_num_workers",
)
"""Training arguments improver SFT shares with the method's rounds unless its ``improver_sft`` section sets them."""

SET_BY_THE_PIPELINE = {
    "output_dir": "the stage folder under --output_dir",
    "run_name": "--run_name",
    "improver_instruction": "--improver_instruction, which SGPO's improver uses too",
    "push_to_hub": "--push_to_hub",
}


@dataclass
class SGPOScriptArguments(EvaluationArguments):
    """Arguments of ``recipes/sgpo.py`` beyond the training ones (``SGPOConfig``) and the model ones (``ModelConfig``).

    The defaults are the library's; the recipe's demo sets its own in ``recipes/configs/sgpo_smollm2.yaml``.
    """

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Prompt/reference data: a JSONL or JSON file, a `save_to_disk` folder or a Hub dataset id, with "
            "columns `prompt` and `reference`. Default: the set shipped with trl-sgpo."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to read."})
    reference_column: str = field(
        default="reference",
        metadata={
            "help": "Column holding each row's reference: a string, or chat messages whose last assistant message is "
            "the reference (e.g. `chosen` of HuggingFaceH4/ultrafeedback_binarized). Read into `reference`."
        },
    )
    num_improver_prompts: int | None = field(
        default=64,
        metadata={
            "help": "Rows used to build improver-SFT data (stages 1-3), from the rows not held out for evaluation; "
            "None: all of them."
        },
    )
    num_sgpo_prompts: int | None = field(
        default=32,
        metadata={
            "help": "Prompts for the method (stage 5: SGPO, SPPO, SSO or online DPO), taken after the improver rows and wrapping around into them when "
            "too few are left; None: every row not held out."
        },
    )
    improver_data: str | None = field(
        default=None,
        metadata={
            "help": "A ready improver-SFT dataset (`prompt`, `response`, `target`; JSONL or `save_to_disk` folder). "
            "Skips stages 1-3."
        },
    )
    skip_improver_sft: bool = field(
        default=False, metadata={"help": "Skip stages 1-4: the model improves its answers without improver SFT."}
    )
    stop_after: str | None = field(
        default=None,
        metadata={
            "help": f"Stop after this stage, one of {TRAINING_STAGES}; `sgpo`: after the last round of any method, "
            "without the evaluation (the final model is still saved to output_dir, and pushed with --push_to_hub).",
            "choices": list(TRAINING_STAGES),
        },
    )
    iterations: int = field(default=1, metadata={"help": "Rounds of SGPO, each starting from the last round's model."})
    limit_heap_fragmentation: bool = field(
        default=True,
        metadata={
            "help": "Linux/glibc: fix malloc's mmap threshold at 8 MB and trim the heap after each optimizer step, "
            "which bounds the resident peak of CPU training (see trl_sgpo/pipeline/memory.py). Skipped when "
            "MALLOC_MMAP_THRESHOLD_ or GLIBC_TUNABLES is set."
        },
    )
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads for torch when there is no GPU (default: the available cores, shared among the "
            "local processes; `accelerate launch` would otherwise pin 1)."
        },
    )
    # stage 1
    sample_batch_size: int = field(default=16, metadata={"help": "Prompts per generate call when sampling answers."})
    # stage 2
    base_url: str | None = field(
        default=None,
        metadata={"help": "OpenAI-compatible endpoint for the target writer, e.g. http://localhost:8000/v1."},
    )
    writer_model: str | None = field(
        default=None,
        metadata={
            "help": "Target writer: the model name at `base_url` (or at api.openai.com when `base_url` is unset). "
            "Unset: the offline writer (`step_fraction`)."
        },
    )
    api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "Environment variable holding the endpoint's API key."}
    )
    max_concurrency: int = field(
        default=32, metadata={"help": "Most requests in flight at once (target writer, OpenAI judge)."}
    )
    request_timeout: float = field(
        default=120.0, metadata={"help": "Seconds one request may take (target writer, OpenAI judge)."}
    )
    step_fraction: float = field(
        default=0.5,
        metadata={
            "help": "Without `writer_model`, targets are the policy's answers moved this share of the sentence edits "
            "toward the reference (the offline writer, at most 3 edits); 1 makes the reference itself the target "
            "(the filter then keeps reference copies)."
        },
    )
    # stage 3
    ppl_max_ratio: float = field(
        default=3.0,
        metadata={"help": "Keep a target when its perplexity is at most this times the answer's own perplexity."},
    )
    # stage 4
    improver_sft: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Improver SFT's settings: any `ImproverSFTConfig` (TRL `SFTConfig`) field, as a YAML mapping under "
            "`improver_sft:` or a JSON object on the command line, which changes the keys it names. Unset keys: "
            f"{IMPROVER_SFT_DEFAULTS}, and {list(RUN_WIDE)} from the training arguments. `max_length` also bounds "
            "the rows the perplexity filter scores."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_improver_prompts", "num_sgpo_prompts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1, or None for every row not held out; got {value}.")
        self.improver_sft = {**IMPROVER_SFT_DEFAULTS, **_improver_sft_section(self.improver_sft)}
        if self.base_url and not self.writer_model:
            raise ValueError("`--base_url` needs `--writer_model` (the model name at that endpoint).")
        # A --config YAML sets defaults, which argparse does not check against `choices`.
        if self.stop_after is not None and self.stop_after not in TRAINING_STAGES:
            raise ValueError(f"`stop_after` must be one of {TRAINING_STAGES}, got {self.stop_after!r}.")
        skipped = {}
        if self.skip_improver_sft:
            skipped = dict.fromkeys(("sample", "targets", "filter", "improver_sft"), "--skip_improver_sft")
        elif self.improver_data is not None:
            skipped = dict.fromkeys(("sample", "targets", "filter"), "--improver_data")
        if self.stop_after in skipped:
            runs = [s for s in TRAINING_STAGES if s not in skipped]
            raise ValueError(
                f"`--stop_after {self.stop_after}` names a stage that `{skipped[self.stop_after]}` skips, so the run "
                f"would never stop there. Stop after one of {runs}, or drop `{skipped[self.stop_after]}`."
            )


def _improver_sft_section(value: dict[str, Any] | str | None) -> dict[str, Any]:
    """The ``improver_sft`` section as a mapping, its keys checked against ``ImproverSFTConfig``."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"`improver_sft` must be a JSON object of ImproverSFTConfig fields: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"`improver_sft` must map ImproverSFTConfig fields to values, got {value!r}.")
    names = [f.name for f in dataclasses.fields(ImproverSFTConfig) if f.init]
    for key in value:
        if key in SET_BY_THE_PIPELINE:
            raise ValueError(f"`improver_sft` may not set `{key}`: it comes from {SET_BY_THE_PIPELINE[key]}.")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise ValueError(f"`improver_sft` has `{key}`{hint}, which is no ImproverSFTConfig field.")
    return dict(value)


@dataclass
class Rows:
    """The dataset, split before anything trains: held-out rows first, then improver and method rows."""

    total: int
    held_out: Dataset | None
    improver: Dataset
    prompts: Dataset  # the method rounds' prompts


@dataclass
class Run:
    """What the stages of one run share: its arguments, method, process state and model loading."""

    script_args: SGPOScriptArguments
    training_args: SGPOConfig
    model_args: Any
    method: Method
    state: PartialState
    heap: bool  # whether the trainers trim the heap after each step (see memory.py)
    rows: Rows

    @property
    def model_name(self) -> str:
        return self.model_args.model_name_or_path or DEFAULT_MODEL

    @property
    def out(self) -> Path:
        return Path(self.training_args.output_dir)

    def folder(self, stage: str, **fields) -> Path:
        return self.out / "stages" / stage_folder(stage, **fields)

    def load(self, path: str):
        kwargs = {
            "revision": self.model_args.model_revision,
            "trust_remote_code": self.training_args.trust_remote_code,
        }
        if self.model_args.dtype not in (None, "auto"):
            import torch

            kwargs["dtype"] = getattr(torch, self.model_args.dtype)
        model, tokenizer = load_model_and_tokenizer(path, **kwargs)
        # Stage outputs are local folders; cards and pushes should name the model the run started from.
        model.config._name_or_path = HUB_ID if self.model_name == DEFAULT_MODEL else self.model_name
        return model, tokenizer

    def load_base(self, path: str):
        # LoRA runs merge each stage's adapter into the model it was trained on; plain runs need no base.
        return (lambda: self.load(path)[0]) if self.model_args.use_peft else None

    def stops_after(self, output: StageOutput) -> bool:
        """Whether ``--stop_after`` names the stage that handed on ``output``."""
        return self.script_args.stop_after == output.key

    def callbacks(self) -> list:
        return [TrimHeapCallback()] if self.heap else []

    def settings(self, stage: str, config=None, prefix: str = "") -> dict[str, Any]:
        """What ``stage``'s output depends on (see fingerprints.py): recorded in its stage.json, compared on rerun."""
        return {
            **model_fingerprint(self.model_args, self.model_name, with_lora=stage in ("improver_sft", "sgpo")),
            **script_fingerprint(self.script_args, stage),
            "data": self.script_args.dataset_name or "trl-sgpo default prompts",
            "improver_rows": len(self.rows.improver),
            **({} if config is None else fingerprint(config, prefix)),
        }


def run_pipeline(
    script_args: SGPOScriptArguments,
    training_args: SGPOConfig,
    model_args,
    method_args: MethodArguments | None = None,
    judge=None,
) -> dict[str, Any]:
    """Run the stages in order and return the summary (also written to ``<output_dir>/sgpo_summary.json``).

    ``method_args`` picks the training method of stage 5 (default SGPO), see :mod:`trl_sgpo.pipeline.methods`;
    ``judge`` (a judge object) replaces the one ``method_args`` names.
    """
    method_args = method_args or MethodArguments()
    run = prepare_run(script_args, training_args, model_args, method_args, judge)
    done: list[StageOutput] = []
    if not run.script_args.skip_improver_sft:
        if run.script_args.improver_data is not None:
            done.append(given_improver_data(run))
        else:
            with data_stages(run) as data:
                done.append(sample(data))
                if not run.stops_after(done[-1]):
                    done.append(write_targets(data, done[-1]))
                if not run.stops_after(done[-1]):
                    done.append(perplexity_filter(data, done[-1]))
        if not run.stops_after(done[-1]):
            done.append(improver_sft(run, done[-1]))
        if run.stops_after(done[-1]):
            return finish(run, done)
    judge = judge if judge is not None else method_args.build_judge(run.script_args)
    last = done[-1] if done else StageOutput("start", {}, model=run.model_name)
    for iteration in range(1, run.script_args.iterations + 1):
        last = method_round(run, method_args, judge, iteration, last)
        done.append(last)
    # --stop_after sgpo: no evaluation, the final model still published. (`sgpo` names the rounds of any method; their
    # keys carry the method's name, so `run.stops_after` cannot match it.)
    evaluated = EvaluationOutput() if run.script_args.stop_after == "sgpo" else evaluation(run, done[-1].stage)
    rounds = [output.stage.root for output in done if output.key.startswith(f"{run.method.name}_iter")]
    return finish(run, done, evaluated, publish(run, done[-1].model, evaluated.files, rounds))


def prepare_run(script_args, training_args, model_args, method_args: MethodArguments, judge) -> Run:
    """The run's method, threads, heap setting and rows, checked before any model loads."""
    state = PartialState()
    method = get_method(method_args.method)
    method.refuse_unused_settings(training_args)
    # Methods other than SGPO train without an improver: the improver stages are skipped, and say so.
    if not method.needs_improver_sft and not script_args.skip_improver_sft:
        if state.is_main_process:
            print(f"{method.title} needs no improver: skipping stages sample, targets, filter and improver_sft")
        script_args = dataclasses.replace(script_args, skip_improver_sft=True)
    set_cpu_threads(script_args.num_threads)
    heap = bool(script_args.limit_heap_fragmentation and limit_heap_fragmentation())  # see memory.py
    rows = split_rows(script_args, training_args.seed)
    if judge is None and method_args.judge == "similarity" and "reference" not in rows.prompts.column_names:
        # Found now rather than at the first training step, after the improver stages.
        raise ValueError(
            "--judge similarity scores answers against each row's `reference`, and the dataset has no `reference` "
            "column. Add references, pick another judge (--judge reward-model / openai), or pass --judge none."
        )
    return Run(script_args, training_args, model_args, method, state, heap, rows)


def split_rows(script_args: SGPOScriptArguments, seed: int) -> Rows:
    """Load the rows and split them; bad columns fail here, before any model is loaded."""
    dataset = load_dataset_rows(script_args)
    hint = " (rename yours with `dataset.rename_column`)"
    check_columns(dataset, ("prompt",), "dataset", hint)
    train_rows, eval_rows = _hold_out(dataset, script_args.num_eval_prompts, seed)
    if script_args.num_eval_prompts and eval_rows is None:
        logger.warning(
            "No held-out evaluation: the dataset has %d rows, fewer than twice --num_eval_prompts %d. All rows train.",
            len(dataset),
            script_args.num_eval_prompts,
        )
    improver_rows, method_rows = _split(train_rows, script_args, seed)
    check_non_empty(method_rows, ("prompt",), "dataset")
    if not script_args.skip_improver_sft and script_args.improver_data is None:
        check_columns(improver_rows, ("prompt", "reference"), "dataset", hint)  # the target writer edits toward it
    return Rows(len(dataset), eval_rows, improver_rows, method_rows)


def load_dataset_rows(script_args: SGPOScriptArguments) -> Dataset:
    """The prompt/reference rows the recipes train and evaluate on: ``--dataset_name`` (the shipped set when unset),
    with ``--reference_column`` read into ``reference``."""
    name = script_args.dataset_name
    if name is None:
        dataset = load_default_dataset()
    elif Path(name).exists():
        dataset = load_rows(Path(name))
    else:
        dataset = load_dataset(name, script_args.dataset_config, split=script_args.dataset_split)
    return _with_reference(dataset, script_args.reference_column)


def _with_reference(dataset: Dataset, column: str) -> Dataset:
    """``dataset`` with ``column`` read into ``reference``: a string as is, chat messages as their last assistant
    message."""
    if column == "reference":
        return dataset
    if column not in dataset.column_names:
        raise ValueError(
            f"--reference_column {column!r}: the dataset has no such column (it has {dataset.column_names})."
        )

    def reference(value, row: int) -> str:
        if isinstance(value, str):
            return value
        replies = [m["content"] for m in value or [] if m.get("role") == "assistant"]
        if not replies:
            raise ValueError(
                f"--reference_column {column!r}: row {row} holds neither a string nor an assistant message."
            )
        return replies[-1]

    references = [reference(value, i) for i, value in enumerate(dataset[column])]
    if "reference" in dataset.column_names:
        dataset = dataset.remove_columns("reference")
    return dataset.add_column("reference", references)


def _hold_out(dataset: Dataset, n: int, seed: int) -> tuple[Dataset, Dataset | None]:
    """``(rows to train on, held-out rows or None)``: the evaluation's ``n`` rows are drawn before anything trains.
    None (evaluation skipped) when that would leave fewer rows to train on than it holds out."""
    if n and len(dataset) >= 2 * n:
        return split_held_out(dataset, n, seed)
    return dataset, None


def _split(dataset: Dataset, script_args: SGPOScriptArguments, seed: int) -> tuple[Dataset, Dataset]:
    """``(improver_rows, sgpo_rows)`` of the rows to train on.

    The improver rows are the first ``num_improver_prompts``; SGPO's prompts come after them and wrap around into the
    improver rows when too few are left: SGPO writes fresh answers, so a prompt shared with improver SFT shares no
    training text.
    """
    # Shuffled first, so both parts mix the categories of a dataset stored in order.
    dataset = dataset.shuffle(seed=seed)
    n = len(dataset)
    n_improver = n if script_args.num_improver_prompts is None else min(script_args.num_improver_prompts, n)
    n_sgpo = n if script_args.num_sgpo_prompts is None else min(script_args.num_sgpo_prompts, n)
    if n_sgpo > n - n_improver:
        logger.info(
            "SGPO reuses %d improver-SFT prompts (%d rows left after them).", n_sgpo - (n - n_improver), n - n_improver
        )
    order = [*range(n_improver, n), *range(n_improver)]  # rows no improver prompt used first
    return dataset.select(range(n_improver)), dataset.select(order[:n_sgpo])


def given_improver_data(run: Run) -> StageOutput:
    """``--improver_data``: the ready improver-SFT rows that stand in for stages 1-3."""
    rows = load_rows(run.script_args.improver_data)
    return StageOutput("improver_data", {"rows": len(rows), "source": run.script_args.improver_data})


def improver_sft_config(script_args, training_args, output_dir: Path) -> ImproverSFTConfig:
    """Improver SFT's config: the run-wide training arguments, then the recipe's ``improver_sft`` section."""
    return ImproverSFTConfig(
        **{
            **{name: getattr(training_args, name) for name in RUN_WIDE},
            "save_strategy": "steps",
            **script_args.improver_sft,
            "output_dir": str(output_dir),
            "improver_instruction": training_args.improver_instruction,
            "run_name": _run_name(training_args, "improver_sft"),
        }
    )


def improver_sft(run: Run, data: StageOutput) -> StageOutput:
    """Stage 4: teach the model the improver role on the filtered targets (or ``--improver_data``)."""
    from trl import get_peft_config

    source = run.script_args.improver_data or data.stage.root / "improver_sft"
    rows = load_rows(source)
    args = improver_sft_config(run.script_args, run.training_args, run.folder("improver_sft"))
    settings = {**run.settings("improver_sft", args, "improver_sft."), "improver_data_rows": len(rows)}
    stage = Stage(run.folder("improver_sft"), "improver_sft", settings, after=data.stage)
    with run_stage(stage, run.state, f"[4/6] improver SFT on {len(rows)} rows") as todo:
        if todo is not None:  # not finished yet
            model, tokenizer = run.load(run.model_name)
            trainer = ImproverSFTTrainer(
                model,
                args=args,
                train_dataset=rows,
                processing_class=tokenizer,
                peft_config=get_peft_config(run.model_args),
                callbacks=run.callbacks() or None,
            )
            _train_and_save(trainer, tokenizer, stage.root, run.state, run.load_base(run.model_name))
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            todo.update(
                rows=len(trainer.train_dataset),
                first_loss=losses[0] if losses else None,
                last_loss=losses[-1] if losses else None,
            )
            del trainer, model  # the model holds reference cycles: freed (run_stage collects) before the next loads
    return StageOutput("improver_sft", stage.summary, stage, str(stage.root / "model"))


def method_settings(run: Run, method_args: MethodArguments) -> dict[str, Any]:
    """The method's settings in the rounds' fingerprints: only when set, so that plain SGPO runs keep theirs."""
    settings = {"method": run.method.name, "method_args": method_args.parsed_method_args(), "judge": method_args.judge}
    settings = {k: v for k, v in settings.items() if v}
    if settings == {"method": "sgpo", "judge": "none"}:
        return {}
    if method_args.judge != "none":  # the judge's own settings change which items train
        settings.update(
            reward_model=method_args.reward_model, similarity_temperature=method_args.similarity_temperature
        )
    return settings


def method_round(run: Run, method_args: MethodArguments, judge, iteration: int, last: StageOutput) -> StageOutput:
    """Stage 5: one round of the method, made from ``last``'s model (the previous round's, so the reference
    re-anchors)."""
    from trl import get_peft_config

    method, training_args, iterations = run.method, run.training_args, run.script_args.iterations
    rows = method_prompts(method, run.rows.prompts, iteration, iterations)
    settings = {
        **run.settings("sgpo", training_args),
        "start": run.model_name if run.script_args.skip_improver_sft else "improver_sft",
        # The round's own prompts: SPPO deals disjoint shares over `iterations`, so they depend on it.
        "prompts": stable_hash(list(rows["prompt"])),
        **method_settings(run, method_args),
    }
    root = run.folder("sgpo", method=method.name, iteration=iteration)
    stage = Stage(root, f"{method.name} iteration {iteration}", settings, after=last.stage)
    message = f"[5/6] {method.name} iteration {iteration}/{iterations} on {len(rows)} prompts"
    with run_stage(stage, run.state, message) as todo:
        if todo is not None:  # not finished yet
            model, tokenizer = run.load(last.model)
            args = method.make_config(
                training_args,
                method_args.parsed_method_args(),
                output_dir=str(stage.root),
                push_to_hub=False,
                run_name=_run_name(training_args, f"{method.name}_iter{iteration}"),
            )
            columns = ["prompt"] + (["reference"] if judge is not None and "reference" in rows.column_names else [])
            peft_config = get_peft_config(run.model_args)
            trainer = method.build_trainer(model, tokenizer, args, rows.select_columns(columns), peft_config, judge)
            for callback in run.callbacks():
                trainer.add_callback(callback)
            _train_and_save(trainer, tokenizer, stage.root, run.state, run.load_base(last.model))
            if run.state.is_main_process:
                # The card is written now, while the trainer holds the figures; `_push` uploads it as it is.
                trainer.hub_model_id = training_args.hub_model_id or run.out.name
                trainer.create_model_card(model_name=run.out.name, dataset_name=run.script_args.dataset_name)
                todo.update(round_figures(trainer))
            del trainer, model  # freed (run_stage collects) before the next round loads its own
    return StageOutput(f"{method.name}_iter{iteration}", stage.summary, stage, str(stage.root / "model"))


def evaluation(run: Run, last: Stage | None) -> EvaluationOutput:
    """Stage 6: win rates on held-out prompts; adds a section to the final card and files under
    output_dir/evaluation. A dataset may repeat a prompt in several rows, and a given --improver_data was trained on
    too: any held-out row whose prompt training used is left out."""
    trained = [run.rows.improver, run.rows.prompts]
    if run.script_args.improver_data is not None:
        trained.append(load_rows(run.script_args.improver_data))
    stages_dir = run.out / "stages"
    return run_evaluation_stage(
        run.script_args,
        run.training_args,
        run.rows.held_out,
        trained,
        run.rows.total,
        run.model_name,
        stages_dir,
        run.state,
        last,
        method=run.method.name,
    )


def publish(run: Run, final_model: str, eval_files: list[str], rounds: list[Path]) -> dict[str, Any]:
    """The final model and its card in output_dir, and on the Hub: the summary's ``saved_to`` (and ``pushed_to``).
    The items each round (folders ``rounds``) trained on are joined in ``<output_dir>/items/``, and pushed as a
    dataset beside the model."""
    out, final_dir = run.out, Path(final_model)
    card = final_dir.parent / "README.md"
    files = sorted(item.name for item in final_dir.iterdir()) + (["README.md"] if card.is_file() else [])
    files += eval_files
    published = {"saved_to": str(out)}
    if run.state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for item in final_dir.iterdir():
            shutil.copy2(item, out / item.name)
        if card.is_file():
            shutil.copy2(card, out / "README.md")
        args = run.training_args
        items = collect_items(out, rounds, run.method.name, args.hub_model_id or out.name)
        if items is not None:
            published["items"] = str(items / "items.jsonl")
        if args.push_to_hub:
            published["pushed_to"], published["push_commit"] = _push(out, files, args)
            if items is not None:  # the items each round trained on, as a dataset beside the model
                published["items_pushed_to"] = push_items(hub_api(), published["pushed_to"], items, args)
    run.state.wait_for_everyone()
    return published


def make_summary(
    run: Run,
    done: list[StageOutput],
    evaluated: EvaluationOutput | None = None,
    published: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's summary, from what its stages returned."""
    evaluated = evaluated or EvaluationOutput()
    stages = {output.key: output.summary for output in done}
    if evaluated.summary is not None:
        stages["evaluation"] = evaluated.summary
    summary = {"model": run.model_name, "output_dir": str(run.out), "heap_fragmentation_limited": run.heap}
    summary["stages"] = stages
    if evaluated.section is not None:
        summary["evaluation"] = evaluated.section
    return {**summary, **(published or {})}


def finish(
    run: Run,
    done: list[StageOutput],
    evaluated: EvaluationOutput | None = None,
    published: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the summary (:func:`make_summary`) to ``<output_dir>/sgpo_summary.json`` and return it."""
    summary = make_summary(run, done, evaluated, published)
    if run.state.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
        with open(run.out / "sgpo_summary.json", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, default=str)
    return summary


def _run_name(training_args: SGPOConfig, stage: str) -> str:
    """The name a stage's trainer logs under (trackio, wandb, ...): ``<run_name or output_dir name>-<stage>``, so that
    the trainers of one recipe run are told apart and grouped."""
    return f"{training_args.run_name or Path(training_args.output_dir).name}-{stage}"


def hub_api() -> HfApi:
    """The Hub client of `_push` (a function, so that tests can replace it)."""
    return HfApi()


def _push(out: Path, files: list[str], args: SGPOConfig) -> tuple[str, str]:
    """Upload ``files`` (the final model and its card) from ``out`` to ``args.hub_model_id``; not the stage folders."""
    api = hub_api()
    repo_id = api.create_repo(
        args.hub_model_id or out.name, token=args.hub_token, private=args.hub_private_repo, exist_ok=True
    ).repo_id
    card = out / "README.md"
    if card.is_file():
        # The card was written when the round trained, before the repo existed: name the repo as created (a bare
        # `hub_model_id` gains the user's namespace, and a later push may choose another id).
        text = card.read_text(encoding="utf-8")
        card.write_text(
            re.sub(r'(pipeline\("text-generation", model=")[^"]*"', rf'\g<1>{repo_id}"', text), encoding="utf-8"
        )
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(out),
        allow_patterns=files,
        commit_message="End of training",
        token=args.hub_token,
        revision=args.hub_revision,
    )
    return repo_id, str(getattr(commit, "commit_url", commit))


def _train_and_save(trainer, tokenizer, root: Path, state: PartialState, load_base=None) -> None:
    """Train (resuming from the stage's last checkpoint) and save a plain model to ``root/model``.

    ``load_base`` (LoRA runs) returns the model the adapter was trained on; the adapter, saved to ``root/adapter``, is
    merged into it, since the next stage starts from a plain model and adds its own adapter.
    """
    trainer.train(resume_from_checkpoint=get_last_checkpoint(str(root)))
    # On every rank: under DeepSpeed ZeRO-3 and FSDP this gathers the full weights from all of them. `model_wrapped` is
    # what `get_state_dict` needs there (the DeepSpeed engine, the FSDP module).
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if state.is_main_process:
        model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        if load_base is not None:
            from peft import PeftModel

            # Merged into freshly loaded base weights, not in place: under ZeRO-3/FSDP the local model holds shards.
            model.save_pretrained(root / "adapter", state_dict=state_dict)
            model = PeftModel.from_pretrained(load_base(), root / "adapter").merge_and_unload()
            state_dict = None
        model.save_pretrained(root / "model", state_dict=state_dict)
        tokenizer.save_pretrained(root / "model")
        if getattr(trainer, "improver_template", None) is not None:  # SGPO and improver SFT: the model is an improver
            save_improver_template(trainer, root / "model")  # the next stage and users rebuild the same prompt
    state.wait_for_everyone()
