"""A trained SGPO model as an inference-time improver: answer prompts, then improve the answers, optionally for
several rounds of self-refinement.

:func:`improve` is the Python entry point; ``trl-sgpo improve`` (:func:`add_parser`, :func:`run`) runs it over a JSONL
file, writing rows as batches finish and resuming from the output file. The improver request is built by
:mod:`trl_sgpo.templates` with the template saved next to the model (``improver_template.json``), so the model is
asked exactly as it was trained; generation is TRL-style cached ``generate`` (:func:`~trl_sgpo.data.sampling.
generate_completions`), stopping at the first end-of-turn.

An answer cut at the token budget is not an improvement: a round whose output is cut is recorded but not carried
forward, so ``improved`` is always the last answer that finished (or the draft when no round finished).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:  # imported where used, so that `trl-sgpo --help` does not load TRL
    from .templates import ImproverTemplate, Prompt


logger = logging.getLogger(__name__)


def improve(
    model,
    tokenizer,
    prompts: list[Prompt],
    responses: list[str] | None = None,
    *,
    rounds: int = 1,
    template: ImproverTemplate | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    improver_max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Answer ``prompts`` with ``model`` (unless ``responses`` are given), then have it improve each answer ``rounds``
    times, each round improving the previous round's answer.

    Args:
        model, tokenizer: The model (in eval mode on its device) and its tokenizer (with a pad token).
        prompts: Questions, as TRL prompts: chat messages go through the chat template, a string is raw text.
        responses: Drafts to improve instead of answering first.
        rounds: Improvement rounds (0: answer only).
        template: The improver template; default :func:`~trl_sgpo.templates.improver_template_for` ``(model)``: the
            one saved with the model, else the default.
        batch_size: Prompts per ``generate`` call.
        max_new_tokens, improver_max_new_tokens: Token budgets of the answer and of each improvement (default: the
            answer's).
        temperature, top_p, top_k, seed: Sampling (``temperature=0``: greedy).

    Returns:
        One dict per prompt: ``response`` and ``response_finished`` (the draft; ``None`` finished when given),
        ``improvements`` and ``improvements_finished`` (one per round), ``improved`` (the last finished answer) and
        ``improved_round`` (the round that wrote it, 0 for the draft).
    """
    import torch

    from .templates import improver_template_for

    if rounds < 0:
        raise ValueError(f"`rounds` must be >= 0, got {rounds}.")
    if responses is not None and len(responses) != len(prompts):
        raise ValueError(f"Got {len(responses)} responses for {len(prompts)} prompts; give one per prompt or none.")
    template = template or improver_template_for(model)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)
    budgets = (max_new_tokens, improver_max_new_tokens or max_new_tokens)
    results = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                given = responses[start : start + batch_size] if responses is not None else None
                batch = prompts[start : start + batch_size]
                rows = _draft_rows(model, tokenizer, batch, given, budgets[0], sampling, seed + start)
                for round_ in range(1, rounds + 1):
                    round_seed = seed + start + round_ * 7919
                    _improve_round(model, tokenizer, batch, rows, round_, template, budgets[1], sampling, round_seed)
                results.extend(rows)
    finally:
        model.train(was_training)
    return results


def _generate(model, tokenizer, texts: list[str], budget: int, sampling: dict, seed: int) -> list[tuple[str, bool]]:
    """``(text, finished)`` per rendered prompt text."""
    from .data.sampling import generate_completions

    outputs = generate_completions(model, tokenizer, texts, max_new_tokens=budget, **sampling, seed=seed)
    return [(tokenizer.decode(ids, skip_special_tokens=True).strip(), done) for ids, done in outputs]


def _draft_rows(model, tokenizer, batch, given, budget: int, sampling: dict, seed: int) -> list[dict[str, Any]]:
    """One result row per prompt of ``batch``, its draft the ``given`` response or the model's answer."""
    from .templates import render_prompt

    if given is None:
        drafts = _generate(model, tokenizer, [render_prompt(p, tokenizer) for p in batch], budget, sampling, seed)
    else:
        drafts = [(r.strip(), None) for r in given]
    return [
        {"response": text, "response_finished": done, "improvements": [], "improvements_finished": []}
        | {"improved": text, "improved_round": 0}
        for text, done in drafts
    ]


def _improve_round(model, tokenizer, batch, rows, round_: int, template, budget: int, sampling: dict, seed: int):
    """Round ``round_``: each row's last finished answer improved; a cut or empty improvement is recorded but not
    carried forward."""
    from .templates import improver_prompt, render_prompt

    texts = [
        render_prompt(improver_prompt(p, row["improved"], template), tokenizer)
        for p, row in zip(batch, rows, strict=True)
    ]
    for row, (text, done) in zip(rows, _generate(model, tokenizer, texts, budget, sampling, seed), strict=True):
        row["improvements"].append(text)
        row["improvements_finished"].append(done)
        if done and text:
            row["improved"], row["improved_round"] = text, round_


# --------------------------------------------------------------------------------------------- trl-sgpo improve


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``improve`` to ``trl-sgpo``'s subcommands."""
    from .cli_common import add_model_arguments as _add_model

    p = subparsers.add_parser(
        "improve",
        help="Answer prompts with a trained model, then have it improve its answers (N rounds).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input", required=True, help="JSONL (or JSON, save_to_disk folder) with `prompt` (+ `response`).")
    p.add_argument("--output", required=True, help="Output JSONL (resumed if it exists).")
    p.add_argument("--rounds", type=int, default=1, help="Improvement rounds, each improving the previous answer.")
    p.add_argument(
        "--instruction",
        default=None,
        help="Improver instruction; default: the template saved with the model (improver_template.json).",
    )
    p.add_argument(
        "--raw-prompts",
        action="store_true",
        help="Use string prompts as raw text; by default they become a user turn when the model has a chat template.",
    )
    _add_model(p)
    g = p.add_argument_group("generation")
    g.add_argument("--batch-size", type=int, default=8, help="Prompts per generate call.")
    g.add_argument("--max-new-tokens", type=int, default=256, help="Token budget of the answer.")
    g.add_argument("--improver-max-new-tokens", type=int, default=None, help="Per improvement; default: the above.")
    g.add_argument("--temperature", type=float, default=0.0, help="0 for greedy.")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    return p


def run(args) -> None:
    """Run ``trl-sgpo improve``: rows already in ``--output`` (by ``row_id``) are kept, the rest are written as each
    batch finishes."""
    from tqdm.auto import tqdm

    from .cli_common import load_model as _load_model
    from .data.checks import check_rows
    from .io.jsonl import ROW_ID, JsonlWriter, batch_seed, ensure_row_ids, load_done, load_rows
    from .models import DEFAULT_MODEL, resolve_model_path
    from .templates import DEFAULT_TEMPLATE, TEMPLATE_FILE, improver_template_for

    dataset = load_rows(args.input)
    # A `response` column holds drafts to improve; without one the model answers first.
    given = "response" in dataset.column_names
    columns = ("prompt", "response") if given else ("prompt",)
    check_rows(dataset, columns, columns, "--input", " (`prompt`: a string or chat messages; `response`: a string)")
    dataset = ensure_row_ids(dataset)
    done = load_done(args.output, dataset, ("prompt",))
    pending = [i for i, row_id in enumerate(dataset[ROW_ID]) if row_id not in done]
    model, tokenizer = _load_model(args.model, args.device, args.dtype)
    source = resolve_model_path(args.model)
    template = improver_template_for(source, args.instruction)
    # A saved template may equal the default one: warn only when nothing was saved (or found on the Hub).
    saved = Path(source).is_dir() and (Path(source) / TEMPLATE_FILE).is_file()
    if args.instruction is None and template == DEFAULT_TEMPLATE and not saved:
        logger.warning("Using the default improver template: none was saved with %s.", args.model or DEFAULT_MODEL)
    chat = not args.raw_prompts and bool(getattr(tokenizer, "chat_template", None))

    def as_prompt(prompt):
        return [{"role": "user", "content": prompt}] if chat and isinstance(prompt, str) else prompt

    with (
        JsonlWriter(args.output) as writer,
        tqdm(total=len(dataset), initial=len(dataset) - len(pending), desc="Improving", disable=args.quiet) as bar,
    ):
        for start in range(0, len(pending), args.batch_size):
            rows = [dataset[i] for i in pending[start : start + args.batch_size]]
            results = improve(
                model,
                tokenizer,
                [as_prompt(r["prompt"]) for r in rows],
                [r["response"] for r in rows] if given else None,
                rounds=args.rounds,
                template=template,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                improver_max_new_tokens=args.improver_max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=batch_seed(args.seed, rows),
            )
            writer.write_many([row | result for row, result in zip(rows, results, strict=True)])
            bar.update(len(rows))
    rows = list(load_done(args.output, dataset, ("prompt",)).values())
    improved = sum(r["improved_round"] > 0 for r in rows)
    print(f"improve: {len(rows)} rows -> {args.output}; {improved} improved by a finished round", file=sys.stderr)
