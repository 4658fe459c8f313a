"""The improver data, stages 1-3: policy answers (``sampling``), target prompts and writers (``target_prompts``,
``target_writers``), the perplexity filter (``perplexity``), with dataset checks (``checks``) and the held-out split
(``splits``). The shipped prompt/reference set lives in :mod:`trl_sgpo.resources`, resumable JSONL in
:mod:`trl_sgpo.io`."""
