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
import gc
import json
import logging
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import PartialState
from datasets import Dataset, load_dataset
from huggingface_hub import HfApi
from transformers.trainer_utils import get_last_checkpoint

from ..data.checks import check_columns, check_non_empty, load_default_dataset
from ..data.jsonl import load_rows, stable_hash
from ..models import DEFAULT_MODEL, HUB_ID, load_model_and_tokenizer
from ..templates import save_improver_template
from ..trainers.improver_sft_config import ImproverSFTConfig
from ..trainers.improver_sft_trainer import ImproverSFTTrainer
from ..trainers.sgpo_config import SGPOConfig
from ..utils import set_cpu_threads
from .evaluation_stage import EvaluationArguments, run_evaluation_stage, split_held_out
from .fingerprints import SAMPLING_SETTINGS, fingerprint, model_fingerprint, script_fingerprint
from .items_dataset import collect_items, push_items
from .memory import TrimHeapCallback, limit_heap_fragmentation
from .methods import MethodArguments, get_method, method_prompts, round_figures
from .stages import Stage


logger = logging.getLogger(__name__)

STAGES = ("sample", "targets", "filter", "improver_sft", "sgpo")


@dataclass
class SGPOScriptArguments(EvaluationArguments):
    """Arguments of ``recipes/sgpo.py`` beyond the training ones (``SGPOConfig``) and the model ones (``ModelConfig``).

    The demo's settings (``recipes/sgpo.py``) finish on 2 CPU cores in 16-31 minutes, depending on the machine, with the
    embedded default model.
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
            "help": "Prompts for SGPO (stage 5), taken after the improver rows and wrapping around into them when "
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
        default=None, metadata={"help": f"Stop after this stage, one of {STAGES}.", "choices": list(STAGES)}
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
    target_model: str | None = field(default=None, metadata={"help": "Deprecated alias of `writer_model`."})
    api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "Environment variable holding the endpoint's API key."}
    )
    max_concurrency: int = field(default=32, metadata={"help": "Most target requests in flight at once."})
    request_timeout: float = field(default=120.0, metadata={"help": "Seconds one target request may take."})
    step_fraction: float = field(
        default=0.5,
        metadata={
            "help": "Without `writer_model`, targets are the policy's answers moved this share of the sentence edits "
            "toward the reference (the offline writer, at most 3 edits); 1 makes the reference itself the target "
            "(the filter then keeps reference copies)."
        },
    )
    offline_fraction: float | None = field(default=None, metadata={"help": "Deprecated alias of `step_fraction`."})
    # stage 3
    ppl_max_ratio: float = field(
        default=3.0,
        metadata={"help": "Keep a target when its perplexity is at most this times the answer's own perplexity."},
    )
    # stage 4
    improver_sft_epochs: float = field(default=2.0, metadata={"help": "Epochs of improver SFT."})
    improver_sft_learning_rate: float = field(default=1e-5, metadata={"help": "Learning rate of improver SFT."})
    improver_sft_batch_size: int = field(default=2, metadata={"help": "Per-device batch size of improver SFT."})
    improver_sft_gradient_accumulation_steps: int = field(
        default=4,
        metadata={
            "help": "Batches per optimizer step of improver SFT (an optimizer step sees batch size x this x "
            "processes rows; small batches bound the memory the logits over the vocabulary take)."
        },
    )
    improver_sft_max_length: int = field(default=768, metadata={"help": "Max tokens per improver-SFT row."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_improver_prompts", "num_sgpo_prompts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1, or None for every row not held out; got {value}.")
        for old, new in (("target_model", "writer_model"), ("offline_fraction", "step_fraction")):
            if getattr(self, old) is not None:
                warnings.warn(f"`{old}` is deprecated; use `{new}`.", FutureWarning, stacklevel=2)
                setattr(self, new, getattr(self, old))
                setattr(self, old, None)
        if self.base_url and not self.writer_model:
            raise ValueError("`--base_url` needs `--writer_model` (the model name at that endpoint).")
        # A --config YAML sets defaults, which argparse does not check against `choices`.
        if self.stop_after is not None and self.stop_after not in STAGES:
            raise ValueError(f"`stop_after` must be one of {STAGES}, got {self.stop_after!r}.")
        skipped = {}
        if self.skip_improver_sft:
            skipped = dict.fromkeys(("sample", "targets", "filter", "improver_sft"), "--skip_improver_sft")
        elif self.improver_data is not None:
            skipped = dict.fromkeys(("sample", "targets", "filter"), "--improver_data")
        if self.stop_after in skipped:
            runs = [s for s in STAGES if s not in skipped]
            raise ValueError(
                f"`--stop_after {self.stop_after}` names a stage that `{skipped[self.stop_after]}` skips, so the run "
                f"would never stop there. Stop after one of {runs}, or drop `{skipped[self.stop_after]}`."
            )


def _load_rows(name: str | None, config: str | None, split: str) -> Dataset:
    if name is None:
        return load_default_dataset()
    path = Path(name)
    if path.exists():
        return load_rows(path)
    return load_dataset(name, config, split=split)


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


def _improver_sft_args(training_args: SGPOConfig, script_args: SGPOScriptArguments, output_dir: Path):
    shared = {
        k: getattr(training_args, k)
        for k in (
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
    }
    return ImproverSFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=script_args.improver_sft_epochs,
        learning_rate=script_args.improver_sft_learning_rate,
        per_device_train_batch_size=script_args.improver_sft_batch_size,
        gradient_accumulation_steps=script_args.improver_sft_gradient_accumulation_steps,
        max_length=script_args.improver_sft_max_length,
        improver_instruction=training_args.improver_instruction,
        save_strategy="steps",
        run_name=_run_name(training_args, "improver_sft"),
        **shared,
    )


def _run_name(training_args: SGPOConfig, stage: str) -> str:
    """The name a stage's trainer logs under (trackio, wandb, ...): ``<run_name or output_dir name>-<stage>``, so that
    the trainers of one recipe run are told apart and grouped."""
    return f"{training_args.run_name or Path(training_args.output_dir).name}-{stage}"


def _print(state: PartialState, message: str) -> None:
    if state.is_main_process:
        print(message, flush=True)


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
    from trl import get_peft_config

    state = PartialState()
    # Methods other than SGPO train without an improver: the improver stages are skipped, and say so.
    method_args = method_args or MethodArguments()
    method = get_method(method_args.method)
    if not method.needs_improver_sft and not script_args.skip_improver_sft:
        _print(state, f"{method.title} needs no improver: skipping stages sample, targets, filter and improver_sft")
        script_args = dataclasses.replace(script_args, skip_improver_sft=True)
    set_cpu_threads(script_args.num_threads)
    heap = script_args.limit_heap_fragmentation and limit_heap_fragmentation()  # see memory.py
    out = Path(training_args.output_dir)
    stages_dir = out / "stages"
    model_name = model_args.model_name_or_path or DEFAULT_MODEL
    model_kwargs = {"revision": model_args.model_revision, "trust_remote_code": training_args.trust_remote_code}
    if model_args.dtype not in (None, "auto"):
        import torch

        model_kwargs["dtype"] = getattr(torch, model_args.dtype)
    base_id = HUB_ID if model_name == DEFAULT_MODEL else model_name

    def load(path: str):
        model, tokenizer = load_model_and_tokenizer(path, **model_kwargs)
        # Stage outputs are local folders; cards and pushes should name the model the run started from.
        model.config._name_or_path = base_id
        return model, tokenizer

    summary: dict[str, Any] = {
        "model": model_name,
        "output_dir": str(out),
        "heap_fragmentation_limited": bool(heap),
        "stages": {},
    }
    data_source = script_args.dataset_name or "trl-sgpo default prompts"

    def done(name: str) -> bool:
        return script_args.stop_after == name

    # Data first: bad columns fail before any model is loaded.
    dataset = _load_rows(script_args.dataset_name, script_args.dataset_config, script_args.dataset_split)
    dataset = _with_reference(dataset, script_args.reference_column)
    hint = " (rename yours with `dataset.rename_column`)"
    check_columns(dataset, ("prompt",), "dataset", hint)
    train_rows, eval_rows = _hold_out(dataset, script_args.num_eval_prompts, training_args.seed)
    if script_args.num_eval_prompts and eval_rows is None:
        logger.warning(
            "No held-out evaluation: the dataset has %d rows, fewer than twice --num_eval_prompts %d. All rows train.",
            len(dataset),
            script_args.num_eval_prompts,
        )
    improver_rows, sgpo_rows = _split(train_rows, script_args, training_args.seed)
    check_non_empty(sgpo_rows, ("prompt",), "dataset")
    if not script_args.skip_improver_sft and script_args.improver_data is None:
        check_columns(improver_rows, ("prompt", "reference"), "dataset", hint)  # the target writer edits toward it
    if judge is None and method_args.judge == "similarity" and "reference" not in dataset.column_names:
        # Found now rather than at the first training step, after the improver stages.
        raise ValueError(
            "--judge similarity scores answers against each row's `reference`, and the dataset has no `reference` "
            "column. Add references, pick another judge (--judge reward-model / openai), or pass --judge none."
        )

    def settings(stage: str, config=None, prefix: str = "") -> dict[str, Any]:
        # What the stage's output depends on (see fingerprints.py): recorded in its stage.json, compared on rerun.
        return {
            **model_fingerprint(model_args, model_name, with_lora=stage in ("improver_sft", "sgpo")),
            **script_fingerprint(script_args, stage),
            "data": data_source,
            "improver_rows": len(improver_rows),
            **({} if config is None else fingerprint(config, prefix)),
        }

    def load_base(path: str):
        # LoRA runs merge each stage's adapter into the model it was trained on; plain runs need no base.
        return (lambda: load(path)[0]) if model_args.use_peft else None

    improver_model_path: str | None = None
    last: Stage | None = None  # the stage whose output the next one starts from
    if not script_args.skip_improver_sft:
        if script_args.improver_data is not None:
            improver_data = load_rows(script_args.improver_data)
            summary["stages"]["improver_data"] = {"rows": len(improver_data), "source": script_args.improver_data}
        else:
            last = _data_stages(
                script_args, training_args, settings, load, model_name, improver_rows, stages_dir, summary
            )
            if last is None:  # stopped early
                return _finish(summary, out, state)
            improver_data = load_rows(last.root / "improver_sft")

        sft_args = _improver_sft_args(training_args, script_args, stages_dir / "04_improver_sft")
        stage = Stage(
            stages_dir / "04_improver_sft",
            "improver_sft",
            {**settings("improver_sft", sft_args, "improver_sft."), "improver_data_rows": len(improver_data)},
            after=last,
        )
        if not stage.check():
            started = stage.start() if state.is_main_process else 0.0
            state.wait_for_everyone()
            _print(state, f"[4/5] improver SFT on {len(improver_data)} rows")
            model, tokenizer = load(model_name)
            trainer = ImproverSFTTrainer(
                model,
                args=sft_args,
                train_dataset=improver_data,
                processing_class=tokenizer,
                peft_config=get_peft_config(model_args),
                callbacks=[TrimHeapCallback()] if heap else None,
            )
            _train_and_save(trainer, tokenizer, stage.root, state, load_base(model_name))
            if state.is_main_process:
                losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
                stage.finish(
                    started,
                    rows=len(trainer.train_dataset),
                    first_loss=losses[0] if losses else None,
                    last_loss=losses[-1] if losses else None,
                )
            state.wait_for_everyone()
            stage.check()
            del trainer, model
            gc.collect()  # the model holds reference cycles: free it before SGPO loads the next one
        summary["stages"]["improver_sft"] = stage.summary
        improver_model_path = str(stage.root / "model")
        last = stage
        if done("improver_sft"):
            return _finish(summary, out, state)

    # Stage 5: rounds of the method, each made from the previous round's model (so the reference re-anchors).
    start_model = improver_model_path or model_name
    judge = judge if judge is not None else method_args.build_judge(script_args)
    extra = method_args.parsed_method_args()
    # Recorded only when set, so that plain SGPO runs keep their stage fingerprints.
    method_settings = {
        k: v for k, v in {"method": method.name, "method_args": extra, "judge": method_args.judge}.items() if v
    }
    if method_settings == {"method": "sgpo", "judge": "none"}:
        method_settings = {}
    elif method_args.judge != "none":  # the judge's own settings change which items train
        method_settings.update(
            reward_model=method_args.reward_model, similarity_temperature=method_args.similarity_temperature
        )
    round_dirs = []  # each round's folder, where its trainer wrote items.jsonl
    for iteration in range(1, script_args.iterations + 1):
        rows = method_prompts(method, sgpo_rows, iteration, script_args.iterations)
        stage = Stage(
            stages_dir / f"05_{method.name}_iter{iteration}",
            f"{method.name} iteration {iteration}",
            {
                **settings("sgpo", training_args),
                "start": "improver_sft" if improver_model_path else model_name,
                # The round's own prompts: SPPO deals disjoint shares over `iterations`, so they depend on it.
                "prompts": stable_hash(list(rows["prompt"])),
                **method_settings,
            },
            after=last,
        )
        if not stage.check():
            started = stage.start() if state.is_main_process else 0.0
            state.wait_for_everyone()
            _print(state, f"[5/5] {method.name} iteration {iteration}/{script_args.iterations} on {len(rows)} prompts")
            model, tokenizer = load(start_model)
            args = method.make_config(
                training_args,
                extra,
                output_dir=str(stage.root),
                push_to_hub=False,
                run_name=_run_name(training_args, f"{method.name}_iter{iteration}"),
            )
            columns = ["prompt"] + (["reference"] if judge is not None and "reference" in rows.column_names else [])
            trainer = method.build_trainer(
                model, tokenizer, args, rows.select_columns(columns), get_peft_config(model_args), judge
            )
            if heap:
                trainer.add_callback(TrimHeapCallback())
            _train_and_save(trainer, tokenizer, stage.root, state, load_base(start_model))
            if state.is_main_process:
                # The card is written now, while the trainer holds the figures; `_push` uploads it as it is.
                trainer.hub_model_id = training_args.hub_model_id or out.name
                trainer.create_model_card(model_name=out.name, dataset_name=script_args.dataset_name)
                stage.finish(started, **round_figures(trainer))
            state.wait_for_everyone()
            stage.check()
            del trainer, model
            gc.collect()  # as above: free this round's model before the next round loads its own
        summary["stages"][f"{method.name}_iter{iteration}"] = stage.summary
        start_model = str(stage.root / "model")
        round_dirs.append(stage.root)
        last = stage

    # Win rates on held-out prompts; adds a section to the final card and files under output_dir/evaluation. A
    # dataset may repeat a prompt in several rows, and a given --improver_data was trained on too: any held-out row
    # whose prompt training used is left out.
    trained = [improver_rows, sgpo_rows]
    if script_args.improver_data is not None:
        trained.append(load_rows(script_args.improver_data))
    eval_files = run_evaluation_stage(
        script_args,
        training_args,
        eval_rows,
        trained,
        len(dataset),
        model_name,
        stages_dir,
        summary,
        state,
        last,
        method=method.name,
    )

    # Stage 6: the final model and its card in output_dir, and on the Hub.
    final_dir = Path(start_model)
    card = final_dir.parent / "README.md"
    files = sorted(item.name for item in final_dir.iterdir()) + (["README.md"] if card.is_file() else [])
    files += eval_files
    summary["saved_to"] = str(out)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for item in final_dir.iterdir():
            shutil.copy2(item, out / item.name)
        if card.is_file():
            shutil.copy2(card, out / "README.md")
        items = collect_items(out, round_dirs, method.name, training_args.hub_model_id or out.name)
        if items is not None:
            summary["items"] = str(items / "items.jsonl")
        if training_args.push_to_hub:
            summary["pushed_to"], summary["push_commit"] = _push(out, files, training_args)
            if items is not None:  # the items each round trained on, as a dataset beside the model
                summary["items_pushed_to"] = push_items(hub_api(), summary["pushed_to"], items, training_args)
    state.wait_for_everyone()
    return _finish(summary, out, state)


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


def _finish(summary: dict[str, Any], out: Path, state: PartialState) -> dict[str, Any]:
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "sgpo_summary.json", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, default=str)
    return summary


def _data_stages(script_args, training_args, settings, load, model_name, rows, stages_dir, summary):
    """Stages 1-3 on every process (see :mod:`.data_stages`): the finished filter stage, or ``None`` when the run stops
    at or before it."""
    from .data_stages import run_data_stages

    sampling = {name: getattr(training_args, name) for name in SAMPLING_SETTINGS}
    sample = Stage(stages_dir / "01_sample", "sample", {**settings("sample"), **sampling})
    writer = "openai" if script_args.writer_model else "reference-step"
    targets = Stage(stages_dir / "02_targets", "targets", {**settings("targets"), "writer": writer}, after=sample)
    filtered = Stage(stages_dir / "03_filter", "filter", settings("filter"), after=targets)
    state = PartialState()
    loaded = []

    def policy():
        if not loaded:
            model, tokenizer = load(model_name)
            loaded.append((model.to(state.device), tokenizer))
        return loaded[0]

    try:
        return run_data_stages(
            script_args, training_args, policy, rows, [sample, targets, filtered], summary, stages_dir.parent / ".sync"
        )
    finally:
        loaded.clear()  # the policy of stages 1 and 3 is gone before improver SFT loads its own
        gc.collect()
