# Copyright 2026 The trl-sgpo developers. Licensed under the Apache License, Version 2.0.

# /// script
# dependencies = [
#     "trl-sgpo",
# ]
# ///

"""
Train SGPO, SPPO, SSO and online DPO from the same model on the same prompts, then judge them all on held-out prompts.

# Offline (no GPU, no network): SmolLM2-135M-Instruct and the bundled prompts, reference-similarity judge
```bash
accelerate launch recipes/compare.py --config recipes/configs/compare_smollm2.yaml
```

# Any model, prompts with references, an LLM judge for training (SPPO, online DPO) and evaluation
```bash
export OPENAI_API_KEY=...
accelerate launch recipes/compare.py --config recipes/configs/compare_smollm2.yaml \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name my-org/prompts-with-references \
    --judge openai --judge_model gpt-4o-mini --output_dir outputs/compare-qwen
```

Add `--judge_style arena-hard` to judge the comparison Arena-Hard style (the judge answers, reasons, gives a five-level
verdict; training keeps one-letter verdicts), or `--eval_judge local --local_judge_model <id or folder>` to judge it
with a causal LM in this process.

The held-out prompts (`num_eval_prompts`, drawn first with `seed`) are never trained on. Every method runs the
`recipes/sgpo.py` pipeline on the remaining rows (`<output_dir>/<method>/`, resumable): SGPO with its improver stages
(which use `num_improver_prompts` of those rows), the others on the `num_sgpo_prompts` preference prompts only. The
same judge estimates SPPO's win rates, picks online DPO's chosen answers and judges the comparison, so those two
methods are trained toward the judge they are evaluated with; SGPO and SSO never see it. Writes
`<output_dir>/comparison.md` (with a Bradley-Terry ranking of all the models), `comparison.json` and `comparison.png`
(plus the evaluation's answers and judgments under
`<output_dir>/eval/`).
"""

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from trl_sgpo.evaluation.judge_factory import JUDGE_STYLES
from trl_sgpo.pipeline.methods import JUDGES, JudgeArguments


@dataclass
class CompareArguments(JudgeArguments):
    """Settings of the comparison beyond the training ones (shared by every method) and the model ones; the judge's
    (``judge``, ``reward_model``, ``similarity_temperature``) are those of ``recipes/sgpo.py``."""

    methods: list[str] = field(
        default_factory=lambda: ["sgpo", "sppo", "sso", "online_dpo"],
        metadata={"help": "Methods to train and compare: any of sgpo, sppo, sso, online_dpo."},
    )
    method_args: dict | str | None = field(
        default=None,
        metadata={
            "help": "Method-specific settings keyed by method (a YAML mapping, or JSON on the command line), e.g. "
            '\'{"sppo": {"num_samples": 4}}\'; the same shape as `recipes/sgpo.py`\'s `method_args`.'
        },
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Prompts per generate call in the evaluation."})
    n_bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for the intervals."})
    judge: str = field(  # the comparison always has a judge: a default other than sgpo.py's `none`
        default="similarity",
        metadata={
            "help": "Judge for training (SPPO, online DPO) and evaluation: similarity (offline), reward-model "
            "(--reward_model) or openai (--judge_model at --base_url).",
            "choices": [kind for kind in JUDGES if kind != "none"],
        },
    )
    judge_style: str = field(
        default="alpaca-eval",
        metadata={
            "help": "openai judge, in the comparison: alpaca-eval (one letter) or arena-hard (the judge answers, "
            "reasons and gives a five-level verdict, two games per prompt). Training keeps one-letter verdicts.",
            "choices": list(JUDGE_STYLES),
        },
    )
    eval_judge: str | None = field(
        default=None,
        metadata={
            "help": "Judge of the comparison when it differs from `judge`: local (the causal LM `local_judge_model`, "
            "in this process). Default: `judge`.",
            "choices": [None, "local"],
        },
    )
    local_judge_model: str | None = field(
        default=None,
        metadata={"help": "eval_judge local: Hub id or folder (smollm2-135m-instruct: the embedded one)."},
    )

    def __post_init__(self):
        from trl_sgpo.pipeline.methods import METHODS

        super().__post_init__()
        if self.judge == "none":
            raise ValueError(
                "`judge none`: the comparison judges every method (and trains SPPO and online DPO with the judge); "
                "choose similarity, reward-model or openai."
            )
        if self.judge_style not in JUDGE_STYLES:
            raise ValueError(f"`judge_style` must be one of {JUDGE_STYLES}, got {self.judge_style!r}.")
        if self.judge_style == "arena-hard" and (self.judge != "openai" or self.eval_judge is not None):
            raise ValueError("`judge_style arena-hard` applies to `judge openai` (without `eval_judge`) only.")
        if self.eval_judge not in (None, "local"):
            raise ValueError(f"`eval_judge` must be unset or local, got {self.eval_judge!r}.")
        if self.eval_judge == "local" and not self.local_judge_model:
            raise ValueError("`eval_judge local` needs `local_judge_model` (a Hub id or folder of a causal LM).")

        if isinstance(self.methods, str):
            self.methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"`methods` must list some of {sorted(METHODS)}, got {self.methods}.")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"`methods` lists a method twice: {self.methods}.")
        extra = self.per_method_args()
        stray = sorted(set(extra) - set(self.methods))
        if stray:
            raise ValueError(f"`method_args` has settings for {stray}, which `methods` does not list.")

    def per_method_args(self) -> dict:
        from trl_sgpo.pipeline.methods import parse_method_args

        return parse_method_args(self.method_args)

    def method_arguments(self, method: str):
        from trl_sgpo.pipeline.methods import METHODS, MethodArguments

        uses_judge = METHODS[method].judge == "required"
        return MethodArguments(
            method=method,
            method_args={method: self.per_method_args().get(method, {})},
            **{**self.judge_settings(), "judge": self.judge if uses_judge else "none"},
        )


def evaluation_judge(compare_args, script_args, judge):
    """The comparison's judge: ``judge`` (the training one) unless ``eval_judge`` or ``judge_style`` asks for
    another, made by the same factory (:func:`trl_sgpo.evaluation.judge_factory.build_judge`)."""
    from trl_sgpo.evaluation.judge_factory import build_judge
    from trl_sgpo.pipeline.methods import judge_endpoint

    if compare_args.eval_judge == "local":
        return build_judge("local", model=compare_args.local_judge_model)
    if compare_args.judge_style == "arena-hard":
        return build_judge("openai", style="arena-hard", **judge_endpoint(script_args))
    return judge


def split_rows(script_args, compare_args, seed: int):
    """``(train_rows, eval_rows)``: the held-out rows are drawn first, so no method ever trains on them."""
    from trl_sgpo.data.checks import check_columns
    from trl_sgpo.data.splits import split_held_out
    from trl_sgpo.pipeline.run import load_dataset_rows

    dataset = load_dataset_rows(script_args)
    check_columns(dataset, ("prompt",), "dataset")
    n_eval = script_args.num_eval_prompts
    if n_eval < 1:
        raise ValueError(f"`num_eval_prompts` must be >= 1 (the held-out prompts of the comparison), got {n_eval}.")
    if len(dataset) <= n_eval:
        raise ValueError(
            f"The dataset has {len(dataset)} rows, not more than `num_eval_prompts`={n_eval}: nothing would be left "
            "to train on. Lower `num_eval_prompts` or use more prompts."
        )
    return split_held_out(dataset, n_eval, seed)


def main(compare_args, script_args, training_args, model_args, judge=None):
    """Train every method, evaluate them against the start model, write and return the comparison.

    ``judge`` (for tests and notebooks) replaces the judge named by ``compare_args.judge``.
    """
    from accelerate import PartialState

    from trl_sgpo.models import DEFAULT_MODEL
    from trl_sgpo.pipeline import run_pipeline

    if script_args.stop_after is not None:
        raise ValueError(
            f"`--stop_after {script_args.stop_after}`: the comparison evaluates every method's final model, so each "
            "runs to the end. For part of one method's run: recipes/sgpo.py --method NAME --stop_after STAGE."
        )
    state = PartialState()
    out = Path(training_args.output_dir)
    train_rows, eval_rows = split_rows(script_args, compare_args, training_args.seed)
    data_dir = out / "data"
    if state.is_main_process:
        data_dir.mkdir(parents=True, exist_ok=True)
        train_rows.to_json(data_dir / "train.jsonl", lines=True, force_ascii=False)
        eval_rows.to_json(data_dir / "eval.jsonl", lines=True, force_ascii=False)
    state.wait_for_everyone()

    if judge is None:
        judge = compare_args.build_judge(script_args)
    eval_judge = evaluation_judge(compare_args, script_args, judge)
    start = model_args.model_name_or_path or DEFAULT_MODEL
    results = {}
    for name in compare_args.methods:
        method_args = compare_args.method_arguments(name)
        summary = run_pipeline(
            # The comparison evaluates every method at the end; the pipeline's own evaluation stage is not run.
            dataclasses.replace(
                script_args, dataset_name=str(data_dir / "train.jsonl"), dataset_config=None, num_eval_prompts=0
            ),
            method_training_args(training_args, name, output_dir=str(out / name), push_to_hub=False),
            model_args,
            method_args,
            judge=judge if method_args.judge != "none" else None,
        )
        # Stage seconds, so a resumed run reports the time each stage took when it ran.
        seconds = sum(stage.get("seconds") or 0.0 for stage in summary["stages"].values())
        results[name] = {"model": str(out / name), "train_seconds": seconds, "stages": summary["stages"]}

    report = None
    if state.is_main_process:
        from trl_sgpo.evaluation import evaluate_models

        models = {"start": start, **{name: results[name]["model"] for name in compare_args.methods}}
        report = evaluate_models(
            models,
            eval_rows,
            eval_judge,
            out / "eval",
            max_new_tokens=script_args.eval_max_new_tokens or training_args.max_new_tokens,
            batch_size=compare_args.eval_batch_size,
            seed=training_args.seed,
            n_bootstrap=compare_args.n_bootstrap,
            show_progress=False,
        )
        table = comparison_rows(report, results)
        write_comparison(table, report, out)
        print("\n" + markdown(table, report), flush=True)
    state.wait_for_everyone()
    if state.use_distributed:
        state.destroy_process_group()
    return {"results": results, "report": report}


def method_training_args(training_args, method: str, **changes):
    """The shared training arguments for ``method``, less the settings it does not take from them (SPPO's and SSO's
    ``beta`` and ``loss_type``, SGPO's pair settings): the comparison sets those for the methods that use them."""
    from trl_sgpo.pipeline.methods import get_method

    return dataclasses.replace(training_args, **get_method(method).unused_defaults(training_args), **changes)


def comparison_rows(report: dict, results: dict) -> list[dict]:
    """One row per method: win rate vs the start model with its interval, LC win rate, length, wall time."""
    rows = [
        {
            "method": "start",
            "win_rate": None,
            "avg_length": report["comparisons"][next(iter(results))]["baseline_avg_length"],
            "train_seconds": 0.0,
        }
    ]
    for name, result in results.items():
        c = report["comparisons"][name]
        rows.append(
            {
                "method": name,
                "win_rate": c["win_rate"],
                "ci_low": c["ci_low"],
                "ci_high": c["ci_high"],
                "se": c.get("se"),
                "lc_win_rate": c["lc_win_rate"],
                "lc_se": c.get("lc_se"),
                "lc_identified": c.get("lc_identified", True),
                "lc_reason": c.get("lc_reason"),
                "lc_length_slope": c.get("lc_length_slope"),
                "wins": c["wins"],
                "ties": c["ties"],
                "losses": c["losses"],
                "avg_length": c["avg_length"],
                "train_seconds": result["train_seconds"],
            }
        )
    return rows


def _percent(value) -> str:
    """A standard error in percentage points, ``n/a`` when there is none (one prompt, a json null)."""
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def markdown(rows: list[dict], report: dict) -> str:
    from trl_sgpo.evaluation.ranking import ranking_markdown
    from trl_sgpo.evaluation.reports import cost_text

    level = round(100 * report.get("confidence", 0.95))
    lines = [
        f"Held-out prompts: {report['n_prompts']}; judge: {report['judge']}; baseline: the start model.",
        "",
        *([cost_text(report), ""] if cost_text(report) else []),
        f"| method | win rate vs start % (SE) [{level}% CI] | LC win rate % (SE) | wins / ties / losses | "
        "avg length (chars) | train wall time |",
        "|---|---|---|---|---|---|",
    ]
    notes = []
    for r in rows:
        if r["win_rate"] is None:
            lines.append(f"| {r['method']} | - | - | - | {r['avg_length']:.0f} | - |")
            continue
        lc = f"{100 * r['lc_win_rate']:.1f} ({_percent(r.get('lc_se'))})"
        if not r.get("lc_identified", True):
            notes.append(f"{r['method']}: {r['lc_reason']}.")
            lc = f"n/i ({len(notes)})"
        lines.append(
            f"| {r['method']} | {100 * r['win_rate']:.1f} ({_percent(r.get('se'))}) "
            f"[{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] | "
            f"{lc} | {r['wins']} / {r['ties']} / {r['losses']} | {r['avg_length']:.0f} | "
            f"{r['train_seconds'] / 60:.1f} min |"
        )
    if notes:
        lines += ["", "LC win rate not identified (n/i):", "", *(f"{i}. {note}" for i, note in enumerate(notes, 1))]
    if report.get("ranking"):
        lines += ["", ranking_markdown(report["ranking"]).rstrip("\n")]
    return "\n".join(lines)


def write_comparison(rows: list[dict], report: dict, out: Path) -> None:
    import matplotlib

    from trl_sgpo.evaluation.reports import json_safe

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "comparison.md").write_text("# Comparison\n\n" + markdown(rows, report) + "\n", encoding="utf-8")
    with open(out / "comparison.json", "w", encoding="utf-8") as f:
        summary = {"rows": rows, "judge": report["judge"], "n_prompts": report["n_prompts"]}
        json.dump(json_safe({**summary, "ranking": report.get("ranking")}), f, indent=2, allow_nan=False)

    trained = [r for r in rows if r["win_rate"] is not None]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(trained), 3.6))
    x = range(len(trained))
    rates = [100 * r["win_rate"] for r in trained]
    errors = [
        [100 * (r["win_rate"] - r["ci_low"]) for r in trained],
        [100 * (r["ci_high"] - r["win_rate"]) for r in trained],
    ]
    ax.bar(x, rates, yerr=errors, capsize=4, color="#4c72b0", label="win rate vs start")
    lc = [(i, 100 * r["lc_win_rate"]) for i, r in enumerate(trained) if r.get("lc_identified", True)]
    ax.scatter([i for i, _ in lc], [v for _, v in lc], color="#dd8452", zorder=3, label="length-controlled")
    ax.axhline(50, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(list(x), [f"{r['method']}\n{r['train_seconds'] / 60:.0f} min" for r in trained])
    ax.set_ylabel("% vs start model")
    ax.set_ylim(0, 100)
    ax.set_title(f"{report['n_prompts']} held-out prompts, judge: {report['judge'].split(':')[0]}", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=120)
    plt.close(fig)


def make_parser():
    from trl import ModelConfig, TrlParser

    from trl_sgpo import SGPOConfig
    from trl_sgpo.pipeline import SGPOScriptArguments

    parser = TrlParser(
        (CompareArguments, SGPOScriptArguments, SGPOConfig, ModelConfig), description=__doc__.split("\n\n")[1].strip()
    )
    return parser


if __name__ == "__main__":
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    main(*make_parser().parse_args_and_config())
