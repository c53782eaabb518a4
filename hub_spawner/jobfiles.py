"""A job's files on the cluster: where they go, and which old ones are deleted (pure).

Requirements:
- every job has a directory of its own, ``<remote_state_dir>/<job name>/`` (created fresh with
  mode 0700 by the spawner, never reused), holding ``job.sh`` (the script as submitted),
  ``job.out`` (its output, where the ready line appears) and ``server.env`` (the secrets file,
  created exclusively with mode 0600 and deleted by the job as soon as it has read it);
- every path that reaches a job script or a command line is absolute and made only of
  ``[A-Za-z0-9_./@+-]`` (``check_remote_path``), so it needs no quoting in a directive and is
  quoted anyway where a shell sees it;
- retention deletes only what it can prove is ours and finished: entries named exactly like our
  job directories (or the earlier layout's ``<job name>.out``/``.sh``/``.env`` files), owned by
  the same user as the new job's directory, beyond the newest ``keep``, and older than
  ``min_age`` seconds by the cluster's own clock; the deletion is one ``rm -rf --`` of exact
  paths built here from validated names, never a glob.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass

SCRIPT_NAME = "job.sh"
OUTPUT_NAME = "job.out"
SECRETS_NAME = "server.env"

# Used with ``fullmatch``. A job name is ``jupyterhub-<hub id>-<user slug>-<server slug>-<8 hex
# digits>`` (``spawner.job_name``; jobs submitted before hub ids lack ``<hub id>-``).
JOB_NAME = re.compile(r"jupyterhub-[A-Za-z0-9_.-]{1,60}-[0-9a-f]{8}")
_LEGACY_FILE = re.compile(r"(?P<job>jupyterhub-[A-Za-z0-9_.-]{1,60}-[0-9a-f]{8})\.(?:out|sh|env)")
_REMOTE_PATH = re.compile(r"/[A-Za-z0-9_./@+-]*")


@dataclass(frozen=True)
class JobPaths:
    """Where one job's files live on the cluster (absolute paths)."""

    directory: str
    script: str
    output: str
    secrets: str


@dataclass(frozen=True)
class RemoteEntry:
    """One entry of a directory listing on the cluster, as SFTP reports it (``lstat``: a
    symbolic link is neither a directory nor a file here)."""

    name: str
    mtime: float
    uid: int | None
    is_dir: bool
    is_file: bool


def job_paths(state_dir: str, job_name: str) -> JobPaths:
    """The paths of job ``job_name`` under the absolute ``state_dir``.

    Raises ``ValueError`` (a message for admins) when ``job_name`` is not one of our job names
    or a path would have characters we do not put in a job script.
    """
    if not JOB_NAME.fullmatch(job_name):
        raise ValueError(f"not a job name of ours: {job_name!r}")
    directory = check_remote_path(posixpath.join(state_dir, job_name))
    return JobPaths(
        directory=directory,
        script=posixpath.join(directory, SCRIPT_NAME),
        output=posixpath.join(directory, OUTPUT_NAME),
        secrets=posixpath.join(directory, SECRETS_NAME),
    )


def check_remote_path(path: str) -> str:
    """``path``, normalised, if it is absolute and made of ``[A-Za-z0-9_./@+-]`` only; else
    ``ValueError`` saying what to set."""
    normalised = posixpath.normpath(path) if isinstance(path, str) and path else ""
    if not _REMOTE_PATH.fullmatch(normalised) or normalised.startswith("//"):
        raise ValueError(
            f"The path {path!r} on the cluster is not absolute or has characters we do not put "
            "in a job script; set remote_state_dir to a plain path (letters, digits, '_', '.', "
            "'/', '@', '+', '-'), relative to the user's home or absolute."
        )
    return normalised


def expired_entries(
    entries: Iterable[RemoteEntry],
    keep: int,
    current: RemoteEntry,
    min_age: float,
) -> list[str]:
    """The names in a listing of ``remote_state_dir`` to delete: what belongs to the user's
    jobs other than the ``keep`` newest, and only if older than ``min_age`` seconds.

    ``current`` is the new job's own directory, just created: its owner says whose entries are
    ours (entries of other owners, or of unknown owner, are never chosen) and its time is "now"
    on the cluster's clock (no clock skew between hub and cluster). The current job is never
    chosen and does not count towards ``keep``. A job's age is that of its newest entry.
    Guarantees: every name returned fullmatches ``JOB_NAME`` (a directory) or is such a name
    plus ``.out``, ``.sh`` or ``.env`` (a regular file of the earlier layout); sorted.
    """
    jobs: dict[str, list[RemoteEntry]] = {}
    for entry in entries:
        if entry.uid is None or entry.uid != current.uid or entry.name == current.name:
            continue
        if entry.is_dir and JOB_NAME.fullmatch(entry.name):
            job = entry.name
        elif entry.is_file and (legacy := _LEGACY_FILE.fullmatch(entry.name)):
            job = legacy.group("job")
        else:
            continue
        if job != current.name:
            jobs.setdefault(job, []).append(entry)
    newest_first = sorted(jobs, key=lambda job: max(e.mtime for e in jobs[job]), reverse=True)
    expired = []
    for job in newest_first[max(keep, 0):]:
        if all(current.mtime - entry.mtime > min_age for entry in jobs[job]):
            expired.extend(entry.name for entry in jobs[job])
    return sorted(expired)


def remove_command(state_dir: str, names: Iterable[str]) -> str:
    """One ``rm -rf --`` of ``state_dir/<name>`` for each name; ``""`` when there is none.

    Raises ``ValueError`` for a name that is not a job directory or an earlier-layout job file
    (so a ``/``, ``..``, ``*`` or any other character can never reach the command).
    """
    directory = check_remote_path(state_dir)
    paths = []
    for name in names:
        if not (JOB_NAME.fullmatch(name) or _LEGACY_FILE.fullmatch(name)):
            raise ValueError(f"refusing to delete {name!r}: not a job file of ours")
        paths.append(shlex.quote(posixpath.join(directory, name)))
    return f"rm -rf -- {' '.join(paths)}" if paths else ""
