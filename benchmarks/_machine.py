"""What every benchmark prints first: the machine its figures come from."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine(threads: int | None = None) -> str:
    """CPU model and the threads (or cores) the figures used."""
    count = f"{threads} threads" if threads is not None else f"{os.cpu_count()} cores"
    return f"{cpu_model()}, {count}"
