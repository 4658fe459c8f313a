"""Peak memory of a stage: resident memory of this process (Linux: ``VmHWM``, reset per stage through
``/proc/self/clear_refs``; elsewhere the process-lifetime peak) and, on CUDA, the peak allocated by torch."""

from __future__ import annotations

import functools
import os
import platform
import resource
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak() -> None:
    """Start measuring a new peak (the resident-memory peak only where the OS allows it)."""
    try:
        _CLEAR_REFS.write_text("5")  # "5" resets the peak resident set size (Linux >= 4.0)
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_rss_gb() -> float:
    """Peak resident memory of this process since :func:`reset_peak`, in GB (10^9 bytes)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / 1e9, 2)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return round(peak * (1 if sys.platform == "darwin" else 1024) / 1e9, 2)


def peak_figures() -> dict[str, float]:
    """``peak_rss_gb`` and, on CUDA, ``peak_cuda_gb`` since :func:`reset_peak`."""
    figures = {"peak_rss_gb": peak_rss_gb()}
    if torch.cuda.is_available():
        figures["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return figures


# glibc's malloc raises its mmap threshold each time a large block is freed, so the training step's large, short-lived
# tensors end up in the heap, whose freed pages stay resident and the resident peak grows step after step. A fixed
# 8 MB threshold keeps the largest tensors out of the heap (a smaller one also maps the many mid-sized blocks, which
# slows the step), and trimming after each optimizer step gives the freed heap pages back. Figures: benchmarks/README.md,
# "Heap fragmentation".
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 8 * 1024 * 1024


@functools.cache
def _glibc():
    """glibc through ctypes, or None (macOS, musl, a preloaded jemalloc/tcmalloc would make the calls no-ops)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def limit_heap_fragmentation() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD_BYTES` for this process. False where there is no glibc,
    or where the user tunes malloc already (``MALLOC_MMAP_THRESHOLD_``, ``GLIBC_TUNABLES``): theirs wins."""
    libc = _glibc()
    if libc is None or os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("GLIBC_TUNABLES"):
        return False
    return libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1


def trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``); nothing elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class TrimHeapCallback(TrainerCallback):
    """Calls :func:`trim_heap` after every optimizer step, so the next step's peak starts from live memory."""

    def on_step_end(self, args, state, control, **kwargs):
        trim_heap()
