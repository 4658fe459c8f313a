"""Evaluation throughput: the OpenAI judge against the local stub, and answer generation against plain ``generate``.

1. Judge: requests per second of :class:`~trl_sgpo.evaluation.judges.OpenAIPairwiseJudge` (two requests per pair,
   both orders) against the stub server in its own process with a fixed latency standing in for the LLM. With latency
   L and concurrency C the ceiling is C / L requests per second. Goal: >= 100 requests/s with 32 in flight. A second
   pass over the same pairs is answered from the cache with no request.
2. Answers: :func:`~trl_sgpo.evaluation.answers.generate_answers` (rendering, batching by length, resumable JSONL,
   AlpacaEval export) against plain cached ``model.generate`` on the same rendered prompts, batch size and greedy
   settings, in turns (A B A B). Goal: ratio <= 1.1.

    python benchmarks/judge.py                   # judge: 2000 pairs, 32 in flight, 50 ms; answers: embedded model
    python benchmarks/judge.py --tiny            # answers with the random tiny model (seconds)
    python benchmarks/judge.py --skip-answers --pairs 5000 --concurrency 64
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path


TESTS_DIR = _Path(__file__).resolve().parents[1] / "tests"
_sys.path.insert(0, str(TESTS_DIR))
_sys.path.insert(0, str(_Path(__file__).resolve().parent))

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
from _common import QUESTIONS, add_common_args, load_model, machine_line, median, setup_threads, verdict
from datasets import Dataset
from targets import stub_server

from trl_sgpo.evaluation.answers import TransformersGenerator, generate_answers
from trl_sgpo.evaluation.judges import OpenAIPairwiseJudge


def bench_judge(args) -> None:
    os.environ["SGPO_BENCH_KEY"] = "bench"
    prompts = [f"Question {i}: explain topic {i}." for i in range(args.pairs)]
    a = [f"Topic {i} is about one thing. " * (1 + i % 3) for i in range(args.pairs)]
    b = [f"Topic {i} has two sides. " * (1 + (i + 1) % 3) for i in range(args.pairs)]
    with tempfile.TemporaryDirectory() as tmp, stub_server(args.latency, "bench", args.in_process) as stub:
        judge = OpenAIPairwiseJudge(
            "stub-judge",
            stub.base_url,
            api_key_env="SGPO_BENCH_KEY",
            max_concurrency=args.concurrency,
            cache_path=Path(tmp) / "cache.jsonl",
        )
        start = time.perf_counter()
        judge.judge(prompts, a, b)
        elapsed = time.perf_counter() - start
        stats, server = judge.stats, stub.stats()
        rate = stats.requests / elapsed
        ceiling = args.concurrency / args.latency if args.latency else float("inf")
        print(f"judge: pairs={args.pairs} concurrency={args.concurrency} latency={args.latency * 1000:.0f}ms")
        print(
            f"  requests/s: {rate:.1f} ({stats.requests} requests for {args.pairs} pairs, {elapsed:.2f}s; ceiling "
            f"{ceiling:.0f}/s) -> goal >= 100/s: {'PASS' if rate >= 100 else 'MISS'}"
        )
        print(f"  peak in flight: server {server['peak_in_flight']}, client {stats.peak_in_flight}")
        fresh = OpenAIPairwiseJudge(
            "stub-judge", stub.base_url, api_key_env="SGPO_BENCH_KEY", cache_path=Path(tmp) / "cache.jsonl"
        )
        start = time.perf_counter()
        fresh.judge(prompts, a, b)
        elapsed = time.perf_counter() - start
        print(
            f"  cached rerun: {args.pairs / elapsed:.0f} pairs/s, {stub.stats()['requests'] - server['requests']} "
            f"requests sent, {fresh.stats.cache_hits} cache hits"
        )


def bench_answers(args) -> None:
    setup_threads(args.threads)
    model, tokenizer, name = load_model(args)
    model.eval()
    rows = [QUESTIONS[i % len(QUESTIONS)] + f" ({i})" for i in range(args.prompts)]
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in rows]})
    generator = TransformersGenerator(model, tokenizer, max_new_tokens=args.max_new_tokens, temperature=0.0)
    texts = [generator.render(p) for p in dataset["prompt"]]
    texts.sort(key=len, reverse=True)  # the same batches as generate_answers forms

    @torch.no_grad()
    def plain() -> None:
        for start in range(0, len(texts), args.batch_size):
            inputs = tokenizer(
                texts[start : start + args.batch_size],
                return_tensors="pt",
                padding=True,
                padding_side="left",
                add_special_tokens=False,
            ).to(model.device)
            model.generate(
                **inputs,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
            )

    def ours(tmp: str, turn: int) -> None:
        generate_answers(
            generator, dataset, Path(tmp) / f"answers{turn}.jsonl", batch_size=args.batch_size, show_progress=False
        )

    times = {"plain": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        plain()  # warm-up
        for turn in range(args.rounds):
            start = time.perf_counter()
            plain()
            times["plain"].append(time.perf_counter() - start)
            start = time.perf_counter()
            ours(tmp, turn)
            times["ours"].append(time.perf_counter() - start)
    ratio = median(times["ours"]) / median(times["plain"])
    print(machine_line(args, name))
    print(
        f"answers: {args.prompts} prompts, batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, greedy, "
        f"{args.rounds} rounds"
    )
    print(f"  plain generate: {median(times['plain']):.2f}s  generate_answers: {median(times['ours']):.2f}s (medians)")
    print(f"  ratio generate_answers / plain: {ratio:.3f} -> goal <= 1.1: {verdict(ratio, 1.1)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2000, help="Judge: answer pairs (two requests each).")
    parser.add_argument("--concurrency", type=int, default=32, help="Judge: requests in flight.")
    parser.add_argument("--latency", type=float, default=0.05, help="Judge: seconds the stub waits per answer.")
    parser.add_argument("--in-process", action="store_true", help="Judge: run the stub in this process.")
    parser.add_argument("--skip-judge", action="store_true")
    parser.add_argument("--skip-answers", action="store_true")
    parser.add_argument("--prompts", type=int, default=16, help="Answers: prompts per pass.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    add_common_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.skip_judge:
        bench_judge(args)
    if not args.skip_answers:
        bench_answers(args)


if __name__ == "__main__":
    main()
