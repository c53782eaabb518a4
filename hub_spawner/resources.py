"""User-facing resource choices: validation and normalisation.

Requirements:
- one place decides what a user may ask for, whether it came from the spawn form or straight
  from the REST API (``user_options``);
- a value is either normalised into ``Resources`` or rejected with a ``ValueError`` whose message
  names the option, says what was wrong and what to give instead; nothing that fails here
  reaches a scheduler. That holds for *any* JSON value (wrong types, huge numbers, 10 kB
  strings, NaN): no other exception escapes, and a message quotes at most 40 characters of it;
- every string that survives contains only ``[A-Za-z0-9_.-]``, so it is safe in a ``#SBATCH``
  directive and needs no shell quoting (it is quoted anyway where a shell sees it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Every pattern is used with ``fullmatch``: the whole value must match (``$`` alone would let a
# trailing newline through). Digit counts are bounded so that no number can grow large.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_WHOLE_NUMBER = re.compile(r"[0-9]{1,6}")
_MEMORY = re.compile(r"([0-9]{1,9})(?:\.([0-9]{1,3}))? ?([MGTmgt]?)[Bb]?")
_WALLTIME = re.compile(r"(?:([0-9]{1,3})-)?([0-9]{1,6})(?::([0-9]{1,2}))?(?::([0-9]{1,2}))?")

OPTION_NAMES = ("partition", "cpus", "memory", "gpus", "walltime", "account")


class OptionError(ValueError):
    """A bad option; ``field`` names it (``"cpus"``; ``""`` when no one option is to blame)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


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


def resources_from_options(options: Any, limits: Limits) -> Resources:
    """Validate ``user_options`` against ``limits``; missing options take the defaults.

    Guarantees, for any JSON value (the REST API passes the request body through): the result
    is a ``Resources`` or an ``OptionError`` (a ``ValueError``; ``field`` names the option)
    whose message names the first bad option and says what to give instead; never another
    exception. Values are taken exactly as given (the form
    strips its own fields first): ``"debug\\n"`` is refused, not trimmed. A missing option,
    ``None`` or ``""`` means the default.
    """
    if not isinstance(options, dict):
        raise OptionError(
            "",
            f"The server options must be a JSON object ({{\"cpus\": 2, ...}}), not "
            f"{_json_type(options)}."
        )
    unknown = sorted(str(name) for name in set(options) - set(OPTION_NAMES))
    if unknown:
        raise OptionError(
            "",
            f"Unknown option {_shown(unknown[0])}. Known options: {', '.join(OPTION_NAMES)}."
        )

    def given(name: str) -> Any:
        value = options.get(name)
        return None if value is None or value == "" else value

    def checked(name: str, parse: Any, *args: Any) -> Any:
        try:
            return parse(*args)
        except ValueError as error:
            raise OptionError(name, str(error)) from None

    partition = checked(
        "partition", parse_name, "partition", _or(given("partition"), limits.default_partition)
    )
    if partition and limits.partitions and partition not in limits.partitions:
        raise OptionError(
            "partition",
            f"Partition {partition!r} is not offered here. Choose one of: "
            f"{', '.join(limits.partitions)}.",
        )
    cpus = given("cpus")
    cpus = checked("cpus", parse_cpus, limits.default_cpus if cpus is None else cpus,
                   limits.max_cpus)
    memory = given("memory")
    memory_mb = (
        limits.default_memory_mb
        if memory is None
        else checked("memory", parse_memory_mb, memory, limits.max_memory_mb)
    )
    walltime = given("walltime")
    walltime_seconds = (
        limits.default_walltime_seconds
        if walltime is None
        else checked("walltime", parse_walltime_seconds, walltime, limits.max_walltime_seconds)
    )
    account = checked(
        "account", parse_name, "account", _or(given("account"), limits.default_account)
    )
    gpus = given("gpus")
    gpus = (
        limits.default_gpus if gpus is None
        else checked("gpus", parse_gpus, gpus, limits.max_gpus)
    )
    return Resources(partition, cpus, memory_mb, walltime_seconds, account, gpus)


def parse_name(label: str, value: Any) -> str:
    """A partition, queue or account name: letters, digits, ``_.-``, at most 64 characters,
    starting with a letter or digit; ``""`` allowed. Anything else (another JSON type, a
    newline, a leading ``-``) is a ``ValueError`` naming ``label``."""
    if not isinstance(value, str):
        raise ValueError(
            f"The {label} must be a name such as 'debug' (text), not {_json_type(value)}."
        )
    if value and not _NAME.fullmatch(value):
        raise ValueError(
            f"The {label} {_shown(value)} is not a valid name: use letters, digits, '_', '.' "
            "or '-' (at most 64 characters, starting with a letter or digit)."
        )
    return value


def parse_cpus(value: Any, max_cpus: int) -> int:
    """A whole number of cores between 1 and ``max_cpus`` (a JSON integer or its digits)."""
    cpus = _whole_number("Cores", value)
    if not 1 <= cpus <= max_cpus:
        raise ValueError(f"Cores must be between 1 and {max_cpus}, not {cpus}.")
    return cpus


def parse_gpus(value: Any, max_gpus: int) -> int:
    """A whole number of GPUs between 0 and ``max_gpus`` (a JSON integer or its digits)."""
    gpus = _whole_number("GPUs", value)
    if gpus and not max_gpus:
        raise ValueError("GPUs are not offered here; ask for 0 GPUs or leave the field empty.")
    if not 0 <= gpus <= max_gpus:
        raise ValueError(f"GPUs must be between 0 and {max_gpus}, not {gpus}.")
    return gpus


def parse_memory_mb(value: Any, max_memory_mb: int) -> int:
    """Memory as ``4``/``4G`` (GB), ``512M``, ``1.5G`` or ``1T``, in whole megabytes, at most
    the limit. A JSON integer counts GB. At most 9 digits before and 3 after the point, so the
    arithmetic is exact and bounded (no ``inf``, no ``OverflowError``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(
            f"Memory must be text such as '4G' or '512M', not {_json_type(value)}."
        )
    match = _MEMORY.fullmatch(value)
    if not match:
        raise ValueError(
            f"Memory {_shown(value)} is not understood: give GB as a number (4), or 4G, 512M."
        )
    whole, fraction, unit = match.group(1), match.group(2) or "", (match.group(3) or "G")
    per_unit = {"M": 1, "G": 1024, "T": 1024 * 1024}[unit.upper()]
    thousandths = int(whole) * 1000 + int(fraction.ljust(3, "0"))
    memory_mb = thousandths * per_unit // 1000
    if memory_mb < 1:
        raise ValueError(f"Memory {value!r} is too small: ask for at least 1M.")
    if memory_mb > max_memory_mb:
        raise ValueError(
            f"Memory {value!r} is more than the {_megabytes(max_memory_mb)} allowed here."
        )
    return memory_mb


def parse_walltime_seconds(value: Any, max_seconds: int) -> int:
    """Walltime as ``HH:MM:SS``, ``HH:MM``, ``D-HH:MM:SS`` or whole minutes (a JSON integer
    counts minutes), in seconds.

    Guarantees: 0 < result <= ``max_seconds``; at most 3 digits of days and 6 of the first
    field, so the number stays small whatever was sent.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ValueError(
            f"Walltime must be text such as '08:00:00', not {_json_type(value)}."
        )
    match = _WALLTIME.fullmatch(value)
    if not match:
        raise ValueError(
            f"Walltime {_shown(value)} is not understood: give HH:MM:SS, HH:MM, D-HH:MM:SS or "
            "minutes."
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
            f"Walltime {value!r} is longer than the {format_walltime(max_seconds)} allowed here."
        )
    return seconds


def format_walltime(seconds: int) -> str:
    """``HH:MM:SS`` with hours unbounded (``36:00:00``), as Torque and Grid Engine want it."""
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


def _whole_number(label: str, value: Any) -> int:
    """A JSON integer, or a string of at most 6 ASCII digits; ``ValueError`` naming ``label``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= 10**6:
            raise ValueError(f"{label} must be a whole number of at most 6 digits.")
        return value
    if isinstance(value, str) and _WHOLE_NUMBER.fullmatch(value):
        return int(value)
    shown = _shown(value) if isinstance(value, str) else _json_type(value)
    raise ValueError(f"{label} must be a whole number, not {shown}.")


def _megabytes(memory_mb: int) -> str:
    return f"{memory_mb / 1024:g} GB" if memory_mb >= 1024 else f"{memory_mb} MB"


def _or(value: Any, default: str) -> Any:
    return default if value is None else value


def _shown(text: str, limit: int = 40) -> str:
    """``text`` for a message: quoted, escaped, and cut to ``limit`` characters."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _json_type(value: Any) -> str:
    """What a JSON value is, for messages (``a list``, ``true``, ``a number``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {value!r}" if len(repr(value)) <= 20 else "a number"
    if isinstance(value, str):
        return f"the text {_shown(value)}"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"
