"""``trl-sgpo eval``: answer a prompt set with several models and report win rates against the first.

Examples::

    # Offline: the reference-similarity judge (rows need a `reference`)
    trl-sgpo eval --model base=HuggingFaceTB/SmolLM2-135M-Instruct --model sgpo=outputs/sgpo \\
        --prompts heldout.jsonl --output-dir eval/

    # A strong LLM judge behind any OpenAI-compatible endpoint (key from $OPENAI_API_KEY)
    trl-sgpo eval --model base=... --model sgpo=... --prompts heldout.jsonl --output-dir eval/ \\
        --judge openai --base-url http://localhost:8000/v1 --judge-model Qwen/Qwen2.5-72B-Instruct

    # The report carries the judge's cost: known OpenAI models are priced from a table of list prices; give the
    # prices (USD per 1M prompt / completion tokens) for any other judge, else the cost reads "unknown"
    trl-sgpo eval ... --judge openai --judge-model my-judge --base-url ... --judge-price-in 0.5 --judge-price-out 1.5

    # Arena-Hard style: the judge answers first, reasons, then gives [[A>>B]] ... [[B>>A]]; two games per prompt
    trl-sgpo eval ... --judge openai --judge-style arena-hard --base-url ... --judge-model ...

    # A judge in this process (no endpoint): a causal LM's verdict-token probabilities
    trl-sgpo eval ... --judge local --judge-model Qwen/Qwen2.5-7B-Instruct

With three or more models, report.md also ranks them by Bradley-Terry (ranking.png).

A rerun resumes: answers, judgments and judge requests already made are not made again, as long as what made them
is the same (the model's weights, every generation setting, the judge and its settings); whatever changed is
recomputed, and one log line per model and judge says how many were reused and why the others were not.
"""

from __future__ import annotations

import argparse
import os
import sys


HELP = "Answer a prompt set with several models and report win rates against the first (the baseline)."


def _model_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH_OR_ID, got {text!r} (e.g. --model base=my/model)")
    return name, path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to ``subparsers`` (``trl_sgpo.cli`` calls this)."""
    p = subparsers.add_parser(
        "eval",
        help=HELP,
        description=HELP,
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_input_args(p)
    _add_generation_args(p.add_argument_group("generation"))
    _add_judge_args(p.add_argument_group("judge"))
    _add_report_args(p.add_argument_group("report"))
    p.set_defaults(run=run)
    return p


def _add_input_args(p) -> None:
    p.add_argument(
        "--model",
        action="append",
        type=_model_arg,
        required=True,
        metavar="NAME=PATH_OR_ID",
        help="A model to evaluate (repeatable; the first is the baseline): Hub id, local folder, or "
        "smollm2-135m-instruct (the embedded default).",
    )
    p.add_argument(
        "--prompts",
        default=None,
        help="Prompt set: JSONL, JSON or save_to_disk folder with `prompt` (and `reference`, `category`). Default: the "
        "set shipped with trl-sgpo.",
    )
    p.add_argument("--output-dir", required=True, help="Folder for answers, judgments, report and plots (resumed).")
    p.add_argument("--num-prompts", type=int, default=None, help="Use only the first N prompts (default: all).")
    p.add_argument(
        "--improver",
        action="store_true",
        help="Also judge each model's improvements of its own answers against those answers.",
    )


def _add_generation_args(g) -> None:
    g.add_argument("--max-new-tokens", type=int, default=256, help="Most tokens per answer (default: 256).")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0).")
    g.add_argument("--batch-size", type=int, default=8, help="Prompts per generate call (default: 8).")
    g.add_argument("--seed", type=int, default=0, help="Sampling and bootstrap seed (default: 0).")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda when available).")


def _add_judge_args(g) -> None:
    g.add_argument(
        "--judge",
        default="similarity",
        # judge_factory.JUDGE_KINDS but none, spelled out so that `--help` needs no torch (a test keeps them equal).
        choices=["similarity", "reward-model", "openai", "local"],
        help="similarity: cosine similarity of sentence embeddings to each row's reference (offline, the default); "
        "openai: an LLM at --base-url/--judge-model; reward-model: --reward-model scores each answer; local: the "
        "causal LM --judge-model in this process (verdict-token probabilities).",
    )
    g.add_argument("--base-url", default=None, help="openai: endpoint, e.g. http://localhost:8000/v1.")
    g.add_argument(
        "--judge-model",
        default=None,
        help="openai: model name at the endpoint; local: Hub id or folder (smollm2-135m-instruct: the embedded one).",
    )
    g.add_argument(
        "--judge-style",
        default="alpaca-eval",
        choices=["alpaca-eval", "arena-hard"],  # judge_factory.JUDGE_STYLES
        help="openai: alpaca-eval asks for one letter (log-probabilities when available); arena-hard lets the judge "
        "answer, reason and give a five-level verdict [[A>>B]]..[[B>>A]], two games per prompt (default: alpaca-eval).",
    )
    g.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        help="openai: environment variable holding the key (never passed as an argument; default: OPENAI_API_KEY).",
    )
    g.add_argument("--max-concurrency", type=int, default=32, help="openai: most requests in flight (default: 32).")
    g.add_argument("--max-retries", type=int, default=5, help="openai: retries per request (default: 5).")
    g.add_argument(
        "--request-timeout", type=float, default=120.0, help="openai: seconds per request attempt (default: 120)."
    )
    g.add_argument(
        "--no-logprobs",
        action="store_true",
        help="openai: do not ask for log-probabilities (for endpoints that reject them); verdicts are then 0/1.",
    )
    g.add_argument(
        "--judge-price-in",
        dest="judge_price_in",
        type=float,
        default=None,
        help="openai: USD per 1M prompt tokens, for the judge cost in the report (default: the list price of a known "
        "OpenAI model at api.openai.com, else the cost is reported as unknown).",
    )
    g.add_argument(
        "--judge-price-out",
        dest="judge_price_out",
        type=float,
        default=None,
        help="openai: USD per 1M completion tokens (give both prices or neither).",
    )
    g.add_argument("--reward-model", default=None, help="reward-model: Hub id or folder of a 1-label classifier.")
    g.add_argument(
        "--similarity-temperature",
        type=float,
        default=0.05,
        help="similarity: P(a beats b) = sigmoid((sim_a - sim_b) / T); 0 for hard verdicts (default: 0.05).",
    )


def _add_report_args(g) -> None:
    g.add_argument("--n-bootstrap", type=int, default=1000, help="Bootstrap resamples for intervals (default: 1000).")
    g.add_argument("--confidence", type=float, default=0.95, help="Interval level (default: 0.95).")
    g.add_argument("--no-plots", action="store_true", help="Do not write the PNG figures.")
    g.add_argument(
        "--rank-all-pairs",
        action="store_true",
        help="With three or more models, also judge every pair of non-baseline models for the Bradley-Terry ranking "
        "(default: each model against the baseline only).",
    )
    g.add_argument(
        "--trainer-state",
        action="append",
        default=[],
        type=_model_arg,
        metavar="NAME=PATH",
        help="A trainer_state.json to plot training curves from (repeatable).",
    )


def build_judge(args):
    """The judge named by ``--judge`` (checks its arguments, and reads the API key, before any model is loaded)."""
    from .judge_factory import build_judge as judge_factory

    return judge_factory(
        args.judge,
        model=args.judge_model,
        base_url=args.base_url,
        style=getattr(args, "judge_style", "alpaca-eval"),
        logprobs=not args.no_logprobs,
        reward_model=args.reward_model,
        similarity_temperature=args.similarity_temperature,
        device=args.device,
        flag_separator="-",
        api_key_env=args.api_key_env,
        max_concurrency=args.max_concurrency,
        max_retries=args.max_retries,
        timeout=args.request_timeout,
        price_input_per_1m=args.judge_price_in,
        price_output_per_1m=args.judge_price_out,
    )


def run(args) -> dict:
    """Run ``trl-sgpo eval`` with parsed ``args``; print the table; return the report."""
    from ..cli_common import load_input as _load_input
    from .compare import evaluate_models
    from .reports import cost_text, text_table

    names = [name for name, _ in args.model]
    if len(set(names)) != len(names):
        raise ValueError(f"Model names must be unique, got {names}.")
    if len(names) < 2 and not args.improver:
        raise ValueError("Give at least two --model (the first is the baseline), or --improver.")
    dataset = _load_input(args.prompts)
    if args.num_prompts is not None:
        dataset = dataset.select(range(min(args.num_prompts, len(dataset))))
    if args.judge == "similarity" and "reference" not in dataset.column_names:
        raise ValueError("--judge similarity needs a `reference` column in --prompts; use --judge openai otherwise.")
    judge = build_judge(args)
    report = evaluate_models(
        dict(args.model),
        dataset,
        judge,
        args.output_dir,
        improver=args.improver,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        batch_size=args.batch_size,
        seed=args.seed,
        n_bootstrap=args.n_bootstrap,
        confidence=args.confidence,
        device=args.device,
        trainer_states=dict(args.trainer_state) or None,
        plots=not args.no_plots,
        rank_all_pairs=args.rank_all_pairs,
        show_progress=not getattr(args, "quiet", False),
    )
    print(text_table(report))
    if cost_text(report):
        print(cost_text(report), file=sys.stderr)
    print(f"report: {os.path.join(args.output_dir, 'report.md')}", file=sys.stderr)
    return report
