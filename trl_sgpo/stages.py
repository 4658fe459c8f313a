"""Stage folders of the SGPO pipeline: skip a finished stage, resume an interrupted one, refuse a foreign one.

Each stage writes into its own folder and keeps a ``stage.json`` there holding the settings it runs with and
whether it finished. A rerun with the same settings skips finished stages and resumes unfinished ones (the stage
functions resume from their own outputs and checkpoints); a rerun with different settings stops with an error that
names the settings that differ, rather than mixing the outputs of two configurations.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARKER = "stage.json"


class StageConfigMismatchError(ValueError):
    """A stage folder was written with other settings than the ones of this run."""


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str, sort_keys=True))


@dataclass
class Stage:
    """One stage's folder and marker.

    Args:
        root: The stage folder.
        name: Human-readable stage name (used in messages).
        settings: Everything that determines the stage's output. Compared on rerun.
    """

    root: Path
    name: str
    settings: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root)
        self.settings = _jsonable(self.settings)

    @property
    def marker(self) -> Path:
        return self.root / MARKER

    def _read(self) -> dict[str, Any] | None:
        if not self.marker.is_file():
            return None
        with open(self.marker, encoding="utf-8") as f:
            return json.load(f)

    def _write(self, done: bool) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.marker.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"stage": self.name, "done": done, "settings": self.settings, "summary": self.summary}, f, indent=2)
        os.replace(tmp, self.marker)

    def check(self) -> bool:
        """Return whether the stage already finished with these settings; raise if it ran with others."""
        previous = self._read()
        if previous is None:
            return False
        old = previous.get("settings", {})
        differ = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
        if differ:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {self.settings.get(k)!r}" for k in differ[:8])
            raise StageConfigMismatchError(
                f"The folder {self.root} holds the '{self.name}' stage of a run with other settings ({details}). "
                f"Use another --output_dir, or delete {self.root} to redo this stage and the ones after it."
            )
        if previous.get("done"):
            self.summary = previous.get("summary", {})
            return True
        return False

    def start(self) -> float:
        self._write(done=False)
        return time.perf_counter()

    def finish(self, started: float, **summary: Any) -> None:
        self.summary = _jsonable({**summary, "seconds": round(time.perf_counter() - started, 1)})
        self._write(done=True)
