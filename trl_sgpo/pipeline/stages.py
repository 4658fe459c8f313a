"""Stage folders of the SGPO pipeline: skip a finished stage, resume an interrupted one, refuse a foreign one.

Each stage writes into its own folder and keeps a ``stage.json`` there holding the settings it runs with and
whether it finished. A rerun with the same settings skips finished stages and resumes unfinished ones (the stage
functions resume from their own outputs and checkpoints); a rerun with different settings stops with an error that
names the settings that differ, rather than mixing the outputs of two configurations.

A stage made from another stage's output (``after``) inherits that stage's settings and records which run of it
it was made from. When that stage has been redone since (its folder deleted and run again), the later stage is
stale: it is redone too, so deleting a folder redoes that stage and every stage after it.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import PartialState

from ..io.peers import Peers
from .memory import peak_figures, reset_peak


MARKER = "stage.json"

STAGE_FOLDERS = {
    "sample": "01_sample",
    "targets": "02_targets",
    "filter": "03_filter",
    "improver_sft": "04_improver_sft",
    "sgpo": "05_{method}_iter{iteration}",  # one folder per round of the method (`sgpo` names the rounds of any)
    "evaluation": "06_evaluation",
}
"""Every stage of the recipe, in the order it runs, and its folder under ``<output_dir>/stages/``."""

TRAINING_STAGES = tuple(name for name in STAGE_FOLDERS if name != "evaluation")
"""The stages ``--stop_after`` names and recipe settings are placed in (:mod:`.fingerprints`)."""


def stage_folder(name: str, method: str = "sgpo", iteration: int = 1) -> str:
    """The folder of stage ``name`` (a round's: of ``method``'s round ``iteration``)."""
    return STAGE_FOLDERS[name].format(method=method, iteration=iteration)


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
        after: The stage whose output this one is made from. Its settings are prepended to ``settings``, and its
            run id is recorded, so that redoing it redoes this stage too.
    """

    root: Path
    name: str
    settings: dict[str, Any]
    after: Stage | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    # Identifies one finished run of the stage; set by `finish`, or by `check` when the stage is already done.
    run_id: str | None = field(default=None, init=False)
    stale: bool = field(default=False, init=False)

    def __post_init__(self):
        self.root = Path(self.root)
        self.settings = _jsonable({**(self.after.settings if self.after else {}), **self.settings})

    def _made_from(self) -> dict[str, Any] | None:
        return None if self.after is None else {"stage": self.after.root.name, "run": self.after.run_id}

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
            json.dump(
                {
                    "stage": self.name,
                    "done": done,
                    "run": self.run_id,
                    "after": self._made_from(),
                    "settings": self.settings,
                    "summary": self.summary,
                },
                f,
                indent=2,
            )
        os.replace(tmp, self.marker)

    def check(self) -> bool:
        """Return whether the stage already finished with these settings; raise if it ran with others.

        Returns ``False`` and marks the stage :attr:`stale` when it was made from an earlier run of the ``after``
        stage: :meth:`start` then clears the folder.
        """
        previous = self._read()
        if previous is None:
            return False
        made_from = previous.get("after")
        # Made from another run of the same earlier stage: stale. From another stage: the settings tell.
        if (
            made_from
            and self.after is not None
            and made_from["stage"] == self.after.root.name
            and made_from != self._made_from()
        ):
            self.stale = True
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
            self.run_id = previous.get("run")
            return True
        return False

    def start(self) -> float:
        """Mark the stage as started (main process only); a stale stage's old outputs are removed first."""
        self._write(done=False)
        if self.stale:
            print(f"{self.name}: the {self.after.name} stage it was made from was redone; redoing it", flush=True)
            # The new marker goes first, so that a process reading the folder meanwhile never sees a finished stage.
            for item in self.root.iterdir():
                if item != self.marker:
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
            self.stale = False
        reset_peak()
        return time.perf_counter()

    def finish(self, started: float, **summary: Any) -> None:
        """Mark the stage finished with ``summary``, its seconds and this process's peak memory since :meth:`start`."""
        seconds = round(time.perf_counter() - started, 1)
        self.summary = _jsonable({**summary, "seconds": seconds, **peak_figures()})
        self.run_id = uuid.uuid4().hex[:12]
        self._write(done=True)


@dataclass
class StageOutput:
    """What a finished stage hands on: its summary entry, the stage the next one is made from, its model."""

    key: str
    summary: dict[str, Any]
    stage: Stage | None = None
    model: str | None = None


@contextmanager
def run_stage(
    stage: Stage,
    state: PartialState,
    message: str,
    peers: Peers | None = None,
    merge: Callable[[], dict[str, Any]] | None = None,
) -> Iterator[dict[str, Any] | None]:
    """One stage's bookkeeping on every process around its work (the ``with`` block): skip, start, meet, finish.

    Yields ``None`` when the stage already finished with these settings (the block does nothing); else the main
    process marks it started and prints ``message``, and every process gets the dict the block fills with the stage's
    figures. Once every process left the block, the main process marks the stage finished with those figures and
    ``merge()``'s (which joins the processes' shares), the others read the marker, and freed models are collected.

    The processes meet through ``peers`` (signal files: a process that failed stops the others within seconds, with
    its error) when given, else through collective barriers (the trainers' stages, whose own collectives would wait
    for a failed process anyway).
    """
    if stage.check():
        yield None
        return
    started = stage.start() if state.is_main_process else 0.0
    if state.is_main_process:
        print(message, flush=True)
    _meet(state, peers, f"{stage.root.name}-start", from_main=True)
    figures: dict[str, Any] = {}
    yield figures
    _meet(state, peers, f"{stage.root.name}-work", from_main=False)
    if state.is_main_process:
        stage.finish(started, **figures, **(merge() if merge is not None else {}))
    _meet(state, peers, f"{stage.root.name}-done", from_main=True)
    stage.check()  # the other processes read the summary and run id from the marker
    gc.collect()  # a model holds reference cycles: free it before the next stage loads its own


def _meet(state: PartialState, peers: Peers | None, point: str, from_main: bool) -> None:
    """Wait at ``point``: for the main process (``from_main``), or the main process for every other one."""
    if peers is None:
        state.wait_for_everyone()
    elif from_main:
        if state.is_main_process:
            peers.signal(point)
        peers.wait(point, [0])
    else:
        peers.signal(point)
        if state.is_main_process:
            peers.wait(point)
