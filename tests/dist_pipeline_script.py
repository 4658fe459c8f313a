"""Run by test_distributed.py under `accelerate launch` with 2 CPU processes: the recipe's data stages.

    dist_pipeline_script.py OUT_DIR [FAIL_STAGE] -- RECIPE ARGS...

With FAIL_STAGE `targets`, the main process raises in stage 2 (the target writer), the others do not; with
`evaluation`, it raises in the evaluation stage (which runs on the main process alone). Each process
writes how it ended (`{"time", "error", "raised_at"}`, error None when it finished; `raised_at`, the time the injected
failure was raised, on the failing process) to OUT_DIR/rank<k>.exit before exiting. A
failed main process waits (at most 60 s) for the others' files first: torchrun ends the others as soon as one process
exits, and the test wants to see them end on their own.
"""

import json
import os
import sys
import time
import traceback
from pathlib import Path

from helpers.recipes import load_recipe


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


class InjectedFailure(RuntimeError):
    def __init__(self, message):
        super().__init__(message)
        # The failure's own time: the pipeline tells the peers before this exception reaches main(), so a peer may
        # write its exit file before the failing process does.
        self.raised_at = time.time()


def main(out_dir: str, fail_stage: str, argv: list[str]) -> None:
    from accelerate import PartialState

    recipe = load_recipe("sgpo")
    args = recipe.parse_args(argv)
    state = PartialState()  # after the arguments: TrainingArguments sets up the processes (use_cpu on CPU)
    if fail_stage == "targets" and state.is_main_process:
        import trl_sgpo.data.target_writers as target_writers

        def broken(*args, **kwargs):
            raise InjectedFailure("injected failure in stage 2 on the main process")

        target_writers.write_targets = broken
    if fail_stage == "evaluation" and state.is_main_process:
        import trl_sgpo.evaluation.compare as compare

        def broken(*args, **kwargs):
            raise InjectedFailure("injected failure in the evaluation stage on the main process")

        compare.evaluate_models = broken
    out = Path(out_dir)
    exit_file = out / f"rank{state.process_index}.exit"
    try:
        recipe.main(*args)
    except BaseException as e:
        end = {"time": time.time(), "error": f"{type(e).__name__}: {e}", "raised_at": getattr(e, "raised_at", None)}
        exit_file.write_text(json.dumps(end))
        traceback.print_exc()
        if state.is_main_process:
            others = [out / f"rank{k}.exit" for k in range(1, state.num_processes)]
            deadline = time.time() + 60
            while time.time() < deadline and not all(p.exists() for p in others):
                time.sleep(0.2)
        raise
    exit_file.write_text(json.dumps({"time": time.time(), "error": None}))


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    split = sys.argv.index("--")
    head = sys.argv[1:split]
    main(head[0], head[1] if len(head) > 1 else "", sys.argv[split + 1 :])
