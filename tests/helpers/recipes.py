"""The recipes under ``recipes/`` as modules: scripts, not part of the package."""

import importlib.util
from pathlib import Path


RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def load_recipe(name: str):
    """``recipes/<name>.py`` loaded as a fresh module (``sgpo`` or ``compare``)."""
    spec = importlib.util.spec_from_file_location(f"{name}_recipe", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
