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
