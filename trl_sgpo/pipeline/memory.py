"""Peak memory of a stage: resident memory of this process (Linux: ``VmHWM``, reset per stage through
``/proc/self/clear_refs``; elsewhere the process-lifetime peak) and, on CUDA, the peak allocated by torch."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch


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
