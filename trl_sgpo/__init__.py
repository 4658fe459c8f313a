"""trl-sgpo: Self-Generated Preference Optimization (arXiv 2507.20181) for Hugging Face TRL.

``SGPOTrainer`` subclasses TRL's experimental ``OnlineDPOTrainer``; importing it emits TRL's
``TRLExperimentalWarning`` unless ``TRL_EXPERIMENTAL_SILENCE=1`` is set.
"""

__version__ = "0.1.0.dev0"

from .collators import DataCollatorForImproverTargets
from .improver_sft_config import ImproverSFTConfig
from .improver_sft_trainer import ImproverSFTTrainer
from .models import DEFAULT_MODEL, default_model_path, load_model_and_tokenizer
from .sgpo_config import SGPOConfig
from .sgpo_trainer import SGPOTrainer
from .templates import DEFAULT_INSTRUCTION, ImproverTemplate, improver_prompt, render_prompt

__all__ = [
    "DEFAULT_INSTRUCTION",
    "DEFAULT_MODEL",
    "DataCollatorForImproverTargets",
    "ImproverSFTConfig",
    "ImproverSFTTrainer",
    "ImproverTemplate",
    "SGPOConfig",
    "SGPOTrainer",
    "default_model_path",
    "improver_prompt",
    "load_model_and_tokenizer",
    "render_prompt",
]
