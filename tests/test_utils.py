"""CPU defaults: no bf16 error without an accelerator, and every available core used by a CPU run."""

import os

import pytest
import torch

from trl_sgpo import ImproverSFTConfig, SGPOConfig, utils


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_configs_default_to_cpu_without_bf16(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, "has_accelerator", lambda: False)
    for config_class in (SGPOConfig, ImproverSFTConfig):
        args = config_class(str(tmp_path), report_to="none")
        assert args.use_cpu and not args.bf16
        assert config_class(str(tmp_path), report_to="none", bf16=False).bf16 is False


def test_cpu_threads_undo_accelerates_single_thread_pin(monkeypatch, restore_threads):
    monkeypatch.setattr(utils, "has_accelerator", lambda: False)
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(1)  # what `accelerate launch` leaves a single process with
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert utils.set_cpu_threads() == cores and torch.get_num_threads() == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))  # more processes than cores: one thread each
    assert utils.set_cpu_threads() == 1 and torch.get_num_threads() == 1
    assert utils.set_cpu_threads(3) == 3 and torch.get_num_threads() == 3
    with pytest.raises(ValueError, match="num_threads"):
        utils.set_cpu_threads(0)


def test_cpu_threads_leave_an_accelerator_run_alone(monkeypatch, restore_threads):
    monkeypatch.setattr(utils, "has_accelerator", lambda: True)
    torch.set_num_threads(1)
    assert utils.set_cpu_threads() is None and torch.get_num_threads() == 1


def test_heap_tuning_sets_the_threshold_unless_the_user_tunes_malloc(monkeypatch):
    from trl_sgpo.pipeline import memory

    calls = []

    class FakeGlibc:
        def mallopt(self, option, value):
            calls.append(("mallopt", option, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("malloc_trim", pad))

    monkeypatch.setattr(memory, "_glibc", lambda: FakeGlibc())
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert memory.limit_heap_fragmentation() is True
    memory.TrimHeapCallback().on_step_end(None, None, None)
    assert calls == [("mallopt", -3, 8 * 1024 * 1024), ("malloc_trim", 0)]
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert memory.limit_heap_fragmentation() is False and len(calls) == 2  # the user's tuning wins
    monkeypatch.setattr(memory, "_glibc", lambda: None)  # macOS, musl
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert memory.limit_heap_fragmentation() is False
    memory.trim_heap()
