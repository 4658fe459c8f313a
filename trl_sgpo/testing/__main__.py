"""``python -m trl_sgpo.testing --latency 0.05``: serve the OpenAI-compatible stub in its own process."""

from .openai_stub import main

main()
