"""Errors a user or an admin may see: each message says what happened and what to do.

They are ``tornado.web.HTTPError`` subclasses so that JupyterHub logs them as one line (no
traceback) and shows ``jupyterhub_message`` on the spawn page and the progress stream.
"""

from __future__ import annotations

from tornado import web


class SpawnError(web.HTTPError):
    """A spawn failed for a reason we can explain. ``str()`` is the message for people."""

    def __init__(self, message: str, status_code: int = 500) -> None:
        super().__init__(status_code, log_message=message.replace("%", "%%"))
        self.message = message
        self.jupyterhub_message = message

    def __str__(self) -> str:
        return self.message


class ClusterUnreachable(SpawnError):
    """The login node could not be reached, refused us, or a command on it could not finish."""


class JobRejected(SpawnError):
    """The scheduler refused the job script."""


class JobEndedEarly(SpawnError):
    """The job ended before its server was ready."""


class BadReadyLine(SpawnError):
    """The job reported an address we will not connect to."""


class BadOptions(SpawnError):
    """The user asked for resources that are not valid here."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status_code=400)


class NotReadyInTime(SpawnError):
    """The server was not ready within ``start_timeout``; the job is cancelled."""

    @classmethod
    def after(cls, limit: float, last_step: str, job_id: str, output_path: str) -> NotReadyInTime:
        """The error for a spawn stopped at ``limit`` seconds: what the job was doing (the
        last progress message) and what to do about it."""
        if job_id and "waiting in the queue" in last_step:
            advice = ("The queue was too busy: ask for fewer cores, less memory or a shorter "
                      "walltime, choose another partition, or try again later")
        elif job_id:
            advice = (f"The job ran, but its server did not start in time; its output is in "
                      f"{output_path} on the cluster")
        else:
            advice = "The cluster did not take the job in time; try again in a moment"
        return cls(
            f"The server was not ready within start_timeout ({limit:g} s), so the spawn was "
            f"stopped{f' and job {job_id} is being cancelled' if job_id else ''}. "
            f"Last step: {last_step or 'none'}. {advice}; an administrator can raise "
            "start_timeout."
        )
