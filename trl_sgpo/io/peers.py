"""How the processes of one ``accelerate launch`` meet: signal files in a folder they all see.

The processes meet through files in the run's folder, which all of them read anyway (stage markers, merged outputs),
rather than through collective calls: a collective waits for a process that failed until ``ddp_timeout`` (30 minutes
by default) and then reports a timeout, not the error. Here a process that fails writes its error into the run's
folder before it raises, and every other process, which looks for such a file between batches and while it waits,
raises :class:`PeerFailedError` with the original message within seconds.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list


class PeerFailedError(RuntimeError):
    """Another process of the run failed; the message is its error."""


class Peers:
    """The processes of one run, meeting through signal files in ``<root>/<run>/``.

    Args:
        root: A folder every process sees (the recipe's ``<output_dir>/.sync``).
        state: The run's :class:`~accelerate.PartialState`.
        poll_seconds: How often a waiting process looks for the signals it waits for, and for failures.
    """

    def __init__(self, root: Path, state: PartialState, poll_seconds: float = 0.5):
        self.index, self.count, self.poll_seconds = state.process_index, state.num_processes, poll_seconds
        # One folder per run, named by the main process, so that no process reads the signals of an earlier run.
        run = [uuid.uuid4().hex[:12] if state.is_main_process else None]
        if state.use_distributed:
            broadcast_object_list(run)
        self.folder = Path(root) / run[0]
        if state.is_main_process and Path(root).is_dir():
            for old in Path(root).iterdir():
                if old != self.folder:
                    shutil.rmtree(old, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)

    def signal(self, name: str) -> None:
        """Tell the others that this process reached ``name``."""
        (self.folder / f"{name}.{self.index}").touch()

    def check(self) -> None:
        """Raise :class:`PeerFailedError` when another process failed."""
        for failed in sorted(self.folder.glob("failed.*")):
            if failed.suffix != f".{self.index}":
                raise PeerFailedError(failed.read_text(encoding="utf-8"))

    def wait(self, name: str, processes: list[int] | None = None) -> None:
        """Wait until ``processes`` (default: all) reached ``name``, raising as soon as one of them failed."""
        pending = list(range(self.count) if processes is None else processes)
        while True:
            self.check()
            pending = [p for p in pending if not (self.folder / f"{name}.{p}").exists()]
            if not pending:
                return
            time.sleep(self.poll_seconds)

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Record an error raised in the block for the other processes (which then stop too), and raise it here."""
        try:
            yield
        except PeerFailedError:
            raise
        except BaseException as e:
            message = f"process {self.index} of {self.count} failed in {what}: {type(e).__name__}: {e}"
            (self.folder / f"failed.{self.index}").write_text(message, encoding="utf-8")
            raise
