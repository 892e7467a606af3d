"""Facts about the machine vaelab runs on, read where they are needed (memory for now; the
hardware detection of the speed options belongs here too)."""

from __future__ import annotations

import os


def available_memory() -> int | None:
    """Bytes of memory a new allocation could still get: MemAvailable of /proc/meminfo where
    present, else the machine's physical memory; None where neither can be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
