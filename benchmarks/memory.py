"""Resident-memory probes shared by the benchmark scripts (Linux ``/proc``; ``ru_maxrss`` elsewhere)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
from pathlib import Path


def rss_mb(key: str) -> float:
    """``VmRSS`` (current) or ``VmHWM`` (peak since the last reset) in MB; else ``ru_maxrss``."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); silently a no-op elsewhere."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def settle() -> float:
    """Free what can be freed, reset the peak-RSS counter and return the current RSS in MB."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, so they are not reused unseen
    reset_peak()
    return rss_mb("VmRSS")
