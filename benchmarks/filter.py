"""Throughput of the perplexity filter's scoring (trl_sgpo.data.perplexity.completion_nll) vs a plain batched forward pass.

Both score the same (prompt, completion) pairs, the response and the target of each row, with the same batch size,
in the same run; tokens/s counts every non-padding token fed to the model. The plain pass is what a straightforward
implementation does: right padding and full-sequence logits, then log-softmax over the completion tokens. The filter
groups sequences by length, left-pads them and applies the LM head only to the completion positions
(``logits_to_keep``), which matters with a large vocabulary (49k for SmolLM2). The two must agree on the NLL; the
benchmark checks it.

    python benchmarks/filter.py            # embedded SmolLM2-135M-Instruct: about 2 minutes on 2 idle CPU cores
    python benchmarks/filter.py --tiny     # random tiny model, well under a minute
    python benchmarks/filter.py --device cuda --rows 512 --batch-size 32
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path


# Test helpers (tiny model, OpenAI stub) live under tests/, outside the runtime package.
TESTS_DIR = _Path(__file__).resolve().parents[1] / "tests"
_sys.path.insert(0, str(TESTS_DIR))

import argparse
import os
import random
import time


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch

from trl_sgpo.data.perplexity import _encode, completion_nll
from trl_sgpo.pipeline.memory import peak_rss_gb


WORDS = [
    "the",
    "model",
    "answer",
    "question",
    "light",
    "energy",
    "water",
    "system",
    "data",
    "time",
    "people",
    "process",
    "example",
    "value",
    "result",
    "because",
    "which",
    "during",
    "several",
    "important",
    "often",
    "between",
    "however",
    "therefore",
    "simple",
    "clear",
    "short",
    "long",
    "first",
    "second",
    "explain",
    "describe",
    "improve",
    "reference",
    "draft",
    "better",
    "small",
    "large",
    "quickly",
    "carefully",
    "usually",
]


def make_pairs(rows: int, prompt_words: int, answer_words: int, seed: int = 0):
    rng = random.Random(seed)

    def text(n):
        sentences, words = [], [rng.choice(WORDS) for _ in range(n)]
        for i in range(0, n, 12):
            chunk = words[i : i + 12]
            sentences.append(" ".join(chunk).capitalize() + ".")
        return " ".join(sentences)

    prompts, completions = [], []
    for _ in range(rows):
        prompt = [{"role": "user", "content": text(rng.randint(prompt_words // 2, prompt_words))}]
        response = text(rng.randint(answer_words // 2, answer_words))
        target = text(rng.randint(answer_words // 2, answer_words))
        prompts += [prompt, prompt]
        completions += [response, target]
    return prompts, completions


@torch.no_grad()
def plain_forward(model, tokenizer, prompts, completions, batch_size, max_length):
    """Right-padded full forward pass in input order, NLL summed over the completion tokens."""
    results = []
    for start in range(0, len(prompts), batch_size):
        encoded = [
            _encode(tokenizer, p, c, max_length)
            for p, c in zip(prompts[start : start + batch_size], completions[start : start + batch_size], strict=True)
        ]
        width = max(len(p) + len(c) for p, c in encoded)
        ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (p, c) in enumerate(encoded):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
            labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
        ids, mask, labels = ids.to(model.device), mask.to(model.device), labels.to(model.device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], -1)
        target = labels[:, 1:]
        picked = logprobs.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll = -(picked * (target != -100)).sum(-1)
        results += [(float(v), int(n)) for v, n in zip(nll.tolist(), (target != -100).sum(-1).tolist(), strict=True)]
    return results


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Random tiny model instead of the embedded default.")
    parser.add_argument("--model", default=None, help="Hub id or folder (default: the embedded SmolLM2-135M).")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rows", type=int, default=32, help="Rows; each is two sequences (response and target).")
    parser.add_argument("--prompt-words", type=int, default=60)
    parser.add_argument("--answer-words", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=8, help="Sequences per forward pass (both methods).")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2, help="Timed runs per method; the best is reported.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    if args.tiny:
        from helpers.tiny import build_tiny_model, build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer).to(dtype)
        name = "tiny random Llama"
    else:
        from trl_sgpo.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype)
        name = args.model or "SmolLM2-135M-Instruct (embedded default)"
    model.to(args.device).eval()
    prompts, completions = make_pairs(args.rows, args.prompt_words, args.answer_words)
    tokens = sum(
        len(p) + len(c)
        for p, c in (_encode(tokenizer, p, c, args.max_length) for p, c in zip(prompts, completions, strict=True))
    )

    # Warm-up (allocator, kernels) on a slice, then the measured runs, interleaved and repeated: the best time of each
    # method is kept, so a burst of load from another process on a shared machine does not decide the ratio.
    completion_nll(model, tokenizer, prompts[:4], completions[:4], batch_size=4, max_length=args.max_length)
    plain_forward(model, tokenizer, prompts[:4], completions[:4], 4, args.max_length)
    t_filter = t_plain = float("inf")
    for _ in range(args.repeats):
        filtered, t = timed(
            lambda: completion_nll(
                model, tokenizer, prompts, completions, batch_size=args.batch_size, max_length=args.max_length
            ),
            args.device,
        )
        t_filter = min(t_filter, t)
        plain, t = timed(
            lambda: plain_forward(model, tokenizer, prompts, completions, args.batch_size, args.max_length),
            args.device,
        )
        t_plain = min(t_plain, t)
    worst = max(abs(a[0] / a[1] - b[0] / b[1]) for a, b in zip(filtered, plain, strict=True))

    print(f"model: {name}, {args.dtype} on {args.device}, {torch.get_num_threads()} CPU threads")
    print(
        f"workload: {args.rows} rows = {len(prompts)} sequences, {tokens} tokens, batch {args.batch_size}, "
        f"best of {args.repeats}"
    )
    print(f"perplexity filter: {tokens / t_filter:,.0f} tokens/s ({t_filter:.2f}s)")
    print(f"plain forward:     {tokens / t_plain:,.0f} tokens/s ({t_plain:.2f}s)")
    print(f"ratio filter/plain: {t_plain / t_filter:.2f}x (max |mean NLL difference| {worst:.1e})")
    print(f"peak resident memory: {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
