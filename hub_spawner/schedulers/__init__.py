"""Scheduler knowledge, one module per scheduler.

Each module (``slurm``, ``sge``, ``torque``) is pure: it builds job scripts and command lines
and parses the scheduler's output, and never does I/O. The spawner runs the commands over SSH
and hands the output back to the parsers. The types shared by every scheduler live here.

Every module provides:

- ``NAME``, ``DISPLAY_NAME``, ``QUEUE_LABEL`` (what users call a queue there);
- ``JOB_SCRIPT_TEMPLATE`` (Jinja2) and ``template_variables(resources, settings)``, which maps
  the user-facing ``Resources`` and the admin's scheduler ``settings`` onto the template's
  scheduler-specific variables (raises ``ValueError`` for a request the scheduler cannot take);
- ``submit_command(script_path, output_path)`` and ``parse_submit_output(output)`` (job id, or
  ``SubmitRejected`` with the scheduler's own words);
- ``status_command(job_id)`` and ``parse_status_output(output, job_id)`` (``JobStatus``);
- ``list_command(cluster_usernames)`` and ``parse_list_output(output)``: every job of these
  users, each a ``ListedJob`` (id, name, owner, status), in one command; a listing that failed
  or cannot be read raises ``SchedulerUnavailable`` (never an empty list); ``job_key(job_id)``
  says which listed id is which job (Torque may add the server's name);
- ``explain_end(status)``, ``cancel_command(job_id)``,
  ``cancel_by_name_command(job_name, cluster_username)``, ``quote_job_id(job_id)``;
- ``check_command(cluster_username)``: prints the scheduler's version (its last line of output),
  then asks the controller about the user's jobs (fails when the controller is down);
  ``parse_check_output`` reads it.

A scheduler that can say what is free provides ``load_command()`` and
``parse_load_output(output)`` (a ``QueueLoad`` per partition or queue, or one ``ALL_NODES`` row;
``ValueError`` with the scheduler's words when it failed), for the spawn form.

Every scheduler provides ``explain_pending(reason)``: the reason a job waits, in words a
researcher understands. One that can tell a pending job's place in the queue provides
``pending_queue_command()`` and ``parse_pending_queue(output, job_id)`` (``QueuePlace``).

A scheduler whose jobs can stop in an error state (``JobState.ERROR``) also provides
``detail_command(job_id)`` and ``parse_error_reason(output)``, and, if its status listing has no
pending reason, ``parse_pending_reason(output)`` of the same details; one that forgets ended
jobs at once provides ``end_reason_command(job_id)`` and ``parse_end_reason(output)`` (its
accounting), which the spawner asks only when it has to tell someone why a job ended.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from xml.parsers import expat

#: The most output a scheduler command may print on stdout, and on stderr (4 MiB): the SSH
#: layer stops a command that prints more, and ``parse_xml`` refuses a longer document.
MAX_OUTPUT_BYTES = 4 * 1024 * 1024


class JobState(enum.Enum):
    """Where a batch job stands, as far as the spawner cares."""

    PENDING = "pending"  #: queued, held, suspended or being configured: not running yet
    RUNNING = "running"  #: running on a node
    ENDING = "ending"  #: being torn down (Slurm's COMPLETING): no longer usable, not yet gone
    ERROR = "error"  #: stuck in an error state (Grid Engine's Eqw): never runs, must be deleted
    DONE = "done"  #: finished, failed, cancelled or no longer known to the scheduler
    UNKNOWN = "unknown"  #: the scheduler could not be asked or gave an answer we cannot read


@dataclass(frozen=True)
class JobStatus:
    """One reading of a job's status.

    ``state_name`` is the scheduler's own word (``PENDING``, ``r``), ``reason`` its explanation
    (Slurm's pending reason, an error text), ``node`` the node it runs on when known, and
    ``estimated_start`` when a waiting job is expected to start, where the scheduler tells
    (Slurm's backfill estimate; ``""`` otherwise).
    """

    state: JobState
    state_name: str = ""
    reason: str = ""
    node: str = ""
    estimated_start: str = ""

    @property
    def ended(self) -> bool:
        """The job will never serve again (finished, being torn down, or in an error state)."""
        return self.state in (JobState.DONE, JobState.ENDING, JobState.ERROR)


@dataclass(frozen=True)
class CommandOutput:
    """What a command run on the login node returned: its own output, and (``noise``) what
    the login shell printed around it (banners, quota lines, ``module`` chatter), which no
    parser reads."""

    exit_status: int
    stdout: str
    stderr: str
    noise: str = ""

    def around(self) -> str:
        """For an error message about output that cannot be read: what the login shell printed
        around the command, if anything ("" when it printed nothing)."""
        if not self.noise.strip():
            return ""
        shown = self.noise.strip()
        if len(shown) > 300:
            shown = shown[:150] + " ... " + shown[-150:]
        return (f" (the login shell also printed {shown!r}: check the start-up files, e.g. "
                "~/.bashrc, for commands that print)")


@dataclass(frozen=True)
class ListedJob:
    """One job in a listing of users' jobs (``list_command``): its id, name, owner (cluster
    user name) and status."""

    job_id: str
    name: str
    owner: str
    status: JobStatus


_CLUSTER_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")


def listed_usernames(cluster_usernames: list[str]) -> list[str]:
    """The users a listing asks for: sorted, each once; ``ValueError`` when there are none
    or one is not a user name (it would reach the remote shell)."""
    users = sorted(set(cluster_usernames))
    if not users:
        raise ValueError("no cluster users to list")
    for name in users:
        if not _CLUSTER_USER.fullmatch(name):
            raise ValueError(f"not a cluster user name: {name!r}")
    return users


def statuses_of(
    jobs: list[ListedJob], job_ids: list[str], job_key: Any, gone: str
) -> dict[str, JobStatus]:
    """The status of each of ``job_ids`` in a listing that succeeded: a job the listing does
    not show has ended (``DONE``, with ``gone`` as its reason); ``job_key`` maps ids that name
    the same job (``123`` and ``123.server``) to one key."""
    listed = {job_key(job.job_id): job.status for job in jobs}
    done = JobStatus(JobState.DONE, reason=gone)
    return {job_id: listed.get(job_key(job_id), done) for job_id in job_ids}


class SubmitRejected(Exception):
    """The scheduler refused the job; the message is the scheduler's own words."""


class SchedulerUnavailable(Exception):
    """The scheduler's commands did not answer; the message says what they said."""


_Parsed = TypeVar("_Parsed")


def read_output(parse: Callable[..., _Parsed], output: CommandOutput, *args: Any) -> _Parsed:
    """``parse(output, *args)``; when the output cannot be read (an error, or a status that
    is ``UNKNOWN``), the error also says what the login shell printed around the command."""
    around = output.around()
    try:
        result = parse(output, *args)
    except (ValueError, SubmitRejected, SchedulerUnavailable) as error:
        if around:
            raise type(error)(f"{error}{around}") from None
        raise
    if around and isinstance(result, JobStatus) and result.state is JobState.UNKNOWN:
        return dataclasses.replace(result, reason=result.reason + around)
    return result


def parse_check_output(output: CommandOutput) -> str:
    """The version line of a ``check_command()`` (the last line: start-up files may print
    before it); ``SchedulerUnavailable`` when it failed."""
    if output.exit_status == 127:
        raise SchedulerUnavailable(
            "a scheduler command is not on the PATH of a non-interactive login: "
            + (output.stderr.strip().splitlines() or ["command not found"])[-1]
        )
    if output.exit_status != 0:
        lines = (output.stderr.strip() or output.stdout.strip()).splitlines()
        raise SchedulerUnavailable(
            " / ".join(line.strip() for line in lines[-3:]) or f"exit status {output.exit_status}"
        )
    lines = [line.strip() for line in output.stdout.splitlines() if line.strip()]
    return lines[-1] if lines else "(no version printed)"


def parse_xml(text: str, what: str, max_bytes: int = MAX_OUTPUT_BYTES) -> ElementTree.Element:
    """The root element of a scheduler's XML output (``qstat -xml``, ``qstat -x``).

    Guarantees: a document longer than ``max_bytes`` (UTF-8) is refused before parsing; a
    document type declaration (``<!DOCTYPE``), hence any entity declaration or external
    entity, is refused as soon as the parser meets it, so nothing is ever expanded or fetched
    (no "billion laughs", no external files); only the five predefined entities and character
    references are read. Every refusal and every syntax error is a ``ValueError`` that starts
    with ``unreadable {what} output``; callers turn it into ``JobState.UNKNOWN``.
    """
    size = len(text.encode("utf-8", errors="replace"))
    if size > max_bytes:
        raise ValueError(
            f"unreadable {what} output: {size} bytes, more than the {max_bytes} we read"
        )
    builder = ElementTree.TreeBuilder()
    parser = expat.ParserCreate(namespace_separator="}")

    def refuse_dtd(*_: object) -> None:
        raise ValueError(f"unreadable {what} output: it has a DOCTYPE (entity declarations)")

    parser.StartDoctypeDeclHandler = refuse_dtd
    parser.EntityDeclHandler = refuse_dtd
    parser.ExternalEntityRefHandler = refuse_dtd
    parser.StartElementHandler = lambda tag, attributes: builder.start(
        _element_name(tag), {_element_name(key): value for key, value in attributes.items()}
    )
    parser.EndElementHandler = lambda tag: builder.end(_element_name(tag))
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(text, True)
        return builder.close()
    except expat.ExpatError as error:
        raise ValueError(f"unreadable {what} output ({error})") from None
    except AssertionError:  # TreeBuilder: no root element
        raise ValueError(f"unreadable {what} output (no root element)") from None


def _element_name(name: str) -> str:
    """ElementTree's ``{namespace}tag`` form of expat's ``namespace}tag``."""
    return "{" + name if "}" in name else name


@dataclass(frozen=True)
class QueueLoad:
    """The live load of one partition (queue): free and total cores, GPUs and nodes where the
    scheduler says (``None``: it does not)."""

    name: str
    cores_free: int
    cores_total: int
    gpus_free: int | None = None
    gpus_total: int | None = None
    nodes_free: int | None = None
    nodes_total: int | None = None


@dataclass(frozen=True)
class QueuePlace:
    """Where a pending job stands: its ``position`` among the ``waiting`` jobs of its
    partition (by priority, 1 is next) and the scheduler's estimated start (``""``: none)."""

    position: int
    waiting: int
    estimated_start: str = ""


#: The name of the one load row of a scheduler whose nodes are not tied to queues (Torque).
ALL_NODES = "all nodes"


@dataclass(frozen=True)
class QueueLimits:
    """What ``python -m hub_spawner init`` learns of one partition (queue): its longest
    walltime (``None``: no limit, or not said), and its largest node's cores, memory in MB and
    GPUs (``None``: not said)."""

    name: str
    max_walltime_seconds: int | None = None
    cores: int | None = None
    memory_mb: int | None = None
    gpus: int = 0


_DURATION = re.compile(r"(?:(\d{1,4})-)?(\d{1,6})(?::(\d{1,2}))?(?::(\d{1,2}))?")
_UNLIMITED = {"infinite", "unlimited", "infinity", "none", "n/a", ""}


def parse_duration(text: str, minutes_first: bool = False) -> int | None:
    """Seconds of a scheduler's time limit: ``D-HH:MM:SS``, ``HH:MM:SS``, ``HH:MM``, or a bare
    number of seconds; with ``minutes_first`` (Slurm), ``MM:SS`` and a bare number of minutes.
    ``None`` for no limit (``infinite``, ``INFINITY``, ``UNLIMITED``); ``ValueError`` when it
    cannot be read."""
    text = text.strip()
    if text.lower() in _UNLIMITED:
        return None
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(f"not a time limit: {text!r}")
    days, first, second, third = match.groups()
    fields = [int(first)] + [int(x) for x in (second, third) if x is not None]
    if len(fields) == 3:
        seconds = fields[0] * 3600 + fields[1] * 60 + fields[2]
    elif len(fields) == 2:
        seconds = fields[0] * 60 + fields[1] if minutes_first and days is None else (
            fields[0] * 3600 + fields[1] * 60)
    else:
        seconds = fields[0] * (60 if minutes_first else 1)
        if days is not None:  # Slurm's D-HH
            seconds = fields[0] * 3600
    return seconds + int(days or 0) * 86400


def parse_memory_mb(text: str) -> int | None:
    """Megabytes of ``1000``, ``1000M``, ``1.9G``, ``2048kb``, ``4gb`` (units K, M, G, T;
    a bare number is MB); ``None`` when it cannot be read."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)[bB]?", text.strip())
    if not match:
        return None
    number, unit = float(match.group(1)), match.group(2).upper()
    factor = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[unit]
    return int(number * factor)


def merge_queue_limits(found: dict[str, QueueLimits], limits: QueueLimits) -> None:
    """Keep the largest of each limit for a queue seen on several lines (node types)."""
    old = found.get(limits.name)
    if old is None:
        found[limits.name] = limits
        return

    def larger(a: int | None, b: int | None) -> int | None:
        return b if a is None else a if b is None else max(a, b)

    found[limits.name] = QueueLimits(
        limits.name,
        larger(old.max_walltime_seconds, limits.max_walltime_seconds),
        larger(old.cores, limits.cores), larger(old.memory_mb, limits.memory_mb),
        max(old.gpus, limits.gpus))
