"""What a user may choose on a cluster: partitions (with descriptions, limits and the groups that
see them), named presets and accounts, resolved per user from the admin's declarative config;
and the one-line profile summary the admin page shows.

Requirements:
- pure: the admin's config (plain lists and dicts, as in ``jupyterhub_config.py``) and the user's
  JupyterHub groups in, frozen values out; a bad config value is a ``ValueError`` that names the
  setting and the key;
- a user never sees, and can never ask for, a partition, preset or account that is not offered
  to their groups (the REST API is checked exactly like the form);
- every bad option is an ``OptionError`` naming the option (``field``), so the form can show the
  message next to it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .resources import (
    OPTION_NAMES,
    Limits,
    OptionError,
    Resources,
    parse_memory_mb,
    parse_name,
    parse_walltime_seconds,
    resources_from_options,
)

#: Options of ``user_options`` besides the resources: the preset chosen, and the summary (which
#: the spawner writes, and ignores when given).
EXTRA_OPTION_NAMES = ("preset", "profile", "cluster")

#: The limit settings a partition or a group may override, as in the spawner's traits.
LIMIT_SETTINGS = (
    "default_cpus",
    "max_cpus",
    "default_memory",
    "max_memory",
    "default_gpus",
    "max_gpus",
    "default_walltime",
    "max_walltime",
)

_PRESET_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HUGE = 1 << 40


@dataclass(frozen=True)
class Partition:
    """A partition (queue) offered to the user, with the limits that hold when it is chosen."""

    name: str
    description: str
    limits: Limits


@dataclass(frozen=True)
class Preset:
    """A named set of resources ("Small: 1 core, 4 GB, 8 h"); ``options`` are resource options
    as ``user_options`` holds them (validated when used)."""

    key: str
    title: str
    description: str
    options: Mapping[str, Any]


@dataclass(frozen=True)
class Account:
    """An account users may charge."""

    name: str
    description: str


@dataclass(frozen=True)
class Choices:
    """Everything one user may choose on one cluster.

    ``limits`` hold when no partition is listed (any valid name may be typed) or for the
    default partition; ``partitions`` empty means "free text"; ``accounts`` likewise.
    """

    limits: Limits
    partitions: tuple[Partition, ...] = ()
    presets: tuple[Preset, ...] = ()
    accounts: tuple[Account, ...] = ()

    def limits_for(self, partition: str) -> Limits:
        """The limits when ``partition`` is chosen (the user's own limits if it is not listed)."""
        for offered in self.partitions:
            if offered.name == partition:
                return offered.limits
        return self.limits

    def preset(self, key: str) -> Preset | None:
        return next((p for p in self.presets if p.key == key), None)


@dataclass(frozen=True)
class Request:
    """A validated request: the resources, the preset it came from, and its summary."""

    resources: Resources
    preset: Preset | None
    summary: str

    def to_user_options(self) -> dict[str, Any]:
        """What ``user_options`` holds after validation (round-trips through ``resolve``)."""
        options = self.resources.to_user_options()
        options["preset"] = self.preset.key if self.preset else ""
        options["profile"] = self.summary
        return options


def choices_for(
    base: Limits,
    groups: Iterable[str],
    *,
    partitions: Iterable[str | Mapping[str, Any]] = (),
    presets: Iterable[Mapping[str, Any]] = (),
    accounts: Iterable[str | Mapping[str, Any]] = (),
    group_limits: Mapping[str, Mapping[str, Any]] | None = None,
) -> Choices:
    """The choices of a user in ``groups`` (JupyterHub group names).

    ``base`` comes from the spawner's own limit traits. ``group_limits`` (group -> limit
    settings) replace them for members; when several of the user's groups set one key, the
    largest value wins. A partition's own settings win over both. A partition, preset or
    account with ``groups`` is offered only to members of one of them. Raises ``ValueError``
    for a bad setting, naming it.
    """
    groups = set(groups)
    limits = _with_group_limits(base, groups, group_limits or {})
    offered_accounts = tuple(
        account for entry in accounts if (account := _account(entry, groups)) is not None
    )
    if offered_accounts and limits.default_account not in {a.name for a in offered_accounts}:
        limits = dataclasses.replace(limits, default_account=offered_accounts[0].name)
    partitions = list(partitions)
    offered = tuple(
        partition
        for entry in partitions
        if (partition := _partition(entry, limits, groups)) is not None
    )
    configured = list(partitions)
    if configured and not offered:
        raise ValueError(
            "No partition here is offered to your groups; ask the hub's admins for access."
        )
    default_partition = limits.default_partition
    if offered and default_partition not in {p.name for p in offered}:
        default_partition = offered[0].name  # the configured default is not this user's
    names = tuple(p.name for p in offered)
    limits = dataclasses.replace(limits, default_partition=default_partition, partitions=names)
    offered = tuple(
        dataclasses.replace(
            p, limits=dataclasses.replace(
                p.limits, default_partition=default_partition, partitions=names)
        )
        for p in offered
    )
    choices = Choices(limits, offered, (), offered_accounts)
    offered_presets = tuple(
        preset for entry in presets if (preset := _preset(entry, groups)) is not None
    )
    choices = dataclasses.replace(choices, presets=offered_presets)
    for preset in offered_presets:  # a preset the limits refuse is the admin's mistake
        try:
            resolve({"preset": preset.key}, choices)
        except ValueError as error:
            raise ValueError(f"Bad spawner setting presets[{preset.key!r}]: {error}") from None
    return choices


def resolve(options: Any, choices: Choices) -> Request:
    """Validate ``user_options`` (from the form or the REST API) against ``choices``.

    A ``preset`` gives the defaults; resource options given beside it override them, within
    the same limits. ``profile`` is ignored (it is recomputed). Raises ``OptionError`` (a
    ``ValueError``) naming the first bad option.
    """
    if not isinstance(options, dict):
        return _as_request(resources_from_options(options, choices.limits), None)
    unknown = sorted(
        str(name) for name in options if name not in OPTION_NAMES + EXTRA_OPTION_NAMES
    )
    if unknown:
        raise OptionError(
            "", f"Unknown option {unknown[0][:40]!r}. Known options: "
            f"{', '.join(OPTION_NAMES + ('preset',))}."
        )
    preset = None
    key = options.get("preset")
    if key not in (None, ""):
        if not isinstance(key, str) or (preset := choices.preset(key)) is None:
            offered = ", ".join(p.key for p in choices.presets) or "none here"
            raise OptionError(
                "preset", f"Preset {str(key)[:40]!r} is not offered to you. Choose one of: "
                f"{offered}; or leave it empty and choose the resources."
            )
    given = {
        name: value for name, value in options.items()
        if name in OPTION_NAMES and value not in (None, "")
    }
    merged = {**(preset.options if preset else {}), **given}
    partition = merged.get("partition") or choices.limits.default_partition
    if isinstance(partition, str) and choices.partitions and partition not in {
        p.name for p in choices.partitions
    }:
        raise OptionError(
            "partition", f"Partition {partition[:40]!r} is not offered to you. Choose one of: "
            f"{', '.join(p.name for p in choices.partitions)}."
        )
    limits = choices.limits_for(partition if isinstance(partition, str) else "")
    if choices.accounts:
        account = merged.get("account") or limits.default_account
        if not isinstance(account, str) or account not in {a.name for a in choices.accounts}:
            raise OptionError(
                "account", f"Account {str(account)[:40]!r} is not offered to you. Choose one "
                f"of: {', '.join(a.name for a in choices.accounts)}."
            )
    resources = resources_from_options(merged, limits)
    if preset is not None:
        from_preset = resources_from_options(dict(preset.options), limits)
        if from_preset != resources:  # the user changed something: say what they have
            preset = None
    return _as_request(resources, preset)


def summary(resources: Resources) -> str:
    """``debug · 2 cores · 4 GB · 8 h`` (GPUs and account when asked for)."""
    parts = [resources.partition or "default partition"]
    parts.append(f"{resources.cpus} core{'s' if resources.cpus != 1 else ''}")
    if resources.gpus:
        parts.append(f"{resources.gpus} GPU{'s' if resources.gpus != 1 else ''}")
    if resources.memory_mb:
        parts.append(format_memory(resources.memory_mb))
    if resources.walltime_seconds:
        parts.append(format_duration(resources.walltime_seconds))
    if resources.account:
        parts.append(f"account {resources.account}")
    return " · ".join(parts)


def format_memory(memory_mb: int) -> str:
    """``512 MB``, ``4 GB``, ``1.5 GB``, ``2 TB``."""
    if memory_mb % (1024 * 1024) == 0:
        return f"{memory_mb // (1024 * 1024)} TB"
    if memory_mb >= 1024 and memory_mb * 10 % 1024 == 0:
        return f"{memory_mb / 1024:g} GB"
    return f"{memory_mb} MB"


def format_duration(seconds: int) -> str:
    """``8 h``, ``1 h 30 min``, ``2 d``, ``1 d 12 h``, ``45 min``."""
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    parts = [f"{days} d"] if days else []
    if hours:
        parts.append(f"{hours} h")
    if minutes or not parts:
        parts.append(f"{minutes} min")
    return " ".join(parts)


def _as_request(resources: Resources, preset: Preset | None) -> Request:
    return Request(resources, preset, preset.title if preset else summary(resources))


def _with_group_limits(
    base: Limits, groups: set[str], group_limits: Mapping[str, Mapping[str, Any]]
) -> Limits:
    chosen: dict[str, int] = {}
    for group in sorted(group_limits):
        settings = group_limits[group]
        if not isinstance(settings, Mapping):
            raise ValueError(f"Bad spawner setting group_limits[{group!r}]: not a dict")
        overrides = _limit_overrides(settings, base, f"group_limits[{group!r}]")  # all checked
        if group in groups:
            for name, value in overrides.items():
                chosen[name] = max(value, chosen.get(name, value))
    return dataclasses.replace(base, **chosen)


def _limit_overrides(settings: Mapping[str, Any], base: Limits, where: str) -> dict[str, int]:
    """``Limits`` field values from limit settings (``max_memory: "64G"`` ...)."""
    overrides: dict[str, int] = {}
    for key, value in settings.items():
        if key not in LIMIT_SETTINGS:
            continue
        try:
            if key.endswith("_memory"):
                overrides[f"{key}_mb"] = parse_memory_mb(value, _HUGE) if value else 0
            elif key.endswith("_walltime"):
                overrides[f"{key}_seconds"] = parse_walltime_seconds(value, _HUGE)
            elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                overrides[key] = value
            else:
                raise ValueError(f"{value!r} is not a whole number")
        except ValueError as error:
            raise ValueError(f"Bad spawner setting {where}[{key!r}]: {error}") from None
    return overrides


def _partition(
    entry: str | Mapping[str, Any], limits: Limits, groups: set[str]
) -> Partition | None:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, Mapping):
        raise ValueError(f"Bad spawner setting partitions: {entry!r} is not a name or a dict")
    name = _setting_name("partitions", entry)
    where = f"partitions[{name!r}]"
    _check_keys(entry, where, {"name", "description", "groups", *LIMIT_SETTINGS})
    if not _visible(entry, groups, where):
        return None
    own = dataclasses.replace(limits, **_limit_overrides(entry, limits, where))
    return Partition(name, _text(entry, "description", where), own)


def _preset(entry: Mapping[str, Any], groups: set[str]) -> Preset | None:
    if not isinstance(entry, Mapping):
        raise ValueError(f"Bad spawner setting presets: {entry!r} is not a dict")
    key = entry.get("name")
    if not isinstance(key, str) or not _PRESET_KEY.fullmatch(key):
        raise ValueError(
            f"Bad spawner setting presets: each preset needs a 'name' of letters, digits, "
            f"'_.-' (got {key!r})"
        )
    where = f"presets[{key!r}]"
    _check_keys(entry, where, {"name", "display_name", "description", "groups", *OPTION_NAMES})
    if not _visible(entry, groups, where):
        return None
    options = {name: entry[name] for name in OPTION_NAMES if entry.get(name) not in (None, "")}
    return Preset(
        key, _text(entry, "display_name", where) or key, _text(entry, "description", where),
        options,
    )


def _account(entry: str | Mapping[str, Any], groups: set[str]) -> Account | None:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, Mapping):
        raise ValueError(f"Bad spawner setting accounts: {entry!r} is not a name or a dict")
    name = _setting_name("accounts", entry)
    where = f"accounts[{name!r}]"
    _check_keys(entry, where, {"name", "description", "groups"})
    if not _visible(entry, groups, where):
        return None
    return Account(name, _text(entry, "description", where))


def _setting_name(setting: str, entry: Mapping[str, Any]) -> str:
    try:
        name = parse_name(setting, entry.get("name"))
    except ValueError as error:
        raise ValueError(f"Bad spawner setting {setting}: {error}") from None
    if not name:
        raise ValueError(f"Bad spawner setting {setting}: an entry has no 'name'")
    return name


def _check_keys(entry: Mapping[str, Any], where: str, known: set[str]) -> None:
    unknown = sorted(str(key) for key in entry if key not in known)
    if unknown:
        raise ValueError(
            f"Bad spawner setting {where}: unknown key {unknown[0]!r} (known: "
            f"{', '.join(sorted(known))})"
        )


def _visible(entry: Mapping[str, Any], groups: set[str], where: str) -> bool:
    allowed = entry.get("groups") or []
    if not isinstance(allowed, (list, tuple, set)) or not all(
        isinstance(g, str) for g in allowed
    ):
        raise ValueError(f"Bad spawner setting {where}['groups']: not a list of group names")
    return not allowed or bool(groups & set(allowed))


def _text(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry.get(key) or ""
    if not isinstance(value, str):
        raise ValueError(f"Bad spawner setting {where}[{key!r}]: not text")
    return value
