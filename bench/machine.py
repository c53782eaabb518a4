"""The machine a benchmark ran on, in one line for bench/RESULTS.md."""

from __future__ import annotations

import os
import platform
import subprocess


def describe() -> str:
    """``machine: N cores, CPU model, platform``."""
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
                         capture_output=True, text=True).stdout.strip()
    return f"machine: {os.cpu_count()} cores, {cpu}, {platform.platform()}"
