"""The end-to-end recipe: resumable stages (``stages``) chained by ``run.run_pipeline``."""

from .run import SGPOScriptArguments, run_pipeline


__all__ = ["SGPOScriptArguments", "run_pipeline"]
