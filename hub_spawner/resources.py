"""User-facing resource choices: validation and normalisation.

Requirements:
- one place decides what a user may ask for, whether it came from the spawn form or straight
  from the REST API (``user_options``);
- a value is either normalised into ``Resources`` or rejected with a ``ValueError`` whose message
  says what was wrong and what to give instead; nothing that fails here reaches a scheduler;
- every string that survives contains only ``[A-Za-z0-9_.-]``, so it is safe in a ``#SBATCH``
  directive and needs no shell quoting (it is quoted anyway where a shell sees it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MEMORY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([MGT]?)B?\s*$", re.IGNORECASE)
_WALLTIME = re.compile(r"^(?:([0-9]+)-)?([0-9]+)(?::([0-9]{1,2}))?(?::([0-9]{1,2}))?$")

OPTION_NAMES = ("partition", "cpus", "memory", "gpus", "walltime", "account")


@dataclass(frozen=True)
class Limits:
    """What an admin allows; the defaults fill options a user left out."""

    default_partition: str = ""
    partitions: tuple[str, ...] = ()
    default_cpus: int = 1
    max_cpus: int = 64
    default_memory_mb: int = 0
    max_memory_mb: int = 1024 * 1024
    default_gpus: int = 0
    max_gpus: int = 0
    default_walltime_seconds: int = 8 * 3600
    max_walltime_seconds: int = 7 * 24 * 3600
    default_account: str = ""


@dataclass(frozen=True)
class Resources:
    """A validated resource request. ``0``/``""`` means "the scheduler's default"."""

    partition: str = ""
    cpus: int = 1
    memory_mb: int = 0
    walltime_seconds: int = 0
    account: str = ""
    gpus: int = 0

    def to_user_options(self) -> dict[str, Any]:
        """Round-trippable form, as stored in ``user_options``."""
        return {
            "partition": self.partition,
            "cpus": self.cpus,
            "memory": f"{self.memory_mb}M" if self.memory_mb else "",
            "gpus": self.gpus,
            "walltime": format_walltime(self.walltime_seconds) if self.walltime_seconds else "",
            "account": self.account,
        }


def resources_from_options(options: dict[str, Any], limits: Limits) -> Resources:
    """Validate ``user_options`` against ``limits``; missing options take the defaults.

    Raises ``ValueError`` naming the first bad option.
    """
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(
            f"Unknown option {unknown[0]!r}. Known options: {', '.join(OPTION_NAMES)}."
        )
    partition = parse_name("partition", options.get("partition") or limits.default_partition)
    if partition and limits.partitions and partition not in limits.partitions:
        raise ValueError(
            f"Partition {partition!r} is not offered here. Choose one of: "
            f"{', '.join(limits.partitions)}."
        )
    cpus = parse_cpus(options.get("cpus") or limits.default_cpus, limits.max_cpus)
    memory = options.get("memory")
    memory_mb = (
        parse_memory_mb(memory, limits.max_memory_mb) if memory else limits.default_memory_mb
    )
    walltime = options.get("walltime")
    walltime_seconds = (
        parse_walltime_seconds(walltime, limits.max_walltime_seconds)
        if walltime
        else limits.default_walltime_seconds
    )
    account = parse_name("account", options.get("account") or limits.default_account)
    gpus = options.get("gpus")
    gpus = parse_gpus(gpus, limits.max_gpus) if gpus not in (None, "") else limits.default_gpus
    return Resources(partition, cpus, memory_mb, walltime_seconds, account, gpus)


def parse_name(label: str, value: Any) -> str:
    """A partition, queue or account name: letters, digits, ``_.-``; ``""`` allowed."""
    text = str(value).strip()
    if text and not _NAME.match(text):
        raise ValueError(
            f"The {label} {text!r} is not a valid name: use letters, digits, '_', '.' or '-' "
            "(at most 64 characters)."
        )
    return text


def parse_cpus(value: Any, max_cpus: int) -> int:
    """A whole number of cores between 1 and ``max_cpus``."""
    try:
        cpus = int(str(value).strip())
    except ValueError:
        raise ValueError(f"Cores must be a whole number, not {str(value)!r}.") from None
    if not 1 <= cpus <= max_cpus:
        raise ValueError(f"Cores must be between 1 and {max_cpus}, not {cpus}.")
    return cpus


def parse_gpus(value: Any, max_gpus: int) -> int:
    """A whole number of GPUs between 0 and ``max_gpus``."""
    try:
        gpus = int(str(value).strip())
    except ValueError:
        raise ValueError(f"GPUs must be a whole number, not {str(value)!r}.") from None
    if gpus and not max_gpus:
        raise ValueError("GPUs are not offered here; ask for 0 GPUs or leave the field empty.")
    if not 0 <= gpus <= max_gpus:
        raise ValueError(f"GPUs must be between 0 and {max_gpus}, not {gpus}.")
    return gpus


def parse_memory_mb(value: Any, max_memory_mb: int) -> int:
    """Memory as ``4``/``4G`` (GB), ``512M`` or ``1T``, in whole megabytes, at most the limit."""
    match = _MEMORY.match(str(value))
    if not match:
        raise ValueError(
            f"Memory {str(value)!r} is not understood: give GB as a number (4), or 4G, 512M."
        )
    amount, unit = float(match.group(1)), (match.group(2) or "G").upper()
    memory_mb = int(amount * {"M": 1, "G": 1024, "T": 1024 * 1024}[unit])
    if memory_mb < 1:
        raise ValueError(f"Memory {str(value)!r} is too small.")
    if memory_mb > max_memory_mb:
        raise ValueError(
            f"Memory {str(value)!r} is more than the {max_memory_mb // 1024} GB allowed here."
        )
    return memory_mb


def parse_walltime_seconds(value: Any, max_seconds: int) -> int:
    """Walltime as ``HH:MM:SS``, ``HH:MM``, ``D-HH:MM:SS`` or whole minutes, in seconds.

    Guarantees: 0 < result <= ``max_seconds``.
    """
    text = str(value).strip()
    match = _WALLTIME.match(text)
    if not match:
        raise ValueError(
            f"Walltime {text!r} is not understood: give HH:MM:SS, HH:MM, D-HH:MM:SS or minutes."
        )
    days, first, second, third = match.groups()
    if second is None:  # minutes only
        seconds = int(first) * 60
    elif third is None:  # HH:MM
        seconds = int(first) * 3600 + int(second) * 60
    else:
        seconds = int(first) * 3600 + int(second) * 60 + int(third)
    seconds += int(days or 0) * 86400
    if seconds <= 0:
        raise ValueError("Walltime must be longer than zero.")
    if seconds > max_seconds:
        raise ValueError(
            f"Walltime {text!r} is longer than the {format_walltime(max_seconds)} allowed here."
        )
    return seconds


def format_walltime(seconds: int) -> str:
    """``HH:MM:SS`` with hours unbounded (``36:00:00``), as Torque and Grid Engine want it."""
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
