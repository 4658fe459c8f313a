"""Small trainer configs and prompt sets shared by the trainer tests (SGPO, the on-policy base, SPPO, SSO)."""

from datasets import Dataset


def chat_prompts(n: int) -> Dataset:
    """``n`` one-turn chat prompts ("What is i plus i?")."""
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(n)]})


def tiny_config(config_class, tmp_path, **overrides):
    """``config_class`` with settings for tiny CPU runs (no saving, no reporting, 6 new tokens); ``overrides`` win."""
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 2,
        "max_new_tokens": 6,
        "report_to": "none",
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": 0,
    }
    return config_class(**{**defaults, **overrides})
