"""trl-sgpo: Self-Generated Preference Optimization (arXiv 2507.20181) for Hugging Face TRL.

``SGPOTrainer`` subclasses TRL's experimental ``OnlineDPOTrainer``; importing it emits TRL's
``TRLExperimentalWarning`` unless ``TRL_EXPERIMENTAL_SILENCE=1`` is set (the ``trl-sgpo`` command and the recipe set
it: their users never import ``trl.experimental`` themselves, and the version pin covers the instability).
"""

import importlib
from typing import TYPE_CHECKING


__version__ = "0.1.0.dev0"

# Public names and their modules. Imported on first use so that `trl-sgpo --help` and `trl_sgpo.templates` do not pay
# for torch, transformers and TRL.
_EXPORTS = {
    "DataCollatorForImproverTargets": "trainers.collators",
    "ImproverSFTConfig": "trainers.improver_sft_config",
    "ImproverSFTTrainer": "trainers.improver_sft_trainer",
    "DEFAULT_MODEL": "models",
    "default_model_path": "models",
    "load_model_and_tokenizer": "models",
    "OnPolicyConfig": "trainers.onpolicy",
    "OnPolicyTrainer": "trainers.onpolicy",
    "SGPOConfig": "trainers.sgpo_config",
    "SGPOTrainer": "trainers.sgpo_trainer",
    "SPPOConfig": "trainers.sppo_config",
    "SPPOTrainer": "trainers.sppo_trainer",
    "SSOConfig": "trainers.sso_config",
    "SSOTrainer": "trainers.sso_trainer",
    "DEFAULT_INSTRUCTION": "templates",
    "ImproverTemplate": "templates",
    "improver_prompt": "templates",
    "improver_template_for": "templates",
    "render_prompt": "templates",
    "save_improver_template": "templates",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .models import DEFAULT_MODEL, default_model_path, load_model_and_tokenizer
    from .templates import (
        DEFAULT_INSTRUCTION,
        ImproverTemplate,
        improver_prompt,
        improver_template_for,
        render_prompt,
        save_improver_template,
    )
    from .trainers.collators import DataCollatorForImproverTargets
    from .trainers.improver_sft_config import ImproverSFTConfig
    from .trainers.improver_sft_trainer import ImproverSFTTrainer
    from .trainers.onpolicy import OnPolicyConfig, OnPolicyTrainer
    from .trainers.sgpo_config import SGPOConfig
    from .trainers.sgpo_trainer import SGPOTrainer
    from .trainers.sppo_config import SPPOConfig
    from .trainers.sppo_trainer import SPPOTrainer
    from .trainers.sso_config import SSOConfig
    from .trainers.sso_trainer import SSOTrainer


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
