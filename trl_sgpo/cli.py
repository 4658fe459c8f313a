"""``trl-sgpo``: build the improver-SFT set from a prompt/reference set, from the command line.

Options have the names of the recipe's settings (``--writer-model`` here is ``--writer_model`` or ``--writer-model``
there).

Subcommands (each writes as it goes and resumes from its output when rerun with the same arguments):

- ``sample``: the policy answers every prompt (adds ``response``).
- ``targets``: a writer improves each answer one step toward its reference (adds ``target``). Offline by default
  (deterministic sentence-level edit); ``--base-url URL --writer-model NAME`` uses any OpenAI-compatible server, with
  the key read from ``$OPENAI_API_KEY`` (or ``--api-key-env``).
- ``filter``: scores targets under the policy and keeps those it could plausibly write (perplexity filter).
- ``improver-data``: the three in order, into one folder.

Examples::

    # Offline, on the embedded default model (SmolLM2-135M-Instruct), CPU:
    trl-sgpo improver-data --input prompts.jsonl --output-dir out/improver-data

    # Targets from a strong model behind an OpenAI-compatible server (vLLM here):
    export OPENAI_API_KEY=...   # any value for a server without authentication
    trl-sgpo improver-data --input prompts.jsonl --output-dir out/improver-data \\
        --base-url http://localhost:8000/v1 --writer-model Qwen/Qwen2.5-72B-Instruct

The kept set is ``out/improver-data/improver_sft/`` (``datasets.load_from_disk``) and ``improver_sft.jsonl``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .cli_common import add_model_arguments, load_input, load_model


DESCRIPTION = "SGPO tools: build improver-SFT data (sample answers, write improved targets, filter them by perplexity), use a trained model as an improver, and evaluate models by win rates."


# --------------------------------------------------------------------------------------------- arguments


def _add_sample(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (use your SGPOConfig's values so answers match SGPO's policy generation)")
    g.add_argument("--sample-batch-size", type=int, default=8, help="Prompts per generate call.")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.9, help="0 for greedy.")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)


def _add_targets(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target writer")
    g.add_argument(
        "--writer",
        default="auto",
        choices=["auto", "openai", "reference-step", "transformers"],
        help="auto: openai when --base-url or --writer-model is given, else reference-step (offline).",
    )
    g.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.")
    g.add_argument(
        "--writer-model",
        default=None,
        help="openai: model name at the endpoint. transformers: Hub id or folder (default: the policy).",
    )
    g.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        help="Environment variable holding the API key (the key itself is never accepted as an argument).",
    )
    g.add_argument("--max-concurrency", type=int, default=32, help="Most requests in flight.")
    g.add_argument("--max-retries", type=int, default=5, help="Retries per row on 429/5xx/timeouts/malformed answers.")
    g.add_argument("--request-timeout", type=float, default=120.0, help="Seconds per request attempt.")
    g.add_argument("--writer-temperature", type=float, default=0.7)
    g.add_argument("--max-tokens", type=int, default=2048, help="Most tokens per target (max_new_tokens locally).")
    g.add_argument("--price-input", type=float, default=0.0, help="USD per 1M prompt tokens, for the cost figure.")
    g.add_argument("--price-output", type=float, default=0.0, help="USD per 1M completion tokens.")
    g.add_argument("--cache", default=None, help="Answer cache JSONL (default: <targets>.cache.jsonl).")
    g.add_argument("--failures", default=None, help="Failures JSONL (default: <targets>.failures.jsonl).")
    g.add_argument(
        "--step-fraction",
        type=float,
        default=0.5,
        help="reference-step: share of the sentence edits toward the reference to apply; 1: the reference itself "
        "(improver-data keeps such targets; a separate `filter` run needs --keep-reference-copies).",
    )
    g = p.add_argument_group("target prompt constraints (see trl_sgpo.target_prompts)")
    g.add_argument("--min-length-ratio", type=float, default=0.8, help="Target at least this x the answer's words.")
    g.add_argument("--max-length-ratio", type=float, default=1.5, help="Target at most this x the answer's words.")
    g.add_argument(
        "--max-edits",
        type=int,
        default=3,
        help="Most separate changes per target (also caps reference-step's sentence edits below --step-fraction 1); "
        "0: no limit.",
    )
    g.add_argument("--free-style", action="store_true", help="Do not ask to keep the answer's style.")
    g.add_argument("--allow-reference-copy", action="store_true", help="Do not forbid copying the reference.")
    g.add_argument(
        "--constraint", action="append", default=[], metavar="TEXT", help="An extra constraint sentence (repeatable)."
    )
    g.add_argument(
        "--require-tag",
        action="store_true",
        help="Reject answers without the <improved_answer> tag instead of taking them whole.",
    )


def _add_filter(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("perplexity filter (see trl_sgpo.perplexity)")
    g.add_argument(
        "--ppl-max-ratio",
        type=float,
        default=3.0,
        help="Keep targets with ppl <= this x the response's ppl; 0 disables.",
    )
    g.add_argument(
        "--max-quantile",
        type=float,
        default=None,
        help="Keep targets with ppl <= this quantile of the responses' ppl (e.g. 0.9).",
    )
    g.add_argument("--max-ppl", type=float, default=None, help="Keep targets with ppl <= this.")
    g.add_argument("--keep-same-as-response", action="store_true", help="Keep targets equal to the response.")
    g.add_argument("--keep-reference-copies", action="store_true", help="Keep targets equal to the reference.")
    g.add_argument("--filter-batch-size", type=int, default=8, help="Rows per scoring batch.")
    g.add_argument("--max-length", type=int, default=1024, help="Most tokens per scored prompt + completion.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-sgpo", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="Only warnings and errors; no progress bars.")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}

    p = sub.add_parser("sample", help="The policy answers every prompt (adds `response`).", **defaults)
    p.add_argument(
        "--input",
        default=None,
        help="Prompt/reference JSONL, JSON or save_to_disk folder (default: the set shipped with trl-sgpo).",
    )
    p.add_argument("--output", required=True, help="Output JSONL (resumed if it exists).")
    add_model_arguments(p)
    _add_sample(p)

    p = sub.add_parser("targets", help="Write an improved target for every answer (adds `target`).", **defaults)
    p.add_argument("--input", required=True, help="JSONL with prompt, response, reference (from `sample`).")
    p.add_argument("--output", required=True, help="Output JSONL (resumed if it exists).")
    _add_targets(p)
    add_model_arguments(p)  # only used by --writer transformers

    p = sub.add_parser(
        "filter", help="Keep the targets the policy could plausibly write (perplexity filter).", **defaults
    )
    p.add_argument("--input", required=True, help="JSONL with prompt, response, target (from `targets`).")
    p.add_argument("--output-dir", required=True, help="Folder for scores, kept set, dropped rows and report.")
    add_model_arguments(p)
    _add_filter(p)

    p = sub.add_parser("improver-data", help="sample, targets and filter in order, into one folder.", **defaults)
    p.add_argument(
        "--input",
        default=None,
        help="Prompt/reference JSONL, JSON or save_to_disk folder (default: the set shipped with trl-sgpo).",
    )
    p.add_argument("--output-dir", required=True, help="Folder for every stage's files (resumed if they exist).")
    add_model_arguments(p)
    _add_sample(p)
    _add_targets(p)
    _add_filter(p)

    from . import improve

    improve.add_parser(sub)

    from .evaluation.cli import add_parser as add_eval_parser  # argparse only: keeps --help fast

    add_eval_parser(sub)
    return parser


# --------------------------------------------------------------------------------------------- building blocks


def _sample(args, model, tokenizer, dataset, output):
    from .data.sampling import sample_responses

    return sample_responses(
        model,
        tokenizer,
        dataset,
        output,
        batch_size=args.sample_batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        show_progress=not args.quiet,
    )


def _prompt_config(args):
    from .data.target_prompts import TargetPromptConfig

    return TargetPromptConfig(
        min_length_ratio=args.min_length_ratio,
        max_length_ratio=args.max_length_ratio,
        max_edits=args.max_edits or None,
        keep_style=not args.free_style,
        forbid_copying_reference=not args.allow_reference_copy,
        extra_constraints=tuple(args.constraint),
        require_tag=args.require_tag,
    )


def _writer_choice(args):
    """Resolve ``--writer auto`` and build the target prompt config, checking the writer's arguments: once per run,
    before any model is loaded or any row sampled. Returns ``(kind, prompt_config)`` for :func:`_writer`."""
    kind = args.writer
    if kind == "auto":
        kind = "openai" if (args.base_url or args.writer_model) else "reference-step"
    prompt_config = _prompt_config(args)  # raises on inconsistent constraints
    if kind == "openai":
        if not args.writer_model:
            raise ValueError("The openai writer needs --writer-model (the model name at the endpoint).")
        if not os.environ.get(args.api_key_env):
            raise ValueError(
                f"The environment variable {args.api_key_env} holding the API key is not set. Export it (any value "
                f"for a server without authentication: `export {args.api_key_env}=EMPTY`), or pass --api-key-env."
            )
    return kind, prompt_config


def _writer(args, choice, policy=None):
    """The target writer for ``choice``, the ``(kind, prompt_config)`` from :func:`_writer_choice`."""
    from .data.target_writers import OpenAITargetWriter, ReferenceStepWriter, TransformersTargetWriter

    kind, prompt_config = choice
    if kind == "openai":
        return OpenAITargetWriter(
            args.writer_model,
            args.base_url,
            api_key_env=args.api_key_env,
            prompt_config=prompt_config,
            temperature=args.writer_temperature,
            max_tokens=args.max_tokens,
            max_concurrency=args.max_concurrency,
            max_retries=args.max_retries,
            timeout=args.request_timeout,
            price_input_per_1m=args.price_input,
            price_output_per_1m=args.price_output,
            cache_path=args.cache,
        )
    if kind == "transformers":
        if args.writer_model is None and policy is not None:
            model, tokenizer = policy  # the policy writes its own targets (smoke runs only)
        else:
            model, tokenizer = load_model(args.writer_model or args.model, args.device, args.dtype)
        return TransformersTargetWriter(
            model,
            tokenizer,
            prompt_config=prompt_config,
            batch_size=getattr(args, "sample_batch_size", 8),
            max_new_tokens=args.max_tokens,
            temperature=args.writer_temperature,
        )
    return ReferenceStepWriter(fraction=args.step_fraction, max_edits=args.max_edits or None)


def _targets(args, dataset, output, choice, policy=None):
    from .data.target_writers import write_targets

    writer = _writer(args, choice, policy)
    result = write_targets(writer, dataset, output, args.failures, show_progress=not args.quiet)
    print(f"targets: {writer.stats.summary()} -> {output}", file=sys.stderr)
    return result, writer


def _filter(args, model, tokenizer, dataset, output_dir, writer=None):
    from .data.perplexity import PerplexityFilterConfig, filter_targets

    # The offline writer at --step-fraction 1 writes the references on purpose: they are kept, not dropped as copies.
    keep_references = args.keep_reference_copies or getattr(writer, "writes_references", False)
    config = PerplexityFilterConfig(
        max_ratio=args.ppl_max_ratio or None,
        max_quantile=args.max_quantile,
        max_ppl=args.max_ppl,
        drop_same_as_response=not args.keep_same_as_response,
        drop_reference_copies=not keep_references,
    )
    kept, report = filter_targets(
        model,
        tokenizer,
        dataset,
        output_dir,
        config,
        batch_size=args.filter_batch_size,
        max_length=args.max_length,
        show_progress=not args.quiet,
    )
    print(
        f"filter: kept {report['kept']} of {report['rows']}; dropped {report['dropped_by_reason'] or 'none'} "
        f"-> {output_dir}",
        file=sys.stderr,
    )
    return kept


# --------------------------------------------------------------------------------------------- commands


def run(args) -> None:
    """Run one parsed command (see :func:`build_parser`)."""
    from .data.perplexity import KEPT_DIR
    from .io.jsonl import load_rows

    if getattr(args, "run", None) is not None:  # subcommands that bring their own runner (e.g. `eval`)
        return args.run(args)
    if args.command == "improve":
        from . import improve

        improve.run(args)
    elif args.command == "sample":
        model, tokenizer = load_model(args.model, args.device, args.dtype)
        rows = _sample(args, model, tokenizer, load_input(args.input), args.output)
        print(f"sample: {len(rows)} responses -> {args.output}", file=sys.stderr)
    elif args.command == "targets":
        choice = _writer_choice(args)
        _targets(args, load_rows(args.input), args.output, choice)
    elif args.command == "filter":
        model, tokenizer = load_model(args.model, args.device, args.dtype)
        _filter(args, model, tokenizer, load_rows(args.input), args.output_dir)
    elif args.command == "improver-data":
        from .data.sampling import check_prompt_reference
        from .data.target_writers import sibling_path

        out = Path(args.output_dir)
        dataset = load_input(args.input)
        check_prompt_reference(dataset)  # fail before any compute is spent
        choice = _writer_choice(args)
        model, tokenizer = load_model(args.model, args.device, args.dtype)
        start = time.perf_counter()
        responses = _sample(args, model, tokenizer, dataset, out / "responses.jsonl")
        print(f"sample: {len(responses)} responses -> {out / 'responses.jsonl'}", file=sys.stderr)
        targets, writer = _targets(args, responses, out / "targets.jsonl", choice, policy=(model, tokenizer))
        if len(targets) == 0:
            failures = args.failures or sibling_path(out / "targets.jsonl", "failures")
            raise ValueError(f"No target was written; the reasons are in {failures}.")
        _filter(args, model, tokenizer, targets, out, writer)
        print(
            f"improver-data: done in {time.perf_counter() - start:.1f}s; improver SFT set: {out / KEPT_DIR} "
            f"(datasets.load_from_disk) and {out / 'improver_sft.jsonl'}",
            file=sys.stderr,
        )


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``trl-sgpo``."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.quiet:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    from .data.target_writers import TargetWriterAbort

    try:
        run(args)
    except KeyboardInterrupt:
        print("Interrupted. Everything finished so far is on disk; rerun the same command to resume.", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ModuleNotFoundError, OSError, TargetWriterAbort) as e:
        print(f"trl-sgpo {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
