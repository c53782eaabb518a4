"""Scheduler knowledge, one module per scheduler.

Each module (``slurm`` today) is pure: it builds job scripts and command lines and parses the
scheduler's output, and never does I/O. The spawner runs the commands over SSH and hands the
output back to the parsers. The types shared by every scheduler live here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class JobState(enum.Enum):
    """Where a batch job stands, as far as the spawner cares."""

    PENDING = "pending"  #: queued, held, suspended or being configured: not running yet
    RUNNING = "running"  #: running on a node
    ENDING = "ending"  #: being torn down (Slurm's COMPLETING): no longer usable, not yet gone
    DONE = "done"  #: finished, failed, cancelled or no longer known to the scheduler
    UNKNOWN = "unknown"  #: the scheduler could not be asked or gave an answer we cannot read


@dataclass(frozen=True)
class JobStatus:
    """One reading of a job's status.

    ``state_name`` is the scheduler's own word (``PENDING``, ``r``), ``reason`` its explanation
    (Slurm's pending reason, an error text), ``node`` the node it runs on when known.
    """

    state: JobState
    state_name: str = ""
    reason: str = ""
    node: str = ""

    @property
    def ended(self) -> bool:
        """The job will never serve again (finished, or being torn down)."""
        return self.state in (JobState.DONE, JobState.ENDING)


@dataclass(frozen=True)
class CommandOutput:
    """What a command run on the login node returned."""

    exit_status: int
    stdout: str
    stderr: str


class SubmitRejected(Exception):
    """The scheduler refused the job; the message is the scheduler's own words."""
