"""Data stages and their helpers: dataset checks, resumable JSONL, policy sampling, target prompts and writers, and the
perplexity filter. ``sgpo_default.jsonl`` is the prompt/reference set shipped with the package."""
